"""Helpers for tests: real fdmig processes, readiness through a real NOTIFY_SOCKET
(never a sleep), small socket utilities, and what a test needs from Debian
packages (needs, require, present)."""

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import pytest

FDMIG = [sys.executable, "-m", "fdmig"]

# Every program a test runs by name from a Debian package, with that package:
# what .ci/run installs (tests/test_packaging.py holds the two together). Left out:
# sh and timeout, which POSIX asks of every system.
DEBIAN_PACKAGES = {
    "bash": "bash",
    "zsh": "zsh",
    "fish": "fish",
    "man": "man-db",
    "jq": "jq",
    "socat": "socat",
    "haproxy": "haproxy",
    "openssl": "openssl",
    "ip": "iproute2",
    "arping": "iputils-arping",
    "setpriv": "util-linux",
    "systemd-notify": "systemd",
    "systemd-socket-activate": "systemd",
    "s6-fdholder-daemon": "s6",
    "s6-fdholderd": "s6",
    "s6-fdholder-setdump": "s6",
    "s6-fdholder-getdump": "s6",
    "s6-fdholder-transferdump": "s6",
    "s6-fdholder-list": "s6",
}

# With this set to 1 (as .ci/run sets it, having installed every package above), a
# test that would skip for a missing program fails instead: CI never skips one quietly.
REQUIRE_TOOLS = "FDMIG_TEST_REQUIRE_TOOLS"


def missing(*programs: str) -> str | None:
    """Why a test that runs `programs` cannot run here ("needs socat (Debian
    package socat)"), or None when every one is on PATH."""
    unknown = [program for program in programs if program not in DEBIAN_PACKAGES]
    assert not unknown, f"{unknown}: add them to DEBIAN_PACKAGES in tests/helpers.py and to .ci/run"
    absent = [program for program in programs if shutil.which(program) is None]
    if not absent:
        return None
    return "needs " + ", ".join(f"{program} (Debian package {DEBIAN_PACKAGES[program]})" for program in absent)


def tools_required() -> bool:
    return os.environ.get(REQUIRE_TOOLS, "") not in ("", "0")


def _fail_for(why: str):
    __tracebackhide__ = True  # reported at the test's line, not here
    pytest.fail(f"{why}; {REQUIRE_TOOLS}=1 makes this a failure, not a skip", pytrace=False)


def needs(*programs: str) -> pytest.MarkDecorator:
    """Mark a test (or a module, as pytestmark) that runs `programs`: it skips
    where one is missing, and fails there under FDMIG_TEST_REQUIRE_TOOLS=1
    (tests/conftest.py acts on the mark)."""
    missing(*programs)  # each must be in DEBIAN_PACKAGES
    return pytest.mark.needs(*programs)


def require(*programs: str) -> None:
    """Inside a test or a fixture: skip it where one of `programs` is missing,
    or fail under FDMIG_TEST_REQUIRE_TOOLS=1."""
    __tracebackhide__ = True  # reported at the test's line, not here
    why = missing(*programs)
    if why is None:
        return
    if tools_required():
        _fail_for(why)
    pytest.skip(why)


def present(*programs: str) -> bool:
    """For the part of a test that checks what `programs` add: whether they are
    all here. False where one is missing, except under FDMIG_TEST_REQUIRE_TOOLS=1,
    where that fails the test."""
    __tracebackhide__ = True
    why = missing(*programs)
    if why is not None and tools_required():
        _fail_for(why)
    return why is None


def run(*args, timeout=30, **kwargs) -> subprocess.CompletedProcess:
    """Run an fdmig command to completion and capture its output. Files rather than
    pipes: a target that `migrate-out --spawn` starts inherits them and lives on."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(FDMIG + list(args), stdout=out, stderr=err, text=True, timeout=timeout,
                              stdin=kwargs.pop("stdin", subprocess.DEVNULL), **kwargs)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


class Notify:
    """A NOTIFY_SOCKET that a test owns, to await READY=1 and the like."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0, alive=None, after=0) -> dict:
        """The first message from index `after` on (old or new) that sets `key` (to
        `value`). `alive()` returning False (the sender exited) ends the wait early."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages[after:]:
                if key in message and (value is None or message[key] == value):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (alive is not None and not alive()):
                raise TimeoutError(f"no {key}={value} on NOTIFY_SOCKET; got {self.messages}")
            self.sock.settimeout(min(remaining, 0.5) if alive is not None else remaining)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def close(self):
        self.sock.close()


class Daemon:
    """An fdmig process (serve or migrate-in) started by a test."""

    def __init__(self, args, directory, env=None, ready=True, wrap=(), **popen):
        """`wrap`: what runs fdmig (`ip netns exec NS`, say)."""
        self.notify = Notify(tempfile.mkdtemp(prefix="n", dir=directory))
        self.env = dict(os.environ if env is None else env, NOTIFY_SOCKET=self.notify.path)
        # A file, not a pipe: a daemon that logs more than a pipe holds must not block.
        self._log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(list(wrap) + FDMIG + list(args), env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log, text=True, **popen)
        if ready:
            self.wait_ready()

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, timeout=20.0):
        try:
            self.notify.wait_for("READY", "1", timeout, alive=lambda: self.proc.poll() is None)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"fdmig did not become ready (exit {self.proc.returncode}): "
                                 f"{self.stderr()[-2000:]}") from None

    def stop(self, timeout=10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def stderr(self) -> str:
        """What the process has logged so far (stdout and stderr)."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def close(self):
        self.stop()
        self.notify.close()
        self._log.close()


def connect_unix(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


class Pump(threading.Thread):
    """Sends or receives on a socket in a thread; errors surface in join()."""

    def __init__(self, target, *args):
        super().__init__(daemon=True)
        self._target, self._args, self.result, self.error = target, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self._target(*self._args)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def join(self, timeout=20):
        super().join(timeout)
        assert not self.is_alive(), "pump thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def echoes(sock: socket.socket, data: bytes = b"ping") -> bool:
    """Whether an echo chardev at the far end of `sock` answers `data` with itself."""
    sock.sendall(data)
    return recv_exactly(sock, len(data)) == data


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"EOF with {n} bytes still expected")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def wait_state(label: str, state: str, *instance_args, timeout: float = 20.0) -> None:
    """Await a chardev state through the CLI's own --wait (event driven)."""
    result = run("status", *instance_args, "--wait", f"{label}={state}", "--timeout", str(timeout),
                 timeout=timeout + 10)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def listener(path: str):
    """A unix listening socket the test owns, for client chardevs to connect to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    sock.settimeout(10)
    try:
        yield sock
    finally:
        sock.close()



def run_many(commands, timeout=30) -> list[subprocess.CompletedProcess]:
    """Run several fdmig commands at once (each is a ~0.3 s interpreter start) and
    return their results in order."""
    procs = [subprocess.Popen(FDMIG + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    results = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(FDMIG + list(args), proc.returncode, out, err))
    return results


def wait_states(control: str, expected: dict, timeout: float = 10.0) -> dict:
    """Await chardev states over QMP events, without a subprocess; returns the states."""
    from fdmig import qmp
    deadline = time.monotonic() + timeout
    with qmp.connect(control, timeout=timeout) as client:
        while True:
            states = {c["label"]: c["state"] for c in client.execute("x-fdmig-status")["chardevs"]}
            if all(states.get(label) == state for label, state in expected.items()):
                return states
            try:
                client.wait_event({"X_FDMIG_CHARDEV_STATE"}, deadline)
            except Exception as exc:
                raise AssertionError(f"waited for {expected}; states are {states}") from exc


def status_of(control: str) -> dict:
    """x-fdmig-status over QMP, without a subprocess."""
    from fdmig import qmp
    with qmp.connect(control) as client:
        return client.execute("x-fdmig-status")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bound to port 0, then closed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def read_exactly_fd(fd: int, n: int, timeout: float = 10.0) -> bytes:
    """n bytes from a pipe (e.g. socat's stdout), failing after `timeout` seconds."""
    import select
    deadline = time.monotonic() + timeout
    chunks = []
    while n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"{n} bytes still expected")
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError(f"EOF with {n} bytes still expected")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def connect_when_bound(path: str, timeout: float = 20.0, alive=None) -> socket.socket:
    """Connect to a unix socket that a process we started binds as it starts. There
    is no event for "now bound", so this retries; `alive()` False stops it early."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline or (alive is not None and not alive()):
                raise
            time.sleep(0.005)


def send_raw(sock: socket.socket, data: bytes, fds=()) -> None:
    """One frame as a fake migration peer sends it: its fds on the first byte."""
    from fdmig import fdpass
    sent = fdpass.send_with_fds(sock, data, list(fds)) if fds else 0
    if sent < len(data):  # sendall(b"") still sends, and fails on a peer that has hung up
        sock.sendall(data[sent:])


def send_chunks(sock: socket.socket, chunks) -> None:
    """What a real codec's send() produced, over a plain blocking socket."""
    for chunk in chunks:
        send_raw(sock, chunk.data, chunk.fds)


def read_event(sock: socket.socket, codec):
    """The next migration event from the peer at the other end of `sock`."""
    from fdmig.migration import wire
    while True:
        event = codec.next_event()
        if event is not wire.NEED_DATA:
            return event
        codec.receive_data(sock.recv(65536))


def as_uid(uid: int, work) -> bytes:
    """Run `work()` in a forked child that holds only `uid`'s credentials (uid, gid,
    no groups); the bytes it returns come back through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: plain syscalls only, then _exit
        out = b""
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = work()
        except BaseException as exc:  # reported to the parent, which fails the test
            out = f"error in the child: {exc!r}".encode()
        finally:
            os.write(write_end, out)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


def wait_status(control: str, condition, what: str, timeout: float = 15.0) -> dict:
    """x-fdmig-status once `condition(status)` holds, re-read at each event the
    instance sends (a chardev's or a service's change), never on a timer."""
    from fdmig import qmp
    deadline = time.monotonic() + timeout
    with qmp.connect(control, timeout=timeout) as client:
        while True:
            status = client.execute("x-fdmig-status")
            if condition(status):
                return status
            try:
                client.wait_event({"X_FDMIG_SERVICE", "X_FDMIG_CHARDEV_STATE"}, deadline)
            except Exception as exc:
                raise AssertionError(f"waited for {what}; status: {json.dumps(status)[-2000:]}") from exc


def calls(work) -> int:
    """How many Python and C functions `work()` calls: a measure of how much it
    does that, unlike a clock, a busy machine cannot change. Compared at two
    sizes, it shows whether the work grows faster than linearly."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1
    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return count


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_a_terminal(args, columns: int, timeout: float = 30) -> str:
    """What an fdmig command writes to a terminal `columns` wide (a real pty, as a
    user's shell runs it), without colours; it must exit 0."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env.update(COLUMNS=str(columns), TERM="xterm-256color")
    proc = subprocess.Popen(FDMIG + list(args), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command has exited and closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    text = _ANSI.sub("", out.decode()).replace("\r", "")
    assert proc.wait(timeout) == 0, text
    return text


class Stream:
    """A peer streaming numbered records through an echo service; each record must
    come back once and in order, and the connection must never see EOF."""

    RECORD = b"%011d\n"
    SIZE = 12

    def __init__(self, sock: socket.socket, window: int = 128):
        sock.settimeout(20)
        self.sock = sock
        self.sent = 0  # counted before sendall: an echo may be back before it returns
        self.echoed = 0
        self.error: str | None = None
        self._room = threading.Semaphore(window)
        self._stop = threading.Event()
        self._closing = False
        self._progress = threading.Condition()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _send(self):
        while not self._stop.is_set():
            if not self._room.acquire(timeout=0.05):
                continue
            record = self.RECORD % self.sent
            self.sent += 1
            try:
                self.sock.sendall(record)
            except OSError as exc:
                self._fail(f"send failed: {exc}")
                return

    def _receive(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                self._fail(f"receive failed: {exc}")
                return
            if not data:
                self._fail("EOF")
                return
            buf += data
            while len(buf) >= self.SIZE:
                record, buf = buf[:self.SIZE], buf[self.SIZE:]
                if record != self.RECORD % self.echoed:
                    self._fail(f"expected record {self.echoed}, got {record!r}")
                    return
                with self._progress:
                    self.echoed += 1
                    self._progress.notify_all()
                self._room.release()

    def _fail(self, error: str):
        with self._progress:
            if not self._closing:
                self.error = self.error or error
            self._progress.notify_all()

    def wait_echoed(self, count: int, timeout: float = 20.0) -> None:
        with self._progress:
            self._progress.wait_for(lambda: self.echoed >= count or self.error, timeout)
        assert self.error is None, self.error
        assert self.echoed >= count, f"{self.echoed} of {count} records echoed within {timeout} s"

    def more(self, count: int = 20) -> None:
        """Until every record sent so far, and `count` more, are echoed."""
        self.wait_echoed(self.sent + count)

    def finish(self, timeout: float = 20.0) -> int:
        """Stops sending, waits for every record sent to come back; the count."""
        self._stop.set()
        self._threads[0].join(timeout)
        self.wait_echoed(self.sent, timeout)
        with self._progress:
            self._closing = True
        self.sock.shutdown(socket.SHUT_RDWR)
        if getattr(self.sock, "type", None) != socket.SOCK_DGRAM:  # a datagram socket's wakes no reader
            self._threads[1].join(timeout)
        self.sock.close()
        return self.echoed


def answer_then_hangup(sock: socket.socket, codec):
    """The target's last word (ABORT, or ConnectionClosed), read once it has hung up:
    it closes the channel after every fd it received."""
    sock.settimeout(10)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break  # it closed with bytes of ours unread; what it sent came first
        if not chunk:
            break
        data += chunk
    if data:
        codec.receive_data(bytes(data))
    codec.receive_data(b"")
    return codec.next_event()


def sees_eof(sock: socket.socket) -> bool:
    """True once every other copy of the peer end is closed (b"" or a reset)."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def locked_file(path: str, flags: int = os.O_RDWR | os.O_CREAT):
    """An fd of a file held under flock, which every copy of the open file holds,
    and a witness: true once every copy is closed (the lock is free again)."""
    fd = os.open(path, flags, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def unlocked() -> bool:
        again = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(again)
    return fd, unlocked
