"""The migration channel's wire format, as a sans-IO codec (in the style of h11).

The codec turns events into bytes to send and received bytes into events. It does
no I/O: the caller moves the bytes, and the fds with them. To the codec an fd is
an opaque int on the way out, and on the way in just a count of how many arrived
with each read (fdmig.fdpass does the SCM_RIGHTS part).

A frame is a 16-byte header, then the payload:

    magic b"FDMG" | wire version (u16) | frame type (u16) | payload length (u32)
    | fd count (u32): how many fds travel with this frame

all big-endian. Payloads are UTF-8 JSON objects, except SECTIONS:

    manifest length (u32) | JSON manifest | the sections' outbuf bytes, in order

The conversation, source on the left:

    HELLO, TABLE..., TABLE_END  ->
                                <-  ACCEPT
    PRECOPY..., PRECOPY_END     ->            (the source still serves)
                                <-  HELD
    SECTIONS..., END            ->            (the source has quiesced)
                                <-  ACK       (the commit point, once the source reads it)
    RELEASED                    ->
                                <-  TAKEN     (sent before the target reads anything)

and ABORT from either side at any point before the commit. PRECOPY carries the
fds of the moved chardevs (dups, with no state) while the source still serves:
the target checks them and says HELD, and only then does the source quiesce, so
the fd checks stay out of the downtime. SECTIONS then carries each chardev's state,
and fds only for the connections that changed since PRECOPY. TAKEN tells the source
that the target lives and owns the connections: a target that dies after the
commit but before TAKEN has read nothing, so the source may still resume them. Both codecs (the
source's and the target's) track this same conversation state, applying our own
sends and the peer's frames; every allowed step is in TRANSITIONS, and the one
frame that may cross another in flight in CROSSED_TRANSITIONS.

Fds travel with PRECOPY and SECTIONS frames only (both have the same payload):
the frame's first byte carries them (one sendmsg per Chunk), so on the receiving
side they show up in the read that delivers that byte. The decoder counts them
into a pool and each such frame, once complete, claims its share in order of
arrival.
"""

import enum
import json
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

MAGIC = b"FDMG"
VERSION = 1
HEADER = struct.Struct("!4sHHII")
MAX_FRAME = 1 << 20
# fdmig.fdpass.MAX_FDS_PER_MSG (the kernel's SCM_MAX_FD), repeated here so that the
# codec does not import socket code: one frame's fds go out in one sendmsg.
MAX_FDS_PER_FRAME = 253

_MANIFEST_LEN = struct.Struct("!I")


class ProtocolError(Exception):
    pass


class LocalProtocolError(ProtocolError):
    """We (the caller) tried to do something the protocol does not allow: a bug here."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. The message is meant for a log line."""


class FrameType(enum.IntEnum):
    HELLO = 1
    TABLE = 2
    TABLE_END = 3
    ACCEPT = 4
    SECTIONS = 5
    END = 6
    ACK = 7
    RELEASED = 8
    ABORT = 9
    TAKEN = 10
    PRECOPY = 11
    PRECOPY_END = 12
    HELD = 13
    COUNTERS = 14


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"


class State(enum.Enum):
    START = "START"
    HELLO = "HELLO"
    TABLE = "TABLE"  # at least one TABLE frame, more may follow
    TABLE_DONE = "TABLE_DONE"  # TABLE_END seen: the target must now accept or abort
    ACCEPTED = "ACCEPTED"
    PRECOPY = "PRECOPY"  # at least one PRECOPY frame, more may follow
    PRECOPY_DONE = "PRECOPY_DONE"  # PRECOPY_END seen: the target must now say HELD or abort
    HELD = "HELD"
    TRANSFER = "TRANSFER"  # at least one SECTIONS frame, more may follow
    TRANSFER_DONE = "TRANSFER_DONE"  # END seen: the target must now ack or abort
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    TAKEN = "TAKEN"
    FAILED = "FAILED"


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = Sentinel.NEED_DATA

_S, _T = Role.SOURCE, Role.TARGET

# (state, who sends, frame type) -> the state after that frame. Anything missing
# is a protocol error.
TRANSITIONS: dict[tuple[State, Role, FrameType], State] = {
    (State.START, _S, FrameType.HELLO): State.HELLO,
    (State.HELLO, _S, FrameType.TABLE): State.TABLE,
    (State.TABLE, _S, FrameType.TABLE): State.TABLE,
    (State.TABLE, _S, FrameType.TABLE_END): State.TABLE_DONE,
    (State.TABLE_DONE, _T, FrameType.ACCEPT): State.ACCEPTED,
    (State.ACCEPTED, _S, FrameType.PRECOPY): State.PRECOPY,
    (State.PRECOPY, _S, FrameType.PRECOPY): State.PRECOPY,
    (State.ACCEPTED, _S, FrameType.PRECOPY_END): State.PRECOPY_DONE,
    (State.PRECOPY, _S, FrameType.PRECOPY_END): State.PRECOPY_DONE,
    (State.PRECOPY_DONE, _T, FrameType.HELD): State.HELD,
    (State.HELD, _S, FrameType.SECTIONS): State.TRANSFER,
    (State.TRANSFER, _S, FrameType.SECTIONS): State.TRANSFER,
    (State.HELD, _S, FrameType.END): State.TRANSFER_DONE,
    (State.TRANSFER, _S, FrameType.END): State.TRANSFER_DONE,
    (State.TRANSFER_DONE, _T, FrameType.ACK): State.COMMITTED,
    (State.COMMITTED, _S, FrameType.RELEASED): State.RELEASED,
    (State.RELEASED, _T, FrameType.TAKEN): State.TAKEN,
    # RELEASED's byte counts, right behind it (TargetInfo.counters_after): the
    # target may have said TAKEN meanwhile.
    (State.RELEASED, _S, FrameType.COUNTERS): State.RELEASED,
    (State.TAKEN, _S, FrameType.COUNTERS): State.TAKEN,
}
# Either side may give up until the target has acked; after that the handoff has
# happened and there is nothing left to abort.
TRANSITIONS.update(
    {
        (state, role, FrameType.ABORT): State.FAILED
        for state in State
        if state not in (State.COMMITTED, State.RELEASED, State.TAKEN, State.FAILED)
        for role in Role
    }
)


# TRANSITIONS follows one conversation state, but a frame can cross one going the
# other way. The crossing that matters: the source gives up (a timeout, say) and
# sends ABORT while the target's ACK is on its way. The source never read the ACK,
# so it rolls back; the target must too. Hence the commit point is the source
# reading ACK, the target touches nothing it received until RELEASED (or the
# source's exit), and an ABORT the target receives in COMMITTED is this crossing
# (a source that has read ACK cannot send ABORT). Only ever applied to frames
# received, never to frames sent.
CROSSED_TRANSITIONS: dict[tuple[State, Role, FrameType], State] = {
    (State.COMMITTED, _S, FrameType.ABORT): State.FAILED,
}


# ---------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Hello:
    """SOURCE: who is handing over. `version` is fdmig's package version, for the
    log only; the wire version is in every frame header."""

    name: str
    pid: int
    version: str


@dataclass(frozen=True)
class Table:
    """SOURCE: what the target must set up before taking the state over. Each
    chardev is a JSON-able mapping with a str "id". Sent in as many events as the
    sender likes, as sections are: with `more` only their frames go (the first
    event's capabilities are the table's), the last event ends the table.
    Received, it is one event at the end."""

    capabilities: Mapping[str, bool]
    chardevs: tuple[Mapping[str, Any], ...]
    more: bool = False

    def __post_init__(self):
        object.__setattr__(self, "chardevs", tuple(self.chardevs))


@dataclass(frozen=True)
class Accept:
    """TARGET: the table is acceptable; send the state. `info` is a JSON object
    about the target (pid, ...), for the source's status and log."""

    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> "TargetInfo":
        """`info`, checked and typed (RemoteProtocolError if malformed; the codec
        has checked a received one already)."""
        return TargetInfo.decode(self.info)


@dataclass(slots=True)  # not frozen: that makes one twice as slow, thousands in a downtime
class Section:
    """One chardev's state. Sent, `fds` maps a role ("conn", "listener", ...) to a
    real fd to attach; received, to an index into the list of fds received on this
    channel (0-based, in order of arrival)."""

    label: str
    meta: Mapping[str, Any]
    outbuf: bytes = b""
    fds: Mapping[str, int] = field(default_factory=dict)

    def state(self, now: float) -> "SectionState":
        """`meta`, checked and typed; `now` (time.time()) bounds connected-since."""
        return SectionState.decode(self.meta, now, self.label)


@dataclass(frozen=True)
class _Sections:
    """Sections, sent in as many events as the sender likes: with `more` the codec
    sends only their frames, and the last event (`more` false) sends the rest and
    the end frame, which counts them all. Received, it is one event at the end."""

    sections: tuple[Section, ...]
    more: bool = False

    def __post_init__(self):
        object.__setattr__(self, "sections", tuple(self.sections))


@dataclass(frozen=True)
class Precopy(_Sections):
    """SOURCE, still serving: the fds of the moved chardevs, with no state, for the
    target to check and hold (never read) before the source quiesces."""


@dataclass(frozen=True)
class Transfer(_Sections):
    """SOURCE, quiesced: the state of every chardev, with the fds PRECOPY did not
    carry (connections made or changed since)."""


@dataclass(frozen=True)
class Held:
    """TARGET: every PRECOPY fd is checked and held; the source may quiesce."""


@dataclass(frozen=True)
class Ack:
    """TARGET: it can take everything over. The commit point, once the source has
    read it (see CROSSED_TRANSITIONS)."""


@dataclass(frozen=True)
class Released:
    """SOURCE, after the commit: it has let go of the instance's control path.
    `info` is a JSON object (timings, ...) for the target's status and log."""

    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def release(self) -> "ReleaseInfo":
        """`info`, typed; junk is dropped, never raised (see ReleaseInfo)."""
        return ReleaseInfo.decode(self.info)


@dataclass(frozen=True)
class Abort:
    """Either side, before the commit: the migration is off."""

    reason: str


@dataclass(frozen=True)
class Counters:
    """SOURCE, right after RELEASED, to a target that asked for them so
    (TargetInfo.counters_after): the byte counts RELEASED would have carried,
    [label, rx, tx] each (ReleaseInfo.counters), out of the downtime's way."""

    counters: list = field(default_factory=list)


@dataclass(frozen=True)
class Taken:
    """TARGET, after RELEASED and before it reads anything: it owns the connections."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the channel (receive_data(b"")) between frames."""


Event = Union[Hello, Table, Accept, Precopy, Held, Transfer, Ack, Released, Counters, Taken, Abort, ConnectionClosed]


@dataclass(frozen=True)
class Chunk:
    """Bytes for one sendmsg(), with the fds that must ride on its first byte."""

    data: bytes
    fds: tuple[int, ...] = ()


_FD_FRAMES = (FrameType.PRECOPY, FrameType.SECTIONS)
_TABLE_SLICE = 512  # chardevs per json call when encoding a TABLE
_EMPTY_FRAMES = {Held: FrameType.HELD, Ack: FrameType.ACK, Taken: FrameType.TAKEN}
_EMPTY_EVENTS = {ftype: kind for kind, ftype in _EMPTY_FRAMES.items()}


# ---------------------------------------------------------------------------
# Payload helpers. `error` is the exception class to raise: LocalProtocolError when
# checking what we send, RemoteProtocolError when checking what we received.


def _dumps(obj: Any) -> bytes:
    # Compact, strict JSON (no NaN), as UTF-8.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _loads(ftype: FrameType, payload: bytes) -> Any:
    # json.loads(bytes) would guess UTF-16/32 too; the wire says UTF-8.
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"bad JSON in {ftype.name} frame: not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        # RecursionError: a peer can nest arrays deeper than the parser's stack.
        raise RemoteProtocolError(f"bad JSON in {ftype.name} frame: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def show(value: Any) -> str:
    """Peer data in an error message or a log line: a short string's repr, else
    the type's name; never the repr() of a structure a peer may have nested deep
    enough to blow the stack."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."
    return type(value).__name__


_KIND_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list"}


def _field(obj: dict, key: str, kind: type, where: str, error: type[ProtocolError]) -> Any:
    if key not in obj:
        raise error(f"{where}: missing {key!r}")
    value = obj[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise error(f"{where}: {key!r} must be {_KIND_NAMES[kind]}, not {type(value).__name__}")
    return value


def _object(ftype: FrameType, payload: bytes) -> dict:
    obj = _loads(ftype, payload)
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{ftype.name} frame: payload must be a JSON object")
    return obj


def _check_capabilities(caps: Any, error: type[ProtocolError]) -> dict:
    if not isinstance(caps, Mapping):
        raise error("capabilities must be a mapping of str to bool")
    for key, value in caps.items():
        if not isinstance(key, str) or not isinstance(value, bool):
            raise error(f"capability {show(key)}: must map a str to a bool, not to {show(value)}")
    return dict(caps)


def _check_chardev(index: int, chardev: Any, error: type[ProtocolError]) -> None:
    if not isinstance(chardev, Mapping):
        raise error(f"chardev #{index} must be a mapping, not {type(chardev).__name__}")
    if not isinstance(chardev.get("id"), str):
        raise error(f"chardev #{index}: 'id' must be a string")
    if "x-fds" in chardev:
        # Checked here, for every chardev of a TABLE either way, so that the
        # target may count the fds to come without checking each entry again.
        entry_fds(chardev, error)


# ---------------------------------------------------------------------------
# Payloads: what Accept.info, Released.info and Section.meta hold, typed. The
# events keep the raw mappings (they compare and round-trip as sent); these are
# what the code above reads from them, each field checked once, here.

STREAM_FLAGS = ("eof-read", "eof-pending", "eof-sent", "closing")
_ABSENT = object()


def _show_number(value: Any) -> str:
    # A number in a message as itself (a bad pid of 0 reads better than "int"),
    # unless it is too long to be worth printing, or to be printed at all: str()
    # of an int past sys.get_int_max_str_digits() raises.
    if isinstance(value, (int, float)) and -1e18 < value < 1e18:
        return repr(value)
    return show(value)


@dataclass(frozen=True)
class TargetInfo:
    """Accept.info: who the target is. `pid` is None if it did not say (the source
    then tells systemd nothing); `exec`, it hands the fds on to a program instead
    of serving them; `control`, it serves a control socket afterwards; `stdio`,
    it takes up the source's stdout and stderr at the commit (a target that
    `migrate-out --spawn` started: the instance's log goes where it went);
    `tcp_precopy`, over TCP it stages a chardev whose connection moves with its
    TCP state from a precopy section (fdmig.migration.repair.LATER), so that
    the downtime carries only the connection's state (a target that does not
    say so gets none: the chardev's whole section comes inside the downtime);
    `counters_after`, it takes RELEASED's byte counts in a COUNTERS frame of
    their own, right behind it (a target that does not say so gets them in
    RELEASED, inside the downtime)."""

    pid: int | None = None
    exec: bool = False
    control: bool = True
    stdio: bool = False
    tcp_precopy: bool = False
    counters_after: bool = False

    @classmethod
    def decode(cls, info: Mapping, error: type[ProtocolError] = RemoteProtocolError) -> "TargetInfo":
        """Raises `error` for a field of the wrong type. Unknown keys are ignored:
        a newer target may say more."""
        if not isinstance(info, Mapping):
            raise error(f"ACCEPT info must be an object, not {type(info).__name__}")
        pid = info.get("pid")
        if pid is not None and not (_is_int(pid) and pid > 0):
            # The source hands this pid to systemd as MAINPID: never 0, -1 or junk.
            raise error(f"ACCEPT info: pid {_show_number(pid)} is not a process id")
        flags = []
        for key, default in (("exec", False), ("control", True), ("stdio", False), ("tcp-precopy", False),
                             ("counters-after", False)):
            value = info.get(key, default)
            if not isinstance(value, bool):
                raise error(f"ACCEPT info: {key!r} must be a bool, not {type(value).__name__}")
            flags.append(value)
        return cls(pid, *flags)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "exec": self.exec, "control": self.control, "stdio": self.stdio,
                "tcp-precopy": self.tcp_precopy, "counters-after": self.counters_after}


@dataclass(frozen=True)
class ReleaseInfo:
    """Released.info: the source's timings (time.monotonic() values, meaningful to
    a target on the same host), the byte counts of chardevs that moved bytes
    since the precopy (counters are (label, rx, tx)) and `served`, the streaming
    chardevs (SectionState.streaming) as indices into the TABLE, longest unserved
    first: the order in which the target starts serving them (see order())."""

    quiesce_at: float | None = None
    started_at: float | None = None
    setup_ms: float | None = None
    counters: tuple[tuple[str, int, int], ...] = ()
    served: tuple[int, ...] = ()
    ignored: tuple[str, ...] = ()  # show() of each malformed counter, for the log
    counters_after: bool = False  # the counters come in a COUNTERS frame behind RELEASED

    @staticmethod
    def order(info: Mapping, size: int) -> list[int]:
        """`served` of a RELEASED's info, if it is a list of indices below `size`;
        else none (an order is an optimisation: junk there loses nothing). The
        target resumes by it, before it decodes the rest: checked in C."""
        served = info.get("served") if isinstance(info, Mapping) else None
        if type(served) is list and served and set(map(type, served)) == {int} and min(served) >= 0 \
                and max(served) < size:
            return served
        return []

    @classmethod
    def decode(cls, info: Mapping) -> "ReleaseInfo":
        """Never raises: RELEASED comes after the commit, when refusing would lose
        the migration for the sake of a statistic. A malformed field is dropped, a
        malformed counter too and named in `ignored`."""
        if not isinstance(info, Mapping):
            return cls()
        quiesce_at, started_at, setup_ms = info.get("quiesce-at"), info.get("started-at"), info.get("setup-ms")
        counters, ignored = [], []
        entries = info.get("counters")
        if entries is not None and not isinstance(entries, list):
            ignored.append(show(entries))  # no list of counts at all: named in the log too
        # Inside the downtime, one entry per chardev that moved bytes: exact type
        # checks (no bool passes `type(x) is int`).
        for entry in entries if isinstance(entries, list) else ():
            if (type(entry) is list and len(entry) == 3 and type(entry[0]) is str
                    and type(entry[1]) is int and type(entry[2]) is int and entry[1] >= 0 and entry[2] >= 0):
                counters.append((entry[0], entry[1], entry[2]))
            else:
                ignored.append(show(entry))
        return cls(
            quiesce_at=quiesce_at if type(quiesce_at) is float else None,
            started_at=started_at if type(started_at) is float else None,
            setup_ms=setup_ms if isinstance(setup_ms, (int, float)) and not isinstance(setup_ms, bool) else None,
            counters=tuple(counters),
            served=tuple(cls.order(info, sys.maxsize)),
            ignored=tuple(ignored),
            counters_after=info.get("counters-after") is True,
        )

    def to_dict(self) -> dict:
        return self.info(self.quiesce_at, self.started_at, self.setup_ms, [list(c) for c in self.counters],
                         list(self.served), self.counters_after)

    @staticmethod
    def info(quiesce_at, started_at, setup_ms, counters: list, served: list = (), counters_after=False) -> dict:
        """to_dict() of the ReleaseInfo these fields would make, with `counters` as
        [label, rx, tx] lists, taken as they are: the source sends this inside
        the downtime, with one counter per chardev that moved bytes, unless
        `counters_after` (then they follow in COUNTERS, and `counters` is [])."""
        info = {"quiesce-at": quiesce_at, "started-at": started_at, "counters": counters, "setup-ms": setup_ms,
                "served": list(served)}
        if counters_after:
            info["counters-after"] = True
        return info


def _count(value: Any) -> int:
    return value if _is_int(value) and value >= 0 else 0


def _since(value: Any, now: float) -> float | None:
    # A time in the future (another clock, or junk) is no better than none.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= now:
        return float(value)
    return None


def _peer(value: Any) -> tuple | None:
    if (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
            and (value[1] is None or _is_int(value[1])) and (value[2] is None or isinstance(value[2], str))):
        return tuple(value)
    return None


def _roles_ok(roles: Any) -> bool:
    if not isinstance(roles, list):
        return False
    for role in roles:
        if not isinstance(role, str) or not role:
            return False
    # Most lists here hold one role: no set to build for those.
    return len(roles) < 2 or len(set(roles)) == len(roles)


def _section(label: Any) -> str:
    return f"section {show(label)}" if label is not None else "section"


def _check_held(label: Any, held: Any, error: type[ProtocolError] = RemoteProtocolError) -> tuple[str, ...]:
    if not _roles_ok(held):
        raise error(f"{_section(label)}: 'held' must be a list of distinct fd roles")
    return tuple(held)


@dataclass(frozen=True, slots=True)
class SectionState:
    """Section.meta: one chardev's state as it travels. `peer` is (address, pid or
    None, process name or None); `stream`, which of STREAM_FLAGS are set (in that
    order); `held`, the roles of the sockets the target holds from the precopy,
    which this section keeps instead of sending again; `streaming`, that its peer
    was served since the migration began: the target gives its fd its events in
    its epoll only at the resume, in the order it is then given (RELEASED's
    `served`); the others' are watched at once, out of the downtime."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    migrations: int = 0
    connected_since: float | None = None
    peer: tuple | None = None
    stream: tuple[str, ...] = ()
    held: tuple[str, ...] = ()
    streaming: bool = False

    @classmethod
    def decode(cls, meta: Mapping, now: float, label: str | None = None) -> "SectionState":
        """Lenient but for `held`: a count, time or peer of the wrong type becomes
        the default (the chardev moves on without it), a stream flag it does not
        know is dropped. `held` decides which fds the target keeps, so junk there
        is a RemoteProtocolError (naming `label`, if given)."""
        # Called for every section inside a migration's downtime: each field is
        # taken in a type check or two, and only junk goes the slow way.
        if type(meta) is not dict and not isinstance(meta, Mapping):
            raise RemoteProtocolError(f"{_section(label)}: meta must be an object, not {type(meta).__name__}")
        get = meta.get
        rx, tx, migrations = get("rx-bytes", 0), get("tx-bytes", 0), get("migrations", 0)
        if not (type(rx) is int and type(tx) is int and type(migrations) is int
                and rx >= 0 and tx >= 0 and migrations >= 0):
            rx, tx, migrations = _count(rx), _count(tx), _count(migrations)
        since = get("connected-since")
        if since is not None and not (type(since) is float and 0.0 < since <= now):
            since = _since(since, now)
        peer = get("peer")
        if peer is not None:
            if (type(peer) is list and len(peer) == 3 and type(peer[0]) is str
                    and (type(peer[1]) is int or peer[1] is None) and (type(peer[2]) is str or peer[2] is None)):
                peer = (peer[0], peer[1], peer[2])
            else:
                peer = _peer(peer)
        stream = get("stream")
        stream = tuple(flag for flag in STREAM_FLAGS if flag in stream) if isinstance(stream, list) else ()
        held = get("held", _ABSENT)
        held = () if held is _ABSENT else _check_held(label, held)
        return cls(rx, tx, migrations, since, peer, stream, held, get("streaming") is True)

    def to_meta(self) -> dict:
        return self.meta(self.rx_bytes, self.tx_bytes, self.migrations, self.connected_since, self.peer,
                         self.stream, self.held, self.streaming)

    @staticmethod
    def meta(rx_bytes, tx_bytes, migrations, connected_since, peer, stream, held, streaming=False) -> dict:
        """to_meta() of the SectionState these fields would make, without making it:
        the source builds thousands inside a migration's downtime."""
        meta = {"rx-bytes": rx_bytes, "tx-bytes": tx_bytes, "connected-since": connected_since,
                "migrations": migrations, "peer": list(peer) if peer is not None else None}
        if stream:
            meta["stream"] = list(stream)
        if held:
            meta["held"] = list(held)
        if streaming:
            meta["streaming"] = True
        return meta


# A `run` instance's service travels in sections of its own, after the chardevs'
# in a TRANSFER: labels that cannot be chardev ids (those begin with a letter).
SERVICE_SECTION = "#service"  # its state, and its notify socket as fd "notify"
STORED_SECTION = "#stored-"  # + an index: one stored fd each, as fd "fd", in the order stored
STDIO_SECTION = "#stdio"  # the source's stdout and stderr, as fds "stdout" and "stderr"
STDIO = {"stdout": 1, "stderr": 2}
RESTART_POLICIES = ("no", "on-failure", "always")
MAX_DRAINING = 1024  # draining generations a service's section may name


@dataclass(frozen=True)
class ServiceState:
    """A `run` instance's service: what the target needs to supervise the running
    process, hear it and restart it. Strict: it arrives before the commit, so junk
    fails the migration, rolled back."""

    argv: tuple[str, ...]
    pid: int | None
    state: str
    ready: bool
    status_text: str | None
    restarts: int
    notify_ready: bool
    restart: str
    stop_signal: int
    stop_timeout: float
    fdstore_max: int
    fdstore_refused: int
    # --overlap, --ready-delay, and the generations that drain: (pid, since,
    # kill_at, killed: sent SIGKILL already), times as time.time() gives them.
    # Optional on the wire.
    overlap: bool = False
    ready_delay: float = 1.0
    draining: tuple[tuple[int, float, float, bool], ...] = ()

    def to_meta(self) -> dict:
        return {"argv": list(self.argv), "pid": self.pid, "state": self.state, "ready": self.ready,
                "status-text": self.status_text, "restarts": self.restarts, "notify": self.notify_ready,
                "restart": self.restart, "stop-signal": self.stop_signal, "stop-timeout": self.stop_timeout,
                "fdstore-max": self.fdstore_max, "fdstore-refused": self.fdstore_refused,
                "overlap": self.overlap, "ready-delay": self.ready_delay,
                "draining": [{"pid": pid, "since": since, "kill-at": kill_at, "killed": killed}
                             for pid, since, kill_at, killed in self.draining]}

    @classmethod
    def decode(cls, meta: Mapping) -> "ServiceState":
        where = "the service's section"
        argv = _field(meta, "argv", list, where, RemoteProtocolError)
        if not argv or not all(isinstance(arg, str) for arg in argv):
            raise RemoteProtocolError(f"{where}: 'argv' must be a non-empty list of strings")
        pid = meta.get("pid")
        if pid is not None and not (_is_int(pid) and pid > 0):
            raise RemoteProtocolError(f"{where}: pid {_show_number(pid)} is not a process id")
        status_text = meta.get("status-text")
        if status_text is not None and not isinstance(status_text, str):
            raise RemoteProtocolError(f"{where}: 'status-text' must be a string")
        restart = _field(meta, "restart", str, where, RemoteProtocolError)
        if restart not in RESTART_POLICIES:
            raise RemoteProtocolError(f"{where}: restart policy {show(restart)} is not one of "
                                      f"{', '.join(RESTART_POLICIES)}")
        timeout = meta.get("stop-timeout")
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
            raise RemoteProtocolError(f"{where}: 'stop-timeout' must be a positive number")
        flags = {}
        for key in ("ready", "notify"):
            flags[key] = meta.get(key)
            if not isinstance(flags[key], bool):
                raise RemoteProtocolError(f"{where}: {key!r} must be a bool")
        counts = {}
        for key in ("restarts", "stop-signal", "fdstore-max", "fdstore-refused"):
            counts[key] = _field(meta, key, int, where, RemoteProtocolError)
            if counts[key] < 0:
                raise RemoteProtocolError(f"{where}: {key!r} must not be negative")
        overlap = meta.get("overlap", False)
        if not isinstance(overlap, bool):
            raise RemoteProtocolError(f"{where}: 'overlap' must be a bool")
        ready_delay = meta.get("ready-delay", 1.0)
        if not (isinstance(ready_delay, (int, float)) and not isinstance(ready_delay, bool) and ready_delay >= 0):
            raise RemoteProtocolError(f"{where}: 'ready-delay' must be a number, 0 or more")
        return cls(tuple(argv), pid, _field(meta, "state", str, where, RemoteProtocolError), flags["ready"],
                   status_text, counts["restarts"], flags["notify"], restart, counts["stop-signal"], float(timeout),
                   counts["fdstore-max"], counts["fdstore-refused"], overlap, float(ready_delay),
                   _draining(meta.get("draining", []), where))


def _draining(entries: Any, where: str) -> tuple[tuple[int, float, float, bool], ...]:
    """The draining generations of a service's section: a pid each, and when its
    drain began and its SIGKILL is due."""
    if not isinstance(entries, list) or len(entries) > MAX_DRAINING:
        raise RemoteProtocolError(f"{where}: 'draining' must be a list of at most {MAX_DRAINING}")
    found = []
    for entry in entries:
        pid = entry.get("pid") if isinstance(entry, dict) else None
        if not (_is_int(pid) and pid > 0):
            raise RemoteProtocolError(f"{where}: a draining generation's pid {_show_number(pid)} is not a process id")
        times = [entry.get(key) for key in ("since", "kill-at")]
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1e12 for t in times):
            raise RemoteProtocolError(f"{where}: draining generation pid {pid}: 'since' and 'kill-at' must be times")
        killed = entry.get("killed", False)
        if not isinstance(killed, bool):
            raise RemoteProtocolError(f"{where}: draining generation pid {pid}: 'killed' must be a bool")
        found.append((pid, float(times[0]), float(times[1]), killed))
    return tuple(found)


@dataclass(frozen=True)
class StoredState:
    """One fd of a service's store: its name, whether it is watched for POLLHUP,
    when it was stored."""

    name: str
    poll: bool
    stored_at: float

    def to_meta(self) -> dict:
        return {"name": self.name, "poll": self.poll, "stored-at": self.stored_at}

    @classmethod
    def decode(cls, meta: Mapping) -> "StoredState":
        where = "a stored fd's section"
        name = _field(meta, "name", str, where, RemoteProtocolError)
        poll, stored_at = meta.get("poll"), meta.get("stored-at")
        if not isinstance(poll, bool):
            raise RemoteProtocolError(f"{where}: 'poll' must be a bool")
        if not (isinstance(stored_at, (int, float)) and not isinstance(stored_at, bool) and stored_at >= 0):
            raise RemoteProtocolError(f"{where}: 'stored-at' must be a time")
        return cls(name, poll, float(stored_at))


def entry_fds(entry: Mapping, error: type[ProtocolError] = RemoteProtocolError) -> int:
    """How many fds a TABLE chardev entry says will come for it ("x-fds": 0 for a
    chardev that moves none, up to a listener and a connection). The codec has
    checked every received entry, so this raises only for one it has not seen."""
    count = entry.get("x-fds", 0)
    if type(count) is int and 0 <= count <= 2:
        return count
    if _is_int(count) and 0 <= count <= 2:
        return int(count)
    raise error(f"chardev {show(entry.get('id'))}: 'x-fds' is {_show_number(count)}, not 0, 1 or 2")


def _describe(exc: BaseException) -> str:
    # repr() of an exception, for a message: its args may hold peer data, so
    # bounded, and a repr that fails is no reason to lose the original error.
    try:
        text = repr(exc)
    except Exception:
        text = type(exc).__name__ + "(...)"
    return text if len(text) <= 200 else text[:197] + "..."


def _header(ftype: FrameType, payload: bytes, nfds: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, len(payload), nfds)


# ---------------------------------------------------------------------------
# The codec


class MigrationCodec:
    """One end of the migration channel. `role` is which end we are."""

    def __init__(self, role: Role, max_frame: int = MAX_FRAME):
        if not 0 < max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be in 1..{0xFFFFFFFF}, not {max_frame}")
        self.role = role
        self.peer_role = Role.TARGET if role is Role.SOURCE else Role.SOURCE
        self.max_frame = max_frame
        self._state = State.START
        # How many fds the I/O layer reported, and how many complete frames took.
        # The I/O layer holds the fds themselves; on any error it closes them all.
        self.fds_received = 0
        self.fds_claimed = 0
        self._buf = bytearray()
        self._pos = 0  # start of the unparsed bytes in _buf: cut lazily, not per frame
        self._eof = False
        # A RemoteProtocolError's message, re-raised by every later next_event().
        self._error: str | None = None
        self._state_at_error = State.START
        self._abort_sent = False
        self._abort_received = False
        # Table and Transfer arrive over several frames, and surface as one event.
        self._capabilities: dict | None = None
        self._chardevs: list = []
        self._sections: list = []
        self._sections_taken = 0  # handed out early by take_sections()
        self._transfer_fds = 0
        # (sections, fds) sent so far by events with `more`, for the end frame's counts;
        # chardevs of the table so far, for TABLE_END's.
        self._sent = self._sending = (0, 0)
        self._table_sent = self._table_sending = 0

    @property
    def state(self) -> State:
        return self._state

    # -- sending ----------------------------------------------------------

    def send(self, event: Event) -> list[Chunk]:
        """The chunks that carry `event`, each meant for one sendmsg() with its fds.

        Raises LocalProtocolError, and changes nothing, if the event is malformed or
        not ours to send now.
        """
        frames = self._encode(event)
        state = self._state
        if isinstance(event, Abort) and self._error is not None and not self._abort_sent:
            # The peer broke the protocol; we may still tell it why we give up, if
            # an abort was allowed where things went wrong.
            state = self._state_at_error
        for ftype, _payload, _fds in frames:
            new_state = TRANSITIONS.get((state, self.role, ftype))
            if new_state is None:
                raise LocalProtocolError(
                    f"the {self.role.value} cannot send {ftype.name} in state {state.name}"
                )
            state = new_state
        self._state = state
        if isinstance(event, _Sections):
            self._sent = self._sending
        if isinstance(event, Table):
            self._table_sent = self._table_sending
        if isinstance(event, Abort):
            self._abort_sent = True
        return [Chunk(_header(ftype, payload, len(fds)) + payload, fds) for ftype, payload, fds in frames]

    def _encode(self, event: Event) -> list[tuple[FrameType, bytes, tuple[int, ...]]]:
        try:
            if isinstance(event, Hello):
                frames = [(FrameType.HELLO, self._encode_hello(event), ())]
            elif isinstance(event, Table):
                frames = self._encode_table(event)
            elif isinstance(event, Precopy):
                frames = self._encode_transfer(event, FrameType.PRECOPY, FrameType.PRECOPY_END)
            elif isinstance(event, Transfer):
                frames = self._encode_transfer(event, FrameType.SECTIONS, FrameType.END)
            elif isinstance(event, Abort):
                if not isinstance(event.reason, str):
                    raise LocalProtocolError("Abort.reason must be a string")
                frames = [(FrameType.ABORT, _dumps({"reason": event.reason}), ())]
            elif isinstance(event, (Accept, Released)):
                if not isinstance(event.info, Mapping):
                    raise LocalProtocolError(f"{type(event).__name__}.info must be a mapping")
                if isinstance(event, Accept):
                    TargetInfo.decode(event.info, LocalProtocolError)  # what the source will check
                ftype = FrameType.ACCEPT if isinstance(event, Accept) else FrameType.RELEASED
                frames = [(ftype, _dumps({"info": dict(event.info)}), ())]
            elif isinstance(event, Counters):
                if not isinstance(event.counters, list):
                    raise LocalProtocolError("Counters.counters must be a list")
                frames = [(FrameType.COUNTERS, _dumps({"counters": event.counters}), ())]
            elif isinstance(event, (Held, Ack, Taken)):
                frames = [(_EMPTY_FRAMES[type(event)], b"{}", ())]
            else:
                raise LocalProtocolError(f"cannot send {event!r}")
        except (TypeError, ValueError) as exc:
            # Not JSON-able: a set, bytes, NaN, a lone surrogate...
            raise LocalProtocolError(f"cannot encode {type(event).__name__}: {exc}") from None
        for ftype, payload, _fds in frames:
            if len(payload) > self.max_frame:
                raise LocalProtocolError(
                    f"{ftype.name} frame of {len(payload)} bytes exceeds the {self.max_frame}-byte bound"
                )
        return frames

    @staticmethod
    def _encode_hello(hello: Hello) -> bytes:
        if not isinstance(hello.name, str) or not isinstance(hello.version, str):
            raise LocalProtocolError("Hello.name and Hello.version must be strings")
        if not _is_int(hello.pid) or hello.pid <= 0:
            raise LocalProtocolError(f"Hello.pid must be a positive integer, not {hello.pid!r}")
        return _dumps({"name": hello.name, "pid": hello.pid, "version": hello.version})

    def _encode_table(self, table: Table) -> list:
        capabilities = _check_capabilities(table.capabilities, LocalProtocolError)
        chardevs = list(table.chardevs)
        for index, chardev in enumerate(chardevs):
            _check_chardev(index, chardev, LocalProtocolError)
        # The first frame carries the capabilities, then as many chardevs per frame
        # as fit. One json call per frame, not per chardev: a table of thousands is
        # encoded inside the loop that serves them.
        frames: list = []
        at_start = self._state is State.HELLO
        first = b'{"capabilities":' + _dumps(capabilities) + b',"chardevs":'

        def table_frame(part: list):
            return self._table_frame(part, b'{"chardevs":' if frames or not at_start else first)

        # A table of no chardevs is still one frame, for its capabilities.
        for start in range(0, max(len(chardevs), 1 if at_start else 0), _TABLE_SLICE):
            self._fit(chardevs[start : start + _TABLE_SLICE], frames, table_frame)
        self._table_sending = self._table_sent + len(chardevs)
        if not table.more:
            frames.append((FrameType.TABLE_END, _dumps({"chardevs": self._table_sending}), ()))
        return frames

    @classmethod
    def _fit(cls, items: list, frames: list, frame_of) -> None:
        """Append the frame `frame_of(items)` makes, or, if it says the frame would
        be too big (None), the frames of each half of `items`, recursively.
        frame_of raises for a single item that cannot fit."""
        frame = frame_of(items)
        if frame is not None:
            frames.append(frame)
            return
        half = len(items) // 2
        cls._fit(items[:half], frames, frame_of)
        cls._fit(items[half:], frames, frame_of)

    def _table_frame(self, chardevs: list, prefix: bytes):
        """A TABLE frame of `chardevs` after `prefix`, or None if too big."""
        try:
            body = _dumps([dict(chardev) for chardev in chardevs])
        except (TypeError, ValueError):
            for chardev in chardevs:  # name the one that cannot be encoded
                try:
                    _dumps(dict(chardev))
                except (TypeError, ValueError) as exc:
                    raise LocalProtocolError(f"chardev {chardev['id']!r}: {exc}") from None
            raise
        payload = prefix + body + b"}"
        if len(payload) <= self.max_frame or not chardevs:
            # No chardev to split off: _encode refuses a frame over the bound, as any.
            return FrameType.TABLE, payload, ()
        if len(chardevs) > 1:
            return None
        raise LocalProtocolError(
            f"chardev {chardevs[0]['id']!r} needs a TABLE frame of {len(payload)} bytes; the bound is {self.max_frame}"
        )

    def _encode_transfer(self, transfer: _Sections, ftype: FrameType, end: FrameType) -> list:
        """`ftype` (SECTIONS or PRECOPY) frames of at most MAX_FDS_PER_FRAME fds and
        max_frame bytes, then `end` unless more are to come. Each frame's manifest
        is encoded in one json call: with thousands of sections, per-section
        encoding was most of a migration's downtime."""
        frames: list = []
        group: list = []
        group_fds = group_bytes = total_fds = 0

        def sections_frame(rows: list):
            return self._sections_frame(rows, ftype)

        budget = self.max_frame // 2  # outbuf bytes per frame; the manifest gets the rest
        for section in transfer.sections:
            roles, section_fds = self._check_section(section)
            meta = section.meta if isinstance(section.meta, dict) else dict(section.meta)
            row = ({"label": section.label, "meta": meta, "outbuf": len(section.outbuf), "fds": roles},
                   section.outbuf, section_fds)
            if group and (group_fds + len(section_fds) > MAX_FDS_PER_FRAME or group_bytes + len(section.outbuf) > budget):
                self._fit(group, frames, sections_frame)
                group, group_fds, group_bytes = [], 0, 0
            group.append(row)
            group_fds += len(section_fds)
            group_bytes += len(section.outbuf)
            total_fds += len(section_fds)
        if group:
            self._fit(group, frames, sections_frame)
        sections, fds = self._sent[0] + len(transfer.sections), self._sent[1] + total_fds
        if transfer.more:
            self._sending = (sections, fds)  # committed by send() once the frames are allowed
        else:
            self._sending = (0, 0)
            frames.append((end, _dumps({"sections": sections, "fds": fds}), ()))
        return frames

    def _sections_frame(self, rows: list, ftype: FrameType):
        """An `ftype` frame of `rows`, or None if too big."""
        try:
            manifest = _dumps([entry for entry, _, _ in rows])
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"sections {rows[0][0]['label']!r}...: {exc}") from None
        payload_size = _MANIFEST_LEN.size + len(manifest) + sum(len(outbuf) for _, outbuf, _ in rows)
        fds = [fd for _, _, section_fds in rows for fd in section_fds]
        if payload_size <= self.max_frame and len(fds) <= MAX_FDS_PER_FRAME:
            payload = _MANIFEST_LEN.pack(len(manifest)) + manifest + b"".join(outbuf for _, outbuf, _ in rows)
            return ftype, payload, tuple(fds)
        if len(rows) > 1:
            return None
        raise LocalProtocolError(
            f"section {rows[0][0]['label']!r} needs a {ftype.name} frame of {payload_size} bytes and "
            f"{len(fds)} fds; the bounds are {self.max_frame} bytes and {MAX_FDS_PER_FRAME} fds"
        )

    @staticmethod
    def _check_section(section: Any) -> tuple[list[str] | tuple, list[int] | tuple]:
        if not isinstance(section, Section):
            raise LocalProtocolError(f"Transfer.sections holds {type(section).__name__}, not Section")
        if not isinstance(section.label, str):
            raise LocalProtocolError(f"section label {section.label!r} must be a string")
        # A dict first: the ABC's check costs four times as much, thousands of times in a downtime.
        if type(section.meta) is not dict and not isinstance(section.meta, Mapping):
            raise LocalProtocolError(f"section {section.label!r}: meta must be a mapping")
        if not isinstance(section.outbuf, (bytes, bytearray)):
            raise LocalProtocolError(f"section {section.label!r}: outbuf must be bytes")
        if "held" in section.meta:
            _check_held(section.label, section.meta["held"], LocalProtocolError)  # what the target will check
        if not section.fds:
            return (), ()  # a TCP connection's state, or a chardev the target holds: most, in a downtime
        roles, fds = [], []
        for role, fd in section.fds.items():
            if not isinstance(role, str) or not role:
                raise LocalProtocolError(f"section {section.label!r}: fd role {role!r} must be a non-empty string")
            if not _is_int(fd) or fd < 0:
                raise LocalProtocolError(f"section {section.label!r}: fd {role!r} is {fd!r}, not an fd")
            roles.append(role)
            fds.append(fd)
        return roles, fds

    # -- receiving --------------------------------------------------------

    def receive_data(self, data: bytes, nfds: int = 0) -> None:
        """Feed bytes read from the channel, and how many fds came with them.

        b"" means EOF. Fds ride on the first byte of their frame, so report them
        with the read that returned them; the decoder takes them as the frames they
        belong to complete.
        """
        if nfds < 0:
            raise LocalProtocolError(f"nfds must be >= 0, not {nfds}")
        self.fds_received += nfds
        if self._eof and (data or nfds):
            raise LocalProtocolError("received data after EOF")
        if self._error is not None:
            return
        if data:
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Union[Event, Sentinel]:
        """The next event from the peer, or NEED_DATA.

        Raises RemoteProtocolError if the peer broke the protocol; the codec is
        then FAILED and raises the same error from every later call.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        try:
            while True:
                frame = self._next_frame()
                if frame is None:
                    break
                event = self._handle_frame(*frame)
                if event is not None:
                    return event
            if len(self._buf) > self._pos:
                return NEED_DATA
            # Every complete frame has taken its fds, and no byte of another frame
            # is here for the rest to ride with.
            stray = self.fds_received - self.fds_claimed
            if stray:
                raise RemoteProtocolError(f"{stray} fds arrived with no manifest entry")
        except RemoteProtocolError as exc:
            self._fail(str(exc))
            raise
        except BaseException as exc:
            # A bug of ours while decoding (as h11 does): the frame may be half
            # applied, so the codec cannot go on. The caller sees the original
            # exception now, and a RemoteProtocolError (it fails the migration as
            # any other) from every later call.
            self._fail(f"the codec failed earlier: {_describe(exc)}")
            raise
        return ConnectionClosed() if self._eof else NEED_DATA

    def _fail(self, message: str) -> None:
        self._error = message
        self._state_at_error = self._state
        self._state = State.FAILED

    def _next_frame(self) -> tuple[FrameType, int, bytes] | None:
        buf, pos = self._buf, self._pos
        have = len(buf) - pos
        if have < HEADER.size:
            # Reject a stranger (an HTTP client, say) as soon as its first bytes
            # differ, without waiting for a header it may never send.
            head = bytes(buf[pos : pos + len(MAGIC)])
            if head != MAGIC[: len(head)]:
                raise RemoteProtocolError(f"not an fdmig migration stream (bad magic {head!r})")
            if have and self._eof:
                raise RemoteProtocolError(f"connection closed mid-frame ({have} bytes of a header)")
            return None
        magic, version, raw_type, length, nfds = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise RemoteProtocolError(f"not an fdmig migration stream (bad magic {magic!r})")
        if version != VERSION:
            raise RemoteProtocolError(f"wire version {version} not supported (this fdmig speaks {VERSION})")
        try:
            ftype = FrameType(raw_type)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {raw_type}") from None
        # Checked before waiting for the payload: an oversized frame is refused
        # before we buffer it.
        if length > self.max_frame:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the {self.max_frame}-byte bound")
        if nfds and ftype not in _FD_FRAMES:
            raise RemoteProtocolError(f"{ftype.name} frame claims {nfds} fds; only PRECOPY and SECTIONS "
                                      "frames carry fds")
        if nfds > MAX_FDS_PER_FRAME:
            raise RemoteProtocolError(f"{ftype.name} frame claims {nfds} fds; the bound is {MAX_FDS_PER_FRAME}")
        if not self._late_frames_expected():
            self._peer_transition(ftype)
        end = HEADER.size + length
        if have < end:
            if self._eof:
                raise RemoteProtocolError(
                    f"connection closed mid-frame ({have} of {end} bytes of a {ftype.name} frame)"
                )
            return None
        payload = bytes(buf[pos + HEADER.size : pos + end])
        self._pos = pos + end
        return ftype, nfds, payload

    def _late_frames_expected(self) -> bool:
        # We aborted; until the peer's own ABORT arrives, it may still have frames in
        # flight that it sent before seeing ours.
        return self._state is State.FAILED and self._abort_sent and not self._abort_received

    def _peer_transition(self, ftype: FrameType) -> State:
        key = (self._state, self.peer_role, ftype)
        new_state = TRANSITIONS.get(key) or CROSSED_TRANSITIONS.get(key)
        if new_state is None:
            message = f"{ftype.name} not allowed in state {self._state.name}"
            if not any(known[1:] == (self.peer_role, ftype) for known in TRANSITIONS):
                message += f" (a {self.peer_role.value} never sends {ftype.name})"
            raise RemoteProtocolError(message)
        return new_state

    def _check_fds_arrived(self, ftype: FrameType, nfds: int) -> None:
        # The frame is complete, so the read that brought its first byte, and its
        # fds with it, has been fed in.
        available = self.fds_received - self.fds_claimed
        if nfds > available:
            raise RemoteProtocolError(f"{ftype.name} frame claims {nfds} fds but {available} arrived")

    def _handle_frame(self, ftype: FrameType, nfds: int, payload: bytes) -> Event | None:
        if self._late_frames_expected():
            return self._handle_late_frame(ftype, nfds, payload)
        new_state = self._peer_transition(ftype)
        self._check_fds_arrived(ftype, nfds)
        first_fd = self.fds_claimed
        if ftype is FrameType.HELLO:
            event = self._decode_hello(payload)
        elif ftype is FrameType.TABLE:
            event = self._decode_table(payload)
        elif ftype is FrameType.TABLE_END:
            event = self._decode_table_end(payload)
        elif ftype in _FD_FRAMES:
            event = self._decode_sections(ftype, payload, nfds, first_fd)
        elif ftype in (FrameType.END, FrameType.PRECOPY_END):
            event = self._decode_end(ftype, payload)
        elif ftype is FrameType.ABORT:
            event = self._decode_abort(payload)
        elif ftype in _EMPTY_EVENTS:
            _object(ftype, payload)  # nothing in it yet, but it must be well-formed
            event = _EMPTY_EVENTS[ftype]()
        elif ftype is FrameType.COUNTERS:
            # Taken as they come, as RELEASED's: ReleaseInfo.decode() drops junk.
            event = Counters(_object(ftype, payload).get("counters"))
        else:
            event = self._decode_info(ftype, payload)
        # Only a frame that decoded cleanly takes its fds and moves the state.
        self.fds_claimed += nfds
        self._state = new_state
        return event

    def _handle_late_frame(self, ftype: FrameType, nfds: int, payload: bytes) -> Event | None:
        # Frames the peer sent before it saw our ABORT. Its own ABORT (it gave up
        # too) is passed on, for the log; the rest is dropped, even an ACK: the
        # target will see our ABORT in COMMITTED and let go (CROSSED_TRANSITIONS).
        # Dropped frames' fds count as claimed; the caller closes every fd it holds
        # on failure anyway.
        self._check_fds_arrived(ftype, nfds)
        self.fds_claimed += nfds
        if ftype is FrameType.ABORT:
            self._abort_received = True
            return self._decode_abort(payload)
        return None

    def _decode_hello(self, payload: bytes) -> Hello:
        obj = _object(FrameType.HELLO, payload)
        where = "HELLO frame"
        pid = _field(obj, "pid", int, where, RemoteProtocolError)
        if pid <= 0:
            raise RemoteProtocolError(f"HELLO frame: pid {pid} is not a process id")
        return Hello(
            name=_field(obj, "name", str, where, RemoteProtocolError),
            pid=pid,
            version=_field(obj, "version", str, where, RemoteProtocolError),
        )

    def _decode_table(self, payload: bytes) -> None:
        obj = _object(FrameType.TABLE, payload)
        if self._state is State.HELLO:
            caps = _field(obj, "capabilities", dict, "first TABLE frame", RemoteProtocolError)
            self._capabilities = _check_capabilities(caps, RemoteProtocolError)
        elif "capabilities" in obj:
            raise RemoteProtocolError("TABLE frame: capabilities belong in the first TABLE frame only")
        chardevs = _field(obj, "chardevs", list, "TABLE frame", RemoteProtocolError)
        for index, chardev in enumerate(chardevs, start=len(self._chardevs)):
            _check_chardev(index, chardev, RemoteProtocolError)
        self._chardevs.extend(chardevs)
        return None

    def _decode_table_end(self, payload: bytes) -> Table:
        obj = _object(FrameType.TABLE_END, payload)
        count = _field(obj, "chardevs", int, "TABLE_END frame", RemoteProtocolError)
        if count != len(self._chardevs):
            raise RemoteProtocolError(f"TABLE_END counts {count} chardevs but {len(self._chardevs)} arrived")
        table = Table(capabilities=self._capabilities, chardevs=tuple(self._chardevs))
        self._capabilities, self._chardevs = None, []
        return table

    def _decode_sections(self, ftype: FrameType, payload: bytes, nfds: int, first_fd: int) -> None:
        if len(payload) < _MANIFEST_LEN.size:
            raise RemoteProtocolError(f"{ftype.name} frame of {len(payload)} bytes has no manifest length")
        (manifest_len,) = _MANIFEST_LEN.unpack_from(payload)
        start = _MANIFEST_LEN.size + manifest_len
        if start > len(payload):
            raise RemoteProtocolError(
                f"{ftype.name} manifest of {manifest_len} bytes overruns its {len(payload)}-byte frame"
            )
        manifest = _loads(ftype, payload[_MANIFEST_LEN.size : start])
        if not isinstance(manifest, list):
            raise RemoteProtocolError(f"{ftype.name} frame: the manifest must be a list")
        offset, fd_index = start, first_fd
        sections = []
        for entry in manifest:
            # The common case in a few type checks; the slow path names what is wrong.
            if (type(entry) is dict and type(entry.get("label")) is str and type(entry.get("meta")) is dict
                    and type(entry.get("outbuf")) is int and type(entry.get("fds")) is list):
                label, meta, size, roles = entry["label"], entry["meta"], entry["outbuf"], entry["fds"]
            else:
                if not isinstance(entry, dict):
                    raise RemoteProtocolError(f"{ftype.name} frame: a manifest entry must be an object")
                where = f"{ftype.name} manifest entry"
                label = _field(entry, "label", str, where, RemoteProtocolError)
                where = f"{ftype.name} manifest entry {show(label)}"
                meta = _field(entry, "meta", dict, where, RemoteProtocolError)
                size = _field(entry, "outbuf", int, where, RemoteProtocolError)
                roles = _field(entry, "fds", list, where, RemoteProtocolError)
            if size < 0 or offset + size > len(payload):
                raise RemoteProtocolError(f"{ftype.name} manifest entry {show(label)}: outbuf of {size} bytes "
                                          "overruns the frame")
            if "held" in meta and not _roles_ok(meta["held"]):
                # Which fds the target keeps from the precopy: checked strictly,
                # here. The rest of meta is the target's to read (SectionState),
                # for only the sections it uses, and leniently.
                _check_held(label, meta["held"])  # raises
            fds = {}
            for role in roles:
                if type(role) is not str or not role or role in fds:
                    where = f"{ftype.name} manifest entry {show(label)}"
                    if not isinstance(role, str) or not role:
                        raise RemoteProtocolError(f"{where}: fd role {show(role)} must be a non-empty string")
                    raise RemoteProtocolError(f"{where}: fd role {show(role)} listed twice")
                fds[role] = fd_index
                fd_index += 1
            sections.append(Section(label=label, meta=meta, outbuf=payload[offset : offset + size], fds=fds))
            offset += size
        if offset != len(payload):
            raise RemoteProtocolError(f"{ftype.name} frame: {len(payload) - offset} bytes after the last outbuf")
        if fd_index - first_fd != nfds:
            raise RemoteProtocolError(
                f"{ftype.name} frame header claims {nfds} fds but its manifest lists {fd_index - first_fd}"
            )
        self._sections.extend(sections)
        self._transfer_fds += nfds
        return None

    def _decode_end(self, ftype: FrameType, payload: bytes) -> Precopy | Transfer:
        obj = _object(ftype, payload)
        where = f"{ftype.name} frame"
        count = _field(obj, "sections", int, where, RemoteProtocolError)
        nfds = _field(obj, "fds", int, where, RemoteProtocolError)
        stray = self.fds_received - self.fds_claimed
        if stray:
            # Checked here, not only once the buffer runs dry: the target acknowledges
            # on this event, and an fd nobody listed must be refused before that.
            raise RemoteProtocolError(f"{stray} fds arrived with no manifest entry")
        arrived = len(self._sections) + self._sections_taken
        if count != arrived or nfds != self._transfer_fds:
            raise RemoteProtocolError(
                f"{ftype.name} counts {count} sections and {nfds} fds but "
                f"{arrived} and {self._transfer_fds} arrived"
            )
        kind = Precopy if ftype is FrameType.PRECOPY_END else Transfer
        transfer = kind(sections=tuple(self._sections))
        self._sections, self._transfer_fds, self._sections_taken = [], 0, 0
        return transfer

    def take_sections(self) -> list[Section]:
        """The sections decoded so far while a Transfer is still arriving, each
        handed out once, so a receiver can work on them as they come. The Transfer
        event at END then holds only those not taken."""
        taken, self._sections = self._sections, []
        self._sections_taken += len(taken)
        return taken

    @staticmethod
    def _decode_info(ftype: FrameType, payload: bytes) -> Accept | Released:
        obj = _object(ftype, payload)
        info = obj.get("info", {})
        if not isinstance(info, dict):
            raise RemoteProtocolError(f"{ftype.name} frame: 'info' must be an object, not {type(info).__name__}")
        if ftype is FrameType.ACCEPT:
            # Checked before the source acts on it (a pid for systemd, say). Not
            # RELEASED's: it comes after the commit, and ReleaseInfo takes what it can.
            TargetInfo.decode(info)
            return Accept(info)
        return Released(info)

    @staticmethod
    def _decode_abort(payload: bytes) -> Abort:
        obj = _object(FrameType.ABORT, payload)
        return Abort(reason=_field(obj, "reason", str, "ABORT frame", RemoteProtocolError))
