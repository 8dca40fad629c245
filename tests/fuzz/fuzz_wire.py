#!/usr/bin/env python3
"""Atheris harness for fdmig.migration.wire.MigrationCodec.

The property: whatever bytes (and fd counts) arrive, in whatever chunks, the codec
raises nothing but RemoteProtocolError. Anything else is a bug, as is a codec
that breaks one of the few cheap invariants checked below (a failed codec keeps
failing with the same message; a decoded Section's fd indices point at fds that
did arrive; our own in-turn replies are always accepted).

One input drives one codec. The fuzzer's bytes are read with a
FuzzedDataProvider, which takes integers from the end of the input and bytes
from its front:

    role (TARGET or SOURCE), a valid prefix to start from (or none), max_frame,
    whether to close the channel at the end, whether to send ABORT after a
    RemoteProtocolError; then a loop of operations (op 0..10):
      0-6  read a chunk of the stream (its size; with 5 and 6, extra fds),
      7    EOF,
      8    send our own ABORT now (frames in flight then cross it),
      9    take_sections(),
      10   read one frame whose header the harness writes around the fuzzer's
           bytes (type, fds, payload length): mutating a payload's JSON then
           keeps its framing;
    after each one next_event() is drained, and when it is our turn (the target
    after TABLE_END, END or RELEASED; the source after ACCEPT or ACK) the
    provider picks: reply as the real side would, abort, or wait.

The stream the codec reads is the chosen prefix, a real conversation encoded by
the peer's codec (its fds reported with the read that brings each frame's
first byte), followed by the fuzzer's bytes. Prefixes take the fuzzer deep into
the state machine without having to guess a valid HELLO or TABLE first.

Run it:   python tests/fuzz/fuzz_wire.py tests/fuzz/corpus/wire -max_total_time=3600
Seeds:    python tests/fuzz/fuzz_wire.py --make-seeds tests/fuzz/corpus/wire
Replay:   python tests/fuzz/fuzz_wire.py path/to/crash-...   (runs that input once)

TestOneInput is importable without atheris: tests/test_fuzz.py replays the corpus
in-process with the pure-Python provider below, which matches atheris'.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzzcommon import PyDataProvider, atheris, decide, provider  # noqa: E402,F401
import fuzzcommon  # noqa: E402

if __name__ == "__main__" and atheris is not None and "--make-seeds" not in sys.argv:
    # Coverage comes from fdmig's bytecode: instrument it as it is imported.
    with atheris.instrument_imports(include=["fdmig"]):
        from fdmig.migration import wire
else:
    from fdmig.migration import wire

from fdmig.migration.wire import (  # noqa: E402 (the module is loaded above)
    NEED_DATA,
    Abort,
    Accept,
    Ack,
    ConnectionClosed,
    Held,
    Hello,
    LocalProtocolError,
    MigrationCodec,
    Precopy,
    Released,
    ReleaseInfo,
    RemoteProtocolError,
    Role,
    Section,
    SectionState,
    State,
    Table,
    Taken,
    TargetInfo,
    Transfer,
)


# ---------------------------------------------------------------------------
# The data provider




# ---------------------------------------------------------------------------
# Real conversations, encoded by the peer's codec


HELLO = Hello(name="web", pid=4242, version="0.1.0")
TABLE = Table(capabilities={"outbuf": True, "listener": True},
              chardevs=({"id": "c0", "backend": "socket", "path": "/run/c0.sock"}, {"id": "c1"}))
BIG_TABLE = Table(capabilities={"outbuf": True},
                  chardevs=tuple({"id": f"chardev{i}", "backend": "socket", "server": i % 2 == 0}
                                 for i in range(6)))
TRANSFER = Transfer(sections=(
    Section(label="c0", meta={"connected": True, "peer": "x"}, outbuf=b"pending\x00bytes",
            fds={"conn": 7, "listener": 8}),
    Section(label="c1", meta={}, outbuf=b"", fds={"listener": 9}),
    Section(label="c2", meta={"nested": {"a": [1, 2.5, None]}}, outbuf=b"\xff" * 5),
))
PRECOPY = Precopy(sections=(Section(label="c0", meta={}, fds={"conn": 5, "listener": 6}),))
ACCEPT = Accept({"pid": 77, "version": "0.1.0"})
RELEASED = Released({"downtime-ms": 1.5})
MAX_FRAMES = (wire.MAX_FRAME, 1024, 128)
NOW = 2e9  # the `now` of Section.state(): fixed, so that a replay decides as the run did


def _run(script, sender_frame=wire.MAX_FRAME):
    """Plays `script` [(side, event)] between a source and a target codec; returns
    what each side sent as [(bytes, nfds, waits)], one entry per chunk; `waits`
    marks a side's last chunk before the other side's turn."""
    codecs = {Role.SOURCE: MigrationCodec(Role.SOURCE, sender_frame),
              Role.TARGET: MigrationCodec(Role.TARGET, sender_frame)}
    sent = {Role.SOURCE: [], Role.TARGET: []}
    for step, (side, event) in enumerate(script):
        chunks = codecs[side].send(event)
        peer = codecs[Role.TARGET if side is Role.SOURCE else Role.SOURCE]
        for chunk in chunks:
            sent[side].append((chunk.data, len(chunk.fds), False))
            peer.receive_data(chunk.data, len(chunk.fds))
        while peer.next_event() is not NEED_DATA:
            pass
        if step + 1 < len(script) and script[step + 1][0] is not side:
            sent[side][-1] = sent[side][-1][:2] + (True,)
    return sent


def _prefixes():
    S, T = Role.SOURCE, Role.TARGET
    full = [(S, HELLO), (S, TABLE), (T, ACCEPT), (S, PRECOPY), (T, Held()), (S, TRANSFER), (T, Ack()),
            (S, RELEASED), (T, Taken())]

    def upto(n, script=full, **kw):
        return _run(script[:n], **kw)

    # What the source sends (fed to a TARGET codec), then what the target sends
    # (fed to a SOURCE codec, which the harness has already taken to TABLE_DONE).
    to_target = [
        upto(1)[S],  # HELLO
        upto(2)[S],  # HELLO TABLE TABLE_END: the harness accepts
        upto(4)[S],  # ... PRECOPY PRECOPY_END: the harness says HELD
        upto(6)[S],  # ... SECTIONS END: the harness acks
        upto(8)[S],  # ... RELEASED: the harness sends TAKEN
        _run([(S, HELLO), (S, BIG_TABLE)], sender_frame=128)[S],  # a TABLE cut into frames
        _run([(S, HELLO), (S, TABLE), (S, Abort("source gave up"))])[S],
        _run([(S, HELLO), (S, TABLE), (T, ACCEPT), (S, PRECOPY), (T, Held()), (S, TRANSFER),
              (S, Abort("timed out"))])[S],
    ]
    to_source = [
        upto(3)[T],  # ACCEPT: the harness sends the precopy
        upto(5)[T],  # ACCEPT HELD: the harness sends the transfer
        upto(7)[T],  # ACCEPT HELD ACK: the harness sends RELEASED
        upto(9)[T],  # ACCEPT HELD ACK TAKEN
        _run([(S, HELLO), (S, TABLE), (T, Abort("target refuses"))])[T],
        _run([(S, HELLO), (S, TABLE), (T, ACCEPT), (S, PRECOPY), (T, Held()), (S, TRANSFER),
              (T, Abort("no room"))])[T],
    ]
    return {Role.TARGET: to_target, Role.SOURCE: to_source}


PREFIXES = _prefixes()


# ---------------------------------------------------------------------------
# The harness


class Bug(AssertionError):
    """The codec broke one of its documented promises (not just raised)."""


def _typed(what: str, decode):
    """decode() of a payload the codec passed: it checked what the decoder is
    strict about, so even a RemoteProtocolError here is a bug (they disagree)."""
    try:
        return decode()
    except RemoteProtocolError as exc:
        raise Bug(f"the codec passed {what}, but its decoder refuses it: {exc}") from None


def _check_payload(event) -> None:
    # The typed views of what the codec passed, and their round trips.
    if isinstance(event, Accept):
        target = _typed("ACCEPT's info", lambda: event.target)
        if TargetInfo.decode(target.to_dict()) != target:
            raise Bug(f"{target} does not round-trip")
    elif isinstance(event, Released):
        release = _typed("RELEASED's info", lambda: event.release)
        again = ReleaseInfo.decode(release.to_dict())
        if again != dataclasses.replace(release, ignored=()):
            raise Bug(f"{release} does not round-trip")


def _check_sections(codec: MigrationCodec, sections) -> None:
    for section in sections:
        if not isinstance(section, Section):
            raise Bug(f"expected a Section, got {type(section).__name__}")
        for index in section.fds.values():
            if not 0 <= index < codec.fds_received:
                raise Bug(f"section {section.label!r}: fd index {index} but {codec.fds_received} fds arrived")
        state = _typed(f"section {wire.show(section.label)}", lambda: section.state(NOW))
        if SectionState.decode(state.to_meta(), NOW) != state:
            raise Bug(f"{state} does not round-trip")
    if codec.fds_claimed > codec.fds_received:
        raise Bug(f"{codec.fds_claimed} fds claimed but {codec.fds_received} received")


_EVENTS = (wire.Hello, wire.Table, Accept, Precopy, Held, Transfer, Ack, Released, Taken, Abort, ConnectionClosed)


def _drain(codec: MigrationCodec) -> bool:
    """next_event() until NEED_DATA; False once the channel is closed."""
    while True:
        event = codec.next_event()
        if event is NEED_DATA:
            return True
        if not isinstance(event, _EVENTS):
            raise Bug(f"next_event() returned {event!r}")
        if isinstance(event, (Precopy, Transfer)):
            _check_sections(codec, event.sections)
        _check_payload(event)
        if isinstance(event, ConnectionClosed):
            return False


def _our_turn(fdp, codec: MigrationCodec) -> None:
    """Reply as the real side would, abort, or wait: the fuzzer picks. A reply the
    protocol allows must be accepted."""
    if codec.role is Role.TARGET:
        reply = {State.TABLE_DONE: ACCEPT, State.PRECOPY_DONE: Held(), State.TRANSFER_DONE: Ack(),
                 State.RELEASED: Taken()}
    else:
        reply = {State.ACCEPTED: PRECOPY, State.HELD: TRANSFER, State.COMMITTED: RELEASED}
    event = reply.get(codec.state)
    if event is None:
        return
    choice = decide(fdp, 0, 3, "reply")
    if choice == 3:
        return
    if choice == 2 and codec.state not in (State.RELEASED, State.COMMITTED):
        event = Abort("fuzz: giving up")
    codec.send(event)  # any exception here is a bug: it is our turn


def _after_error(codec: MigrationCodec, exc: RemoteProtocolError, send_abort: int, open_: bool) -> None:
    # "the codec is then FAILED and raises the same error from every later call"
    if codec.state is not State.FAILED:
        raise Bug(f"after RemoteProtocolError({exc}) the state is {codec.state.name}, not FAILED")
    if open_:
        codec.receive_data(_frame(wire.FrameType.ABORT, b'{"reason":"late"}'), 1)  # ignored now
    for _ in range(2):
        try:
            event = codec.next_event()
        except RemoteProtocolError as again:
            if str(again) != str(exc):
                raise Bug(f"the error changed: {exc} -> {again}") from None
        else:
            raise Bug(f"after RemoteProtocolError({exc}) next_event() returned {event!r}")
    # The real sides try to tell the peer why they give up.
    if send_abort:
        try:
            codec.send(Abort(f"protocol error: {exc}"))
        except LocalProtocolError:
            pass  # past the commit, or we already aborted


def run(fdp) -> None:
    role = (Role.TARGET, Role.SOURCE)[decide(fdp, 0, 1, "role")]
    prefixes = PREFIXES[role]
    which = decide(fdp, 0, len(prefixes), "prefix")  # 0: none
    max_frame = MAX_FRAMES[decide(fdp, 0, len(MAX_FRAMES) - 1, "max-frame")]
    eof_at_end = decide(fdp, 0, 1, "eof")
    # Decided up front, so that no decision follows the last read (see Recorder).
    abort_after_error = decide(fdp, 0, 1, "abort-after-error")

    codec = MigrationCodec(role, max_frame)
    if role is Role.SOURCE:
        for event in (HELLO, TABLE):
            codec.send(event)  # TABLE_DONE: waiting for ACCEPT
    prefix = prefixes[which - 1] if which else []
    stream = b"".join(data for data, _, _ in prefix)
    fd_marks = {}  # offset of a frame's first byte -> its fds
    waits = []  # offsets where the peer waits for our reply: no read crosses one
    offset = 0
    for data, nfds, wait in prefix:
        if nfds:
            fd_marks[offset] = nfds
        offset += len(data)
        if wait:
            waits.append(offset)

    pos = 0  # how much of the prefix has been fed
    open_ = True
    try:
        while True:
            if pos >= len(stream) and fdp.remaining_bytes() == 0:
                break
            op = decide(fdp, 0, 10, "op", hint=len(stream) - pos)
            if op <= 6:  # read a chunk: the prefix first, then the fuzzer's bytes
                size = decide(fdp, 1, 256, "size", hint=len(stream) - pos)
                extra = 0
                if op == 5:
                    extra = decide(fdp, 0, 7, "fds")
                elif op == 6:
                    extra = decide(fdp, 0, 511, "fds")
                if pos < len(stream):
                    end = min([pos + size, len(stream)] + [at for at in waits if at > pos])
                    data = stream[pos:end]
                    extra += sum(n for at, n in fd_marks.items() if pos <= at < end)
                    pos = end
                else:
                    data = fdp.ConsumeBytes(size)
                    if not data:
                        break
                codec.receive_data(data, extra)
            elif op == 7:  # the peer hangs up
                open_ = False
                codec.receive_data(b"")
                _drain(codec)
                break
            elif op == 8:  # we give up now (a timeout, say): frames may cross
                try:
                    codec.send(Abort("fuzz: timed out"))
                except LocalProtocolError:
                    pass  # not allowed in this state: fine
            elif op == 9:
                _check_sections(codec, codec.take_sections())
            else:  # one frame around the fuzzer's bytes: mutating a payload keeps its framing
                ftype = decide(fdp, 1, len(wire.FrameType), "frame-type")
                nfds = decide(fdp, 0, 7, "frame-fds") if ftype == wire.FrameType.SECTIONS else 0
                payload = fdp.ConsumeBytes(decide(fdp, 0, 1024, "frame-length"))
                codec.receive_data(wire.HEADER.pack(wire.MAGIC, wire.VERSION, ftype, len(payload), nfds) + payload,
                                   nfds)
            if not _drain(codec):
                open_ = False
                break
            _our_turn(fdp, codec)
        if open_ and eof_at_end:
            open_ = False
            codec.receive_data(b"")
            _drain(codec)
    except RemoteProtocolError as exc:
        _after_error(codec, exc, abort_after_error, open_)


def TestOneInput(data: bytes) -> None:
    run(provider(data))


# ---------------------------------------------------------------------------
# Seeds: inputs built from a script of decisions


class Recorder(fuzzcommon.Recorder):
    """Plays the provider for run() (see fuzzcommon.Recorder). While the prefix
    is being fed it reads it in `prefix_read`-byte chunks with `prefix_ops`,
    then 0 (plain reads); after it, `data` in reads of `sizes` with `ops` and
    `fds`. Other decisions are fixed by keyword (role=1, prefix=2, eof=1, ...; a
    list for one value per decision), else the range's minimum."""

    def __init__(self, data=b"", sizes=(), ops=(), fds=(), prefix_read=256, prefix_ops=(), **fixed):
        super().__init__(data, fixed)
        self.sizes, self.ops, self.fds, self.prefix_ops = list(sizes), list(ops), list(fds), list(prefix_ops)
        self.prefix_read = prefix_read

    def pick(self, lo, hi, what, hint):
        in_prefix = bool(hint)
        if what == "size":
            if in_prefix:
                value = min(self.prefix_read, hint)  # never straddle into the fuzzer's bytes
            else:
                value = min(self.sizes.pop(0) if self.sizes else hi, self.remaining_bytes())
            return max(lo, min(value, hi))
        if what == "op":
            queue = self.prefix_ops if in_prefix else self.ops
            return queue.pop(0) if queue else 0
        if what == "fds":
            return self.fds.pop(0)
        value = self.fixed.get(what, lo)
        if isinstance(value, list):
            value = value.pop(0) if value else lo
        return value


def _frame(ftype, payload=b"{}", nfds=0, length=None, magic=wire.MAGIC, version=wire.VERSION):
    return wire.HEADER.pack(magic, version, ftype, len(payload) if length is None else length, nfds) + payload


def _reads(frames, sizes=None):
    """The script that feeds `frames` [(bytes, nfds, ...)] in reads of `sizes`
    (default: one read per frame), each frame's fds with the read of its first byte."""
    frames = [frame[:2] for frame in frames]
    data = b"".join(d for d, _ in frames)
    marks, at = {}, 0
    for d, n in frames:
        if n:
            marks[at] = n
        at += len(d)
    if sizes is None:
        sizes = [len(d) for d, _ in frames]
    ops, fds, at = [], [], 0
    cuts = []
    for size in sizes:
        if at >= len(data):
            break
        cuts.append(min(size, len(data) - at))
        at += cuts[-1]
    at = 0
    for size in cuts:
        n = sum(v for k, v in marks.items() if at <= k < at + size)
        ops.append(0 if not n else 5 if n <= 7 else 6)
        if n:
            fds.append(n)
        at += size
    return dict(data=data, sizes=cuts, ops=ops, fds=fds)


def _framed(frames):
    """The script that sends `frames` [(type, payload, nfds)] with op 10: the
    fuzzer's bytes are the payloads, the harness writes the headers."""
    return {"data": b"".join(payload for _, payload, _ in frames), "ops": [10] * len(frames),
            "frame-type": [int(ftype) for ftype, _, _ in frames],
            "frame-fds": [nfds for ftype, _, nfds in frames if ftype == wire.FrameType.SECTIONS],
            "frame-length": [len(payload) for _, payload, _ in frames]}


def _manifest(manifest: bytes, outbufs: bytes = b"") -> bytes:
    return len(manifest).to_bytes(4, "big") + manifest + outbufs


def _payloads(chunks):
    """[(type, payload, nfds)] of the frames in chunks [(bytes, nfds, waits)]."""
    out = []
    for data, nfds, _ in chunks:
        _magic, _version, ftype, length, _n = wire.HEADER.unpack_from(data)
        out.append((wire.FrameType(ftype), data[wire.HEADER.size:wire.HEADER.size + length], nfds))
    return out


def seeds():
    """(name, input, decisions): valid conversations, every prefix, edge cases."""
    F = wire.FrameType
    S, T = Role.SOURCE, Role.TARGET
    out = []

    def seed(name, **kw):
        rec = Recorder(**kw)
        run(rec)
        out.append((name, rec.encode(), rec.trace))

    full = _run([(S, HELLO), (S, TABLE), (T, ACCEPT), (S, PRECOPY), (T, Held()), (S, TRANSFER), (T, Ack()),
                 (S, RELEASED), (T, Taken())])
    # Whole conversations as the fuzzer's own bytes, so that mutations reach every
    # frame: one read per frame, byte by byte, and with op 10 (the harness writes
    # the headers, so mutating a payload keeps its framing).
    seed("target-conversation", role=0, eof=1, **_reads(full[S]))
    seed("target-conversation-bytewise", role=0, eof=1, **_reads(full[S], [1] * 1000))
    seed("target-conversation-framed", role=0, eof=1, **_framed(_payloads(full[S])))
    seed("target-conversation-big-table", role=0, eof=1,
         **_reads(_run([(S, HELLO), (S, BIG_TABLE)], sender_frame=128)[S]))
    seed("source-conversation", role=1, eof=1, **_reads(full[T]))
    seed("source-conversation-framed", role=1, eof=1, **_framed(_payloads(full[T])))
    # Every prefix; the two full ones in small reads too.
    for role, name in ((0, "target"), (1, "source")):
        for index in range(1, len(PREFIXES[(T, S)[role]]) + 1):
            seed(f"{name}-prefix{index}", role=role, prefix=index, eof=1)
    seed("target-prefix5-reads-of-7", role=0, prefix=5, prefix_read=7)
    seed("source-prefix4-reads-of-7", role=1, prefix=4, prefix_read=7)
    # Frames that cross: we abort while the peer's frames are in flight.
    seed("source-abort-crosses-accept", role=1, prefix=1, prefix_ops=[8], eof=1)
    seed("source-abort-crosses-held", role=1, prefix=2, prefix_read=16, prefix_ops=[0, 0, 0, 0, 8], eof=1)
    seed("source-abort-crosses-ack", role=1, prefix=3, prefix_read=16, prefix_ops=[0, 0, 0, 0, 0, 0, 8], eof=1)
    seed("target-abort-then-late-transfer", role=0, prefix=4, reply=2, eof=1)
    seed("target-stray-fds", role=0, prefix=1, prefix_ops=[5], fds=[1])
    # Frames that are well-formed but wrong, with op 10, after prefix 0 (none),
    # 1 (HELLO), 2 (... TABLE_END), 3 (... PRECOPY_END) or 4 (... END).
    tab = F.TABLE
    framed = {
        "hello-name-int": (0, [(F.HELLO, b'{"name":1,"pid":1,"version":"1"}', 0)]),
        "table-capability-not-bool": (1, [(tab, b'{"capabilities":{"a":1},"chardevs":[]}', 0)]),
        "table-chardev-not-object": (1, [(tab, b'{"capabilities":{},"chardevs":[1]}', 0)]),
        "table-capabilities-twice": (1, [(tab, b'{"capabilities":{},"chardevs":[{"id":"a"}]}', 0),
                                         (tab, b'{"capabilities":{},"chardevs":[]}', 0)]),
        "table-end-miscount": (1, [(tab, b'{"capabilities":{"x":true},"chardevs":[{"id":"a"}]}', 0),
                                   (tab, b'{"chardevs":[{"id":"b","z":[null]}]}', 0),
                                   (F.TABLE_END, b'{"chardevs":3}', 0)]),
        "sections-manifest-object": (3, [(F.SECTIONS, _manifest(b"{}"), 0)]),
        "sections-entry-not-object": (3, [(F.SECTIONS, _manifest(b"[1]"), 0)]),
        "sections-role-empty": (3, [(F.SECTIONS, _manifest(b'[{"label":"a","meta":{},"outbuf":0,"fds":[""]}]'), 1)]),
        "sections-role-twice": (3, [(F.SECTIONS, _manifest(b'[{"label":"a","meta":{},"outbuf":0,"fds":["c","c"]}]'),
                                     2)]),
        "sections-outbuf-overruns": (3, [(F.SECTIONS, _manifest(b'[{"label":"a","meta":{},"outbuf":9,"fds":[]}]',
                                                                b"xyz"), 0)]),
        "sections-manifest-overruns": (3, [(F.SECTIONS, b"\x00\x00\x01\x00[]", 0)]),
        "sections-two-frames": (3, [(F.SECTIONS, _manifest(b'[{"label":"a","meta":{},"outbuf":1,"fds":["c"]},'
                                                          b'{"label":"b","meta":{},"outbuf":2,"fds":["c","d"]}]',
                                                          b"xyz"), 3),
                                    (F.SECTIONS, _manifest(b'[{"label":"c","meta":{"q":1},"outbuf":0,"fds":["c"]}]'), 1),
                                    (F.END, b'{"sections":3,"fds":4}', 0)]),
        "end-miscount": (3, [(F.SECTIONS, _manifest(b"[]"), 0), (F.END, b'{"sections":1,"fds":0}', 0)]),
        "precopy-role-twice": (2, [(F.PRECOPY, _manifest(b'[{"label":"a","meta":{},"outbuf":0,"fds":["c","c"]}]'),
                                    2)]),
        "precopy-end-miscount": (2, [(F.PRECOPY, _manifest(b'[{"label":"a","meta":{},"outbuf":0,"fds":["c"]}]'), 1),
                                     (F.PRECOPY_END, b'{"sections":1,"fds":2}', 0)]),
        "sections-before-held": (2, [(F.SECTIONS, _manifest(b"[]"), 0)]),
        "released-info-list": (4, [(F.RELEASED, b'{"info":[]}', 0)]),
    }
    for name, (prefix, frames) in framed.items():
        seed(f"target-framed-{name}", role=0, prefix=prefix, eof=1, **_framed(frames))
    seed("source-framed-accept-info-list", role=1, eof=1, **_framed([(F.ACCEPT, b'{"info":[]}', 0)]))
    # Raw edge cases.
    raw = {
        "bad-magic": b"GET / HTTP/1.1\r\n\r\n",
        "oversized": _frame(F.HELLO, length=wire.MAX_FRAME + 1),
        "too-many-fds": _frame(F.SECTIONS, nfds=254),
        "hello-deep": _frame(F.HELLO, b"[" * 3000),
        "hello-big-int": _frame(F.HELLO, b'{"name":"a","pid":' + b"9" * 5000 + b',"version":"1"}'),
        "hello-not-utf8": _frame(F.HELLO, b'{"name": "\xff"}'),
    }
    for name, data in raw.items():
        seed(name, role=0, eof=1, **_reads([(data, 0)]))
    return out


def write_seeds(directory: str) -> None:
    fuzzcommon.write_seeds(directory, seeds(), run)


if __name__ == "__main__":
    fuzzcommon.main(sys.argv, __file__, TestOneInput, write_seeds,
                    (run, _drain, _our_turn, _after_error, _check_sections, _check_payload))
