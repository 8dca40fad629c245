"""QMP, the control protocol: a sans-IO codec for both ends, and the blocking client
the CLI uses (no asyncio, so `fdmig status` starts fast).

Server input is a stream of JSON values, not lines: qemu.qmp sends commands with no
trailing newline, as QEMU's own JSON lexer allows. Output is one object per line.
"""

import dataclasses
import enum
import json
import secrets
import os
import select
import socket
import time

from fdmig import paths
from fdmig.errors import FdmigError, NoInstanceError, QMPError, TimeoutExpired

MAX_REQUEST = 1 << 20  # bytes in one client message
MAX_NESTING = 64
MAX_REPLY_LINE = 64 << 20  # a status of 20,000 chardevs fits with room to spare


class Need(enum.Enum):
    DATA = "need-data"


NEED_DATA = Need.DATA


@dataclasses.dataclass(frozen=True)
class Request:
    execute: str
    arguments: dict
    id: object = None
    has_id: bool = False


@dataclasses.dataclass(frozen=True)
class BadRequest:
    """A message that gets an error reply; the connection stays usable."""
    desc: str
    id: object = None
    has_id: bool = False


@dataclasses.dataclass(frozen=True)
class Overflow:
    """Input past the bounds: the server answers and closes the connection."""
    desc: str


class JSONSplitter:
    """Cuts a byte stream into complete top-level JSON values by bracket depth,
    as QEMU's json-streamer does. Scalars at top level are cut at whitespace."""

    def __init__(self, max_size: int = MAX_REQUEST, max_depth: int = MAX_NESTING):
        self._buf = bytearray()
        self._pos = 0  # scan position in _buf
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._max_size = max_size
        self._max_depth = max_depth
        self._failed = False
        self._after_invalid = False

    def feed(self, data: bytes) -> list:
        """Returns complete values (bytes), BadRequest for stray tokens, or Overflow."""
        if self._failed:
            return []
        self._buf += data
        out = []
        buf = self._buf
        i = self._pos
        start = 0
        while i < len(buf):
            c = buf[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_string = False
            elif (c < 0x20 and c not in b"\t\r\n") or c >= 0x80:
                # Never JSON outside a string: report it once and start afresh, as
                # QEMU's lexer does on an error (an unclosed '{' must not swallow
                # every later request).
                if not self._after_invalid:
                    out.append(BadRequest(f"JSON parse error, invalid byte 0x{c:02x} outside a string"))
                self._after_invalid = True
                self._depth = 0
                start = i + 1
                i += 1
                continue
            elif c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):  # { [
                if self._depth == 0 and buf[start:i].strip():
                    # A stray token right before a value: report it, keep the value
                    # (QEMU's streamer ends a top-level token at the next one).
                    out.append(self._stray(buf[start:i]))
                    start = i
                self._depth += 1
                if self._depth > self._max_depth:
                    return self._overflow(out, f"JSON nesting deeper than {self._max_depth} levels")
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth <= 0:
                    self._depth = 0
                    if i + 1 - start > self._max_size:  # however it was cut into reads
                        return self._overflow(out, f"message longer than {self._max_size} bytes")
                    out.append(bytes(buf[start:i + 1]))
                    start = i + 1
            elif self._depth == 0 and c in b" \t\r\n":
                if i > start and buf[start:i].strip():
                    out.append(self._stray(buf[start:i]))
                start = i + 1
            self._after_invalid = False
            i += 1
        del buf[:start]
        self._pos = len(buf)
        if len(buf) > self._max_size:
            return self._overflow(out, f"message longer than {self._max_size} bytes")
        return out

    @staticmethod
    def _stray(token) -> BadRequest:
        return BadRequest(f"JSON parse error, stray token '{bytes(token.strip()[:40]).decode(errors='replace')}'")

    def _overflow(self, out, desc):
        self._failed = True
        self._buf.clear()
        out.append(Overflow(desc))
        return out


def _decode_request(raw: bytes):
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return BadRequest(f"JSON parse error, {exc}")
    if not isinstance(msg, dict):
        return BadRequest("QMP input must be a JSON object")
    has_id = "id" in msg
    ident = msg.get("id")
    for key in msg:
        if key not in ("execute", "arguments", "id", "exec-oob", "control"):
            return BadRequest(f"QMP input member '{key}' is unexpected", ident, has_id)
    if "exec-oob" in msg:
        return BadRequest("QMP input member 'exec-oob' is not supported: out-of-band was not enabled",
                          ident, has_id)
    execute = msg.get("execute")
    if execute is None:
        return BadRequest("QMP input lacks member 'execute'", ident, has_id)
    if not isinstance(execute, str):
        return BadRequest("QMP input member 'execute' must be a string", ident, has_id)
    arguments = msg.get("arguments", {})
    if not isinstance(arguments, dict):
        return BadRequest("QMP input member 'arguments' must be an object", ident, has_id)
    return Request(execute, arguments, ident, has_id)


SEPARATORS = (", ", ": ")


class Streamed:
    """A value whose JSON text is made in pieces, the loop serving in between (the
    rows of thousands of chardevs): a reply holding one goes out a piece at a time
    as they are made (ServerCodec.reply_parts), never built whole in one turn."""

    __slots__ = ("pieces",)

    def __init__(self, pieces):
        self.pieces = pieces  # an async iterator of str: the value's JSON, in order


def encode(obj) -> bytes:
    return json.dumps(obj, separators=SEPARATORS).encode() + b"\n"


def encode_parts(obj) -> tuple[bytes, Streamed | None, bytes]:
    """obj's JSON line, cut around the one Streamed value it may hold: the bytes
    before it, it, and the bytes after it (the whole line, None and b"" if none)."""
    found: list[Streamed] = []
    # A stand-in no other string in `obj` can hold: a peer's words (an error a
    # target sent, say) may be anything, but not a nonce made for this call.
    stand_in = f"\0streamed {secrets.token_hex(8)}\0"

    def default(value):
        if isinstance(value, Streamed) and not found:
            found.append(value)
            return stand_in
        raise TypeError(f"{type(value).__name__} is not JSON serializable")
    text = json.dumps(obj, separators=SEPARATORS, default=default) + "\n"
    if not found:
        return text.encode(), None, b""
    head, tail = text.split(json.dumps(stand_in), 1)
    return head.encode(), found[0], tail.encode()


def _reply_message(request, value) -> dict:
    msg = {"return": value}
    if request.has_id:
        msg["id"] = request.id
    return msg


class ServerCodec:
    """The server's side of one QMP connection."""

    def __init__(self):
        self._splitter = JSONSplitter()
        self.negotiated = False

    @staticmethod
    def greeting(version: str) -> bytes:
        major, minor, micro = (list(map(int, version.split(".")[:3])) + [0, 0, 0])[:3]
        return encode({"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                           "package": f"fdmig {version}"},
                               "capabilities": []}})

    def receive_data(self, data: bytes) -> list:
        """Requests, BadRequests and Overflows in the order they came."""
        return [item if not isinstance(item, bytes) else _decode_request(item)
                for item in self._splitter.feed(data)]

    def gate(self, request: Request) -> tuple[str, str] | None:
        """The capabilities-negotiation rule: an error (class, desc) or None."""
        if not self.negotiated:
            if request.execute != "qmp_capabilities":
                return ("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
            self.negotiated = True
            return None
        if request.execute == "qmp_capabilities":
            return ("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        return None

    @staticmethod
    def reply(request, value) -> bytes:
        return encode(_reply_message(request, value))

    @staticmethod
    def reply_parts(request, value) -> tuple[bytes, Streamed | None, bytes]:
        """The reply, cut around a Streamed value in it (encode_parts)."""
        return encode_parts(_reply_message(request, value))

    @staticmethod
    def error(request, error_class: str, desc: str) -> bytes:
        msg = {"error": {"class": error_class, "desc": desc}}
        if request is not None and request.has_id:
            msg["id"] = request.id
        return encode(msg)

    @staticmethod
    def event(name: str, data: dict | None = None) -> bytes:
        now = time.time()
        msg = {"event": name, "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            msg["data"] = data
        return encode(msg)


class ClientCodec:
    """The client's side: lines in, one object each."""

    def __init__(self, max_line: int = MAX_REPLY_LINE):
        self._buf = bytearray()
        self._max_line = max_line
        self._next_id = 0

    def request(self, execute: str, arguments: dict | None = None) -> tuple[int, bytes]:
        self._next_id += 1
        msg = {"execute": execute, "id": self._next_id}
        if arguments:
            msg["arguments"] = arguments
        return self._next_id, encode(msg)

    def receive_data(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self._max_line:
                    raise FdmigError(f"control reply longer than {self._max_line} bytes")
                return out
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise FdmigError("the instance sent a reply that is not JSON") from None


class Client:
    """A blocking QMP client: connect, negotiate, execute, wait for events."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self.codec = ClientCodec()
        self.events: list[dict] = []
        self._pending: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            self.sock.close()
            raise NoInstanceError(f"no instance answers at {path}") from None
        except PermissionError:
            self.sock.close()
            raise NoInstanceError(f"no instance answers at {path}: permission denied") from None
        try:
            paths.trusted_peer(self.sock)
        except paths.Stranger as exc:
            # Whoever answers is not an instance of ours: tell it nothing.
            self.sock.close()
            raise NoInstanceError(f"no instance of uid {os.geteuid()} answers at {path} (uid {exc.uid} does)") from None
        try:
            greeting = self._read_message()
        except EOFError:
            self.sock.close()
            raise NoInstanceError(f"no instance answers at {path}: it closed the connection") from None
        if "QMP" not in greeting:
            self.sock.close()
            error = greeting.get("error", {}).get("desc", "no QMP greeting")
            raise NoInstanceError(f"no instance answers at {path}: {error}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_message(self, deadline: float | None = None) -> dict:
        while not self._pending:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutExpired("timed out waiting for the instance")
                self.sock.settimeout(min(remaining, self.timeout))
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                if deadline is not None:
                    continue
                raise TimeoutExpired(f"the instance at {self.path} did not answer within {self.timeout:g} s") from None
            if not data:
                raise EOFError("the instance closed the control connection")
            self._pending.extend(self.codec.receive_data(data))
        return self._pending.pop(0)

    def execute(self, command: str, arguments: dict | None = None, fds: tuple[int, ...] = ()):
        ident, data = self.codec.request(command, arguments)
        try:
            if fds:
                from fdmig.fdpass import send_with_fds
                sent = send_with_fds(self.sock, data, fds)
                self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
            while True:
                msg = self._read_message()
                if "event" in msg:
                    self.events.append(msg)
                    continue
                if msg.get("id") != ident:
                    continue
                if "error" in msg:
                    raise QMPError(msg["error"].get("class", "GenericError"), msg["error"].get("desc", ""))
                return msg.get("return")
        except (EOFError, ConnectionResetError, BrokenPipeError) as exc:
            raise FdmigError(f"{command}: the instance closed the control connection ({exc})") from None

    def wait_event(self, names: set[str], deadline: float | None, wake=()) -> dict | None:
        """The next event named in `names` (earlier ones first); TimeoutExpired at
        deadline; None if one of `wake` (objects with fileno()) is readable first."""
        while True:
            for i, event in enumerate(self.events):
                if event["event"] in names:
                    return self.events.pop(i)
            self.events.clear()
            if wake and not self._pending:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = select.select([self.sock, *wake], [], [], timeout)[0]
                if not ready:
                    raise TimeoutExpired("timed out waiting for the instance")
                if self.sock not in ready:
                    return None
            msg = self._read_message(deadline)
            if "event" in msg:
                self.events.append(msg)


def connect(path: str, timeout: float = 10.0) -> Client:
    return Client(path, timeout)
