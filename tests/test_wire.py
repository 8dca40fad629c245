"""The migration channel codec, with no sockets: bytes and fd counts move by hand."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdmig.migration.wire import (
    HEADER,
    MAGIC,
    MAX_FDS_PER_FRAME,
    MAX_FRAME,
    NEED_DATA,
    STREAM_FLAGS,
    TRANSITIONS,
    VERSION,
    Abort,
    Accept,
    Ack,
    Chunk,
    ConnectionClosed,
    Counters,
    FrameType,
    Held,
    Hello,
    LocalProtocolError,
    MigrationCodec,
    Precopy,
    ProtocolError,
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
    entry_fds,
    show,
)
from tests.helpers import calls


def drain(codec):
    events = []
    while True:
        event = codec.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


class CodecPair:
    """A source and a target codec wired together (h11's ConnectionPair): what one
    sends, the other receives, fds counted as the kernel would deliver them."""

    def __init__(self, max_frame=MAX_FRAME):
        self.source = MigrationCodec(Role.SOURCE, max_frame)
        self.target = MigrationCodec(Role.TARGET, max_frame)
        # The fds each side has received, in order of arrival: what a decoded
        # Section's fd indices point into.
        self.received_fds = {Role.SOURCE: [], Role.TARGET: []}
        self.chunks: list[Chunk] = []

    def peer(self, codec):
        return self.target if codec is self.source else self.source

    def send(self, codec, event, deliver=True):
        self.chunks = codec.send(event)
        if deliver:
            return self.deliver(codec, self.chunks)
        return []

    def deliver(self, codec, chunks):
        receiver = self.peer(codec)
        for chunk in chunks:
            receiver.receive_data(chunk.data, len(chunk.fds))
            self.received_fds[receiver.role].extend(chunk.fds)
        return drain(receiver)

    def fds_of(self, role, section):
        return {name: self.received_fds[role][index] for name, index in section.fds.items()}


HELLO = Hello(name="web", pid=4242, version="0.1.0")
TABLE = Table(
    capabilities={"outbuf": True, "listener": True},
    chardevs=({"id": "c0", "backend": "socket", "path": "/run/c0.sock"}, {"id": "c1", "backend": "socket"}),
)
TRANSFER = Transfer(
    sections=(
        Section(label="c0", meta={"connected": True, "peer": "x"}, outbuf=b"pending\x00bytes",
                fds={"conn": 7, "listener": 8}),
        Section(label="c1", meta={}, outbuf=b"", fds={"listener": 9}),
        Section(label="c2", meta={"nested": {"a": [1, 2.5, None]}}, outbuf=b"\xff" * 10, fds={}),
    )
)
# While the source still serves: the fds of its moved chardevs, with no state.
PRECOPY = Precopy(sections=(Section(label="c0", meta={}, fds={"conn": 5, "listener": 6}),))

# A whole conversation: (state both sides reach, who sends, what).
SCRIPT = [
    (State.HELLO, "source", HELLO),
    (State.TABLE_DONE, "source", TABLE),
    (State.ACCEPTED, "target", Accept()),
    (State.PRECOPY_DONE, "source", PRECOPY),
    (State.HELD, "target", Held()),
    (State.TRANSFER_DONE, "source", TRANSFER),
    (State.COMMITTED, "target", Ack()),
    (State.RELEASED, "source", Released()),
]


def pair_at(state):
    """A CodecPair whose conversation has reached `state`."""
    pair = CodecPair()
    for reached, side, event in SCRIPT:
        if pair.source.state is state:
            break
        pair.send(getattr(pair, side), event)
        assert pair.source.state is pair.target.state is reached
    assert pair.source.state is state
    return pair


def frame(ftype, payload=b"{}", nfds=0, magic=MAGIC, version=VERSION, length=None):
    if not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return HEADER.pack(magic, version, ftype, len(payload) if length is None else length, nfds) + payload


def sections_payload(manifest, outbufs=b""):
    body = json.dumps(manifest).encode()
    return struct.pack("!I", len(body)) + body + outbufs


# ---------------------------------------------------------------------------
# The happy path


def test_full_conversation_round_trips_every_event():
    pair = CodecPair()
    assert pair.send(pair.source, HELLO) == [HELLO]
    assert pair.send(pair.source, TABLE) == [TABLE]
    assert pair.target.state is State.TABLE_DONE
    assert pair.send(pair.target, Accept({"pid": 77, "version": "0.1.0"})) == [Accept({"pid": 77, "version": "0.1.0"})]

    [precopy] = pair.send(pair.source, PRECOPY)
    assert type(precopy) is Precopy and precopy.sections[0].fds == {"conn": 0, "listener": 1}
    assert pair.send(pair.target, Held()) == [Held()]

    [transfer] = pair.send(pair.source, TRANSFER)
    assert type(transfer) is Transfer
    assert [s.label for s in transfer.sections] == ["c0", "c1", "c2"]
    for sent, got in zip(TRANSFER.sections, transfer.sections):
        assert (got.label, got.meta, got.outbuf) == (sent.label, sent.meta, sent.outbuf)
        # Decoded fds are indices into what the target received on this channel,
        # PRECOPY's first, and name the source's fds, role by role.
        assert pair.fds_of(Role.TARGET, got) == dict(sent.fds)
    assert transfer.sections[0].fds == {"conn": 2, "listener": 3}
    assert transfer.sections[1].fds == {"listener": 4}
    assert pair.received_fds[Role.TARGET] == [5, 6, 7, 8, 9]

    assert pair.send(pair.target, Ack()) == [Ack()]
    assert pair.source.state is pair.target.state is State.COMMITTED
    assert pair.send(pair.source, Released({"downtime-ms": 1.5})) == [Released({"downtime-ms": 1.5})]
    assert pair.source.state is pair.target.state is State.RELEASED
    assert pair.target.fds_received == pair.target.fds_claimed == 5

    pair.target.receive_data(b"")
    assert pair.target.next_event() == ConnectionClosed()
    assert pair.target.next_event() == ConnectionClosed()


@pytest.mark.parametrize("state, event", [(State.ACCEPTED, Precopy(TRANSFER.sections)), (State.HELD, TRANSFER)])
def test_fds_travel_only_with_the_chunk_that_starts_their_frame(state, event):
    pair = pair_at(state)
    chunks = pair.source.send(event)
    assert [c.fds for c in chunks] == [(7, 8, 9), ()]
    for chunk in chunks:
        magic, _version, ftype, length, nfds = HEADER.unpack_from(chunk.data)
        assert magic == MAGIC and nfds == len(chunk.fds) and length == len(chunk.data) - HEADER.size


def test_sections_sent_in_parts_arrive_as_one_event_counted_whole():
    pair = pair_at(State.ACCEPTED)
    parts = [(Section("a", {}, b"", {"conn": 3}),), (), (Section("b", {"x": 1}, b"", {"conn": 4, "listener": 5}),)]
    assert pair.send(pair.source, Precopy(parts[0], more=True)) == []
    assert pair.send(pair.source, Precopy(parts[1], more=True)) == []
    with pytest.raises(LocalProtocolError):  # a bad part changes nothing, the counts included
        pair.source.send(Precopy((Section("bad", {}, b"", {"conn": -1}),), more=True))
    [precopy] = pair.send(pair.source, Precopy(parts[2]))
    assert [(s.label, s.meta) for s in precopy.sections] == [("a", {}), ("b", {"x": 1})]
    assert [pair.fds_of(Role.TARGET, s) for s in precopy.sections] == [{"conn": 3}, {"conn": 4, "listener": 5}]
    assert pair.target.state is State.PRECOPY_DONE
    assert json.loads(pair.chunks[-1].data[HEADER.size:]) == {"sections": 2, "fds": 3}
    # The counts start afresh for the state.
    pair.send(pair.target, Held())
    assert pair.send(pair.source, Transfer((Section("a", {}),))) == [Transfer((Section("a", {}),))]
    assert json.loads(pair.chunks[-1].data[HEADER.size:]) == {"sections": 1, "fds": 0}


def test_the_state_waits_until_the_target_holds_the_precopied_fds():
    pair = pair_at(State.PRECOPY_DONE)
    with pytest.raises(LocalProtocolError, match="cannot send SECTIONS in state PRECOPY_DONE"):
        pair.source.send(TRANSFER)
    pair.target.receive_data(frame(FrameType.END, {"sections": 0, "fds": 0}))
    with pytest.raises(RemoteProtocolError, match="END not allowed in state PRECOPY_DONE"):
        pair.target.next_event()


def test_only_the_target_says_held():
    pair = pair_at(State.PRECOPY_DONE)
    pair.target.receive_data(frame(FrameType.HELD))
    with pytest.raises(RemoteProtocolError, match="a source never sends HELD"):
        pair.target.next_event()


def test_a_second_precopy_after_held_is_a_protocol_error():
    pair = pair_at(State.HELD)
    pair.target.receive_data(frame(FrameType.PRECOPY_END, {"sections": 0, "fds": 0}))
    with pytest.raises(RemoteProtocolError, match="PRECOPY_END not allowed in state HELD"):
        pair.target.next_event()


def test_empty_table_and_empty_transfer_round_trip():
    pair = pair_at(State.HELLO)
    empty_table = Table(capabilities={}, chardevs=())
    assert pair.send(pair.source, empty_table) == [empty_table]
    pair.send(pair.target, Accept())
    assert pair.send(pair.source, Precopy(sections=())) == [Precopy(sections=())]
    pair.send(pair.target, Held())
    assert pair.send(pair.source, Transfer(sections=())) == [Transfer(sections=())]
    assert pair.target.state is State.TRANSFER_DONE


def test_lists_given_to_events_become_tuples():
    assert Table(capabilities={}, chardevs=[{"id": "a"}]).chardevs == ({"id": "a"},)
    assert Transfer(sections=[Section("a", {})]).sections == (Section("a", {}),)


def test_ten_thousand_sections_with_two_fds_each_split_into_bounded_frames():
    pair = pair_at(State.HELD)
    base = pair.target.fds_received
    sections = tuple(
        Section(label=f"chardev-{i}", meta={"index": i, "connected": True}, outbuf=b"x" * (i % 50),
                fds={"conn": 10_000 + 2 * i, "listener": 10_001 + 2 * i})
        for i in range(10_000)
    )
    chunks = pair.source.send(Transfer(sections=sections))
    *section_chunks, end = chunks
    assert len(section_chunks) == -(-20_000 // 252)  # 126 two-fd sections per frame
    assert all(len(c.fds) <= MAX_FDS_PER_FRAME and len(c.data) - HEADER.size <= MAX_FRAME for c in chunks)
    assert end.fds == ()

    [transfer] = pair.deliver(pair.source, chunks)

    assert len(transfer.sections) == 10_000
    assert pair.target.fds_claimed == pair.target.fds_received == base + 20_000
    for sent, got in zip(sections, transfer.sections):
        assert (got.label, got.meta, got.outbuf) == (sent.label, sent.meta, sent.outbuf)
        assert pair.fds_of(Role.TARGET, got) == sent.fds


def test_outbufs_fill_frames_up_to_the_byte_bound():
    pair = CodecPair(max_frame=4096)
    pair.send(pair.source, HELLO)
    pair.send(pair.source, Table({}, ()))
    pair.send(pair.target, Accept())
    pair.send(pair.source, Precopy(()))
    pair.send(pair.target, Held())
    sections = tuple(Section(f"s{i}", {}, bytes([i]) * 1000) for i in range(20))
    chunks = pair.source.send(Transfer(sections))
    assert len(chunks) > 5
    assert all(len(c.data) - HEADER.size <= 4096 for c in chunks)
    [transfer] = pair.deliver(pair.source, chunks)
    assert transfer.sections == sections


def test_ten_thousand_chardev_table_splits_into_frames_and_arrives_as_one_event():
    pair = pair_at(State.HELLO)
    chardevs = tuple(
        {"id": f"chardev-{i}", "backend": "socket", "path": f"/run/fdmig/instances/web/chardev-{i}.sock",
         "server": True, "wait": False, "reconnect": 0, "logfile": f"/var/log/fdmig/web/chardev-{i}.log",
         "options": {"nodelay": True, "telnet": False, "websocket": False, "tls": None, "mux": False,
                     "logappend": True, "padding": "p" * 60}}
        for i in range(10_000)
    )
    assert 250 < len(json.dumps(chardevs[0])) < 400
    table = Table(capabilities={"outbuf": True}, chardevs=chardevs)
    chunks = pair.source.send(table)
    assert len(chunks) >= 4  # ~3 MB of chardevs, then TABLE_END
    assert all(len(c.data) - HEADER.size <= MAX_FRAME and c.fds == () for c in chunks)
    assert pair.deliver(pair.source, chunks) == [table]


def test_a_table_sent_in_pieces_arrives_as_one_event_with_the_first_pieces_capabilities():
    # The source sends its table a piece at a time, paced, between turns of serving.
    pair = pair_at(State.HELLO)
    chardevs = [{"id": f"c{i}", "backend": "socket", "path": f"/run/c{i}.sock"} for i in range(7)]
    got = []
    for start in range(0, 7, 3):
        chunks = pair.source.send(Table({"local-char-socket": True}, chardevs[start: start + 3], more=True))
        assert chunks and pair.source.state is State.TABLE
        got += pair.deliver(pair.source, chunks)
    assert got == []  # nothing surfaces before the end
    end = pair.source.send(Table({"local-char-socket": True}, []))
    [table] = pair.deliver(pair.source, end)
    assert table.capabilities == {"local-char-socket": True} and list(table.chardevs) == chardevs
    assert pair.source.state is pair.target.state is State.TABLE_DONE


def test_byte_at_a_time_feeding_gives_the_same_events():
    whole = CodecPair()
    trickle = CodecPair()
    for _, side, event in SCRIPT:
        expected = whole.send(getattr(whole, side), event)
        sender = getattr(trickle, side)
        receiver = trickle.peer(sender)
        got = []
        for chunk in sender.send(event):
            for i in range(len(chunk.data)):
                # The fds come with the first byte of the chunk, as the kernel delivers them.
                receiver.receive_data(chunk.data[i : i + 1], len(chunk.fds) if i == 0 else 0)
                got.extend(drain(receiver))
        assert got == expected
    assert trickle.target.state is State.RELEASED


def test_fds_reported_after_their_first_byte_are_accepted_until_the_frame_completes():
    pair = pair_at(State.HELD)
    [sections_chunk, end_chunk] = pair.source.send(TRANSFER)
    data = sections_chunk.data
    pair.target.receive_data(data[:10])
    assert pair.target.next_event() is NEED_DATA
    pair.target.receive_data(data[10:-1])
    assert pair.target.next_event() is NEED_DATA
    pair.target.receive_data(data[-1:], 3)
    pair.target.receive_data(end_chunk.data)
    [transfer] = drain(pair.target)
    assert [s.fds for s in transfer.sections] == [{"conn": 2, "listener": 3}, {"listener": 4}, {}]


def test_fds_for_the_next_frame_may_arrive_in_a_read_that_ends_the_previous_one():
    # What the kernel does when one recvmsg() returns the tail of one sendmsg() and
    # the head of the next: the fds of the second come with that read.
    pair = CodecPair(max_frame=200)
    pair.send(pair.source, HELLO)
    pair.send(pair.source, Table({}, ()))
    pair.send(pair.target, Accept())
    pair.send(pair.source, Precopy(()))
    pair.send(pair.target, Held())
    sections = tuple(Section(f"s{i}", {}, b"", {"conn": 100 + i}) for i in range(6))
    first, second, *rest = pair.source.send(Transfer(sections))
    assert len(first.fds) > 1 and len(second.fds) > 1
    pair.target.receive_data(first.data[:-5], len(first.fds))
    pair.target.receive_data(first.data[-5:] + second.data[:1], len(second.fds))
    assert drain(pair.target) == []
    pair.target.receive_data(second.data[1:])
    assert drain(pair.target) == []
    for chunk in rest:
        pair.target.receive_data(chunk.data, len(chunk.fds))
    [transfer] = drain(pair.target)
    assert [s.fds for s in transfer.sections] == [{"conn": i} for i in range(6)]  # PRECOPY brought none


# ---------------------------------------------------------------------------
# Aborting


def test_source_may_abort_mid_conversation():
    pair = pair_at(State.TABLE_DONE)
    assert pair.send(pair.source, Abort("operator cancelled")) == [Abort("operator cancelled")]
    assert pair.source.state is pair.target.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        pair.target.send(Accept())


def test_target_may_abort_after_the_table():
    pair = pair_at(State.TABLE_DONE)
    assert pair.send(pair.target, Abort("unknown backend 'serial'")) == [Abort("unknown backend 'serial'")]
    assert pair.source.state is pair.target.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        pair.source.send(TRANSFER)


def test_target_may_abort_before_acking_the_transfer():
    pair = pair_at(State.TRANSFER_DONE)
    assert pair.send(pair.target, Abort("cannot restore c1")) == [Abort("cannot restore c1")]
    assert pair.source.state is State.FAILED


@pytest.mark.parametrize("state", [State.COMMITTED, State.RELEASED])
def test_nobody_can_abort_after_the_commit(state):
    pair = pair_at(state)
    for codec in (pair.source, pair.target):
        with pytest.raises(LocalProtocolError, match="cannot send ABORT"):
            codec.send(Abort("too late"))


def test_an_abort_from_the_target_after_the_commit_is_a_protocol_error():
    pair = pair_at(State.COMMITTED)
    pair.source.receive_data(frame(FrameType.ABORT, {"reason": "too late"}))
    with pytest.raises(RemoteProtocolError, match="ABORT not allowed in state COMMITTED"):
        pair.source.next_event()


def test_an_abort_from_the_source_after_released_is_a_protocol_error():
    pair = pair_at(State.RELEASED)
    pair.target.receive_data(frame(FrameType.ABORT, {"reason": "too late"}))
    with pytest.raises(RemoteProtocolError, match="ABORT not allowed in state RELEASED"):
        pair.target.next_event()


def test_frames_in_flight_when_we_abort_are_dropped_and_the_peers_abort_passed_on():
    pair = pair_at(State.ACCEPTED)
    in_flight_precopy = pair.source.send(PRECOPY)
    # Both give up at once: the source had already sent its precopy.
    source_abort = pair.source.send(Abort("source gave up"))
    assert pair.send(pair.target, Abort("target gave up")) == [Abort("target gave up")]
    assert pair.deliver(pair.source, in_flight_precopy + source_abort) == [Abort("source gave up")]
    assert pair.target.state is State.FAILED
    assert pair.target.fds_claimed == pair.target.fds_received == 2
    # After the peer's own ABORT nothing more may come.
    pair.target.receive_data(frame(FrameType.TABLE, {"chardevs": []}))
    with pytest.raises(RemoteProtocolError, match="TABLE not allowed in state FAILED"):
        pair.target.next_event()


def test_a_source_abort_that_crosses_the_ack_calls_the_migration_off_on_both_sides():
    pair = pair_at(State.TRANSFER_DONE)
    ack = pair.target.send(Ack())
    assert pair.target.state is State.COMMITTED
    abort = pair.source.send(Abort("timed out waiting for ACK"))
    # The source never read the ACK, so it rolled back: the commit point is the
    # source reading ACK. The late ACK is dropped; the target sees the ABORT.
    assert pair.deliver(pair.target, ack) == []
    assert pair.deliver(pair.source, abort) == [Abort("timed out waiting for ACK")]
    assert pair.source.state is pair.target.state is State.FAILED


def test_after_a_remote_protocol_error_we_may_still_send_one_abort():
    pair = pair_at(State.TABLE_DONE)
    pair.source.receive_data(frame(FrameType.ACK))
    with pytest.raises(RemoteProtocolError):
        pair.source.next_event()
    [chunk] = pair.source.send(Abort("protocol error: ACK not allowed in state TABLE_DONE"))
    assert pair.source.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        pair.source.send(Abort("again"))


def test_no_abort_after_a_remote_protocol_error_once_committed():
    pair = pair_at(State.COMMITTED)
    pair.target.receive_data(b"garbage!" * 4)
    with pytest.raises(RemoteProtocolError):
        pair.target.next_event()
    with pytest.raises(LocalProtocolError):
        pair.target.send(Abort("no"))


# ---------------------------------------------------------------------------
# Our own mistakes


@pytest.mark.parametrize(
    "role, event",
    [
        (Role.TARGET, HELLO),
        (Role.SOURCE, Accept()),
        (Role.SOURCE, TABLE),
        (Role.SOURCE, TRANSFER),
        (Role.SOURCE, Released()),
        (Role.TARGET, Ack()),
        (Role.SOURCE, ConnectionClosed()),
    ],
)
def test_sending_out_of_turn_is_a_local_protocol_error(role, event):
    codec = MigrationCodec(role)
    with pytest.raises(LocalProtocolError):
        codec.send(event)
    assert codec.state is State.START


def test_sending_the_transfer_before_the_target_accepts_is_a_local_protocol_error():
    pair = pair_at(State.TABLE_DONE)
    with pytest.raises(LocalProtocolError, match="cannot send SECTIONS in state TABLE_DONE"):
        pair.source.send(TRANSFER)
    with pytest.raises(LocalProtocolError):
        pair.source.send(HELLO)
    assert pair.source.state is State.TABLE_DONE


@pytest.mark.parametrize(
    "event",
    [
        Hello(name="web", pid=0, version="1"),
        Hello(name="web", pid=True, version="1"),
        Hello(name=None, pid=1, version="1"),
        Abort(reason=3),
    ],
)
def test_malformed_events_are_local_protocol_errors(event):
    codec = MigrationCodec(Role.SOURCE)
    with pytest.raises(LocalProtocolError):
        codec.send(event)


@pytest.mark.parametrize(
    "table",
    [
        Table(capabilities={"x": 1}, chardevs=()),
        Table(capabilities={}, chardevs=({"path": "/no/id"},)),
        Table(capabilities={}, chardevs=({"id": "c", "bad": {1, 2}},)),
        Table(capabilities={}, chardevs=({"id": "c", "nan": float("nan")},)),
        Table(capabilities={}, chardevs=({"id": "huge", "blob": "x" * MAX_FRAME},)),
        Table(capabilities={"x" * MAX_FRAME: True}, chardevs=()),
    ],
)
def test_malformed_tables_are_local_protocol_errors(table):
    pair = pair_at(State.HELLO)
    with pytest.raises(LocalProtocolError):
        pair.source.send(table)
    assert pair.source.state is State.HELLO


@pytest.mark.parametrize(
    "section",
    [
        Section("big", {}, b"x" * MAX_FRAME),
        Section("many", {}, b"", {f"fd{i}": i for i in range(MAX_FDS_PER_FRAME + 1)}),
        Section("neg", {}, b"", {"conn": -1}),
        Section("role", {}, b"", {"": 3}),
        Section("text", {}, "not bytes"),
        Section("meta", {"when": object()}),
    ],
)
def test_sections_that_cannot_be_sent_are_local_protocol_errors(section):
    pair = pair_at(State.HELD)
    with pytest.raises(LocalProtocolError):
        pair.source.send(Transfer((Section("ok", {}, b"", {"conn": 3}), section)))
    assert pair.source.state is State.HELD


def test_a_section_with_exactly_the_fd_bound_fits_one_frame():
    pair = pair_at(State.HELD)
    fds = {f"fd{i}": 100 + i for i in range(MAX_FDS_PER_FRAME)}
    chunks = pair.source.send(Transfer((Section("one", {}, b"", {"a": 1}), Section("many", {}, b"", fds))))
    assert [len(c.fds) for c in chunks] == [1, MAX_FDS_PER_FRAME, 0]
    [transfer] = pair.deliver(pair.source, chunks)
    assert pair.fds_of(Role.TARGET, transfer.sections[1]) == fds


def test_receive_data_after_eof_is_a_local_protocol_error():
    codec = MigrationCodec(Role.TARGET)
    codec.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        codec.receive_data(b"more")


# ---------------------------------------------------------------------------
# The peer's mistakes


def fail_with(codec, data, match, nfds=0):
    codec.receive_data(data, nfds)
    with pytest.raises(RemoteProtocolError, match=match):
        drain(codec)
    assert codec.state is State.FAILED
    # ...and it stays failed, with the same complaint.
    with pytest.raises(RemoteProtocolError, match=match):
        codec.next_event()
    codec.receive_data(frame(FrameType.HELLO, {"name": "x", "pid": 1, "version": "1"}))
    with pytest.raises(RemoteProtocolError, match=match):
        codec.next_event()


def test_bad_magic_is_rejected_from_the_first_bytes():
    # An HTTP client: refused before a full header is even in.
    fail_with(MigrationCodec(Role.TARGET), b"GET ", r"not an fdmig migration stream \(bad magic b'GET '\)")
    fail_with(MigrationCodec(Role.TARGET), b"X", r"bad magic b'X'")


def test_unsupported_wire_version_is_rejected():
    fail_with(MigrationCodec(Role.TARGET), frame(FrameType.HELLO, version=7),
              r"wire version 7 not supported \(this fdmig speaks 1\)")


def test_unknown_frame_type_is_rejected():
    fail_with(MigrationCodec(Role.TARGET), frame(42), "unknown frame type 42")


def test_oversized_frame_is_rejected_as_soon_as_its_header_is_in():
    codec = MigrationCodec(Role.TARGET)
    header_only = HEADER.pack(MAGIC, VERSION, FrameType.HELLO, 5_000_000, 0)
    fail_with(codec, header_only, "frame of 5000000 bytes exceeds the 1048576-byte bound")


def test_the_frame_bound_is_configurable():
    codec = MigrationCodec(Role.TARGET, max_frame=64)
    fail_with(codec, frame(FrameType.HELLO, {"name": "x" * 100, "pid": 1, "version": "1"}),
              "exceeds the 64-byte bound")


def test_too_many_fds_in_one_frame_is_rejected():
    pair = pair_at(State.HELD)
    fail_with(pair.target, HEADER.pack(MAGIC, VERSION, FrameType.SECTIONS, 10, 254), "254 fds; the bound is 253")


def test_fds_on_a_frame_that_carries_none_are_rejected():
    fail_with(MigrationCodec(Role.TARGET), frame(FrameType.HELLO, nfds=1), "only PRECOPY and SECTIONS frames carry fds", nfds=1)


def test_a_frame_out_of_turn_is_rejected():
    pair = pair_at(State.ACCEPTED)
    fail_with(pair.target, frame(FrameType.TABLE, {"chardevs": []}), "TABLE not allowed in state ACCEPTED")


def test_a_frame_out_of_turn_is_rejected_before_its_payload_is_in():
    pair = pair_at(State.ACCEPTED)
    fail_with(pair.target, frame(FrameType.TABLE, b"{}", length=1000), "TABLE not allowed in state ACCEPTED")


def test_a_frame_from_the_wrong_side_is_rejected():
    pair = pair_at(State.TABLE_DONE)
    fail_with(pair.target, frame(FrameType.ACCEPT),
              r"ACCEPT not allowed in state TABLE_DONE \(a source never sends ACCEPT\)")


def test_the_first_frame_must_be_hello():
    fail_with(MigrationCodec(Role.TARGET), frame(FrameType.END, {"sections": 0, "fds": 0}),
              "END not allowed in state START")


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"{nope", "bad JSON in HELLO frame"),
        (b"\xff\xfe{}", "bad JSON in HELLO frame: not UTF-8"),
        ('{"name": "x", "pid": 1, "version": "1"}'.encode("utf-16"), "not UTF-8"),
        (b"[1, 2]", "payload must be a JSON object"),
        (b'{"name": "x", "pid": 1}', "missing 'version'"),
        (b'{"name": "x", "pid": "1", "version": "1"}', "'pid' must be an integer, not str"),
        (b'{"name": "x", "pid": true, "version": "1"}', "'pid' must be an integer, not bool"),
        (b'{"name": "x", "pid": -5, "version": "1"}', "not a process id"),
        (b'{"name": "x", "pid": NaN, "version": "1"}', "bad JSON in HELLO frame"),
        (b"[" * 100_000 + b"]" * 100_000, "bad JSON in HELLO frame"),
        (b'{"name": "x", "pid": 1' + b"0" * 5000 + b', "version": "1"}', "bad JSON in HELLO frame"),
    ],
)
def test_malformed_hello_is_rejected(payload, match):
    fail_with(MigrationCodec(Role.TARGET), frame(FrameType.HELLO, payload), match)


def test_accept_and_released_info_defaults_to_empty_and_must_be_an_object():
    assert Accept() == Accept({})
    pair = pair_at(State.TABLE_DONE)
    pair.source.receive_data(frame(FrameType.ACCEPT, {}))
    assert pair.source.next_event() == Accept({})
    with pytest.raises(LocalProtocolError):
        pair.source.send(Accept())
    pair = pair_at(State.TABLE_DONE)
    fail_with(pair.source, frame(FrameType.ACCEPT, {"info": [1]}), "'info' must be an object, not list")
    with pytest.raises(LocalProtocolError):
        MigrationCodec(Role.TARGET).send(Accept(info=[1]))


def test_unknown_keys_are_ignored_for_forward_compatibility():
    codec = MigrationCodec(Role.TARGET)
    codec.receive_data(frame(FrameType.HELLO, {"name": "x", "pid": 1, "version": "1", "later": [1]}))
    assert codec.next_event() == Hello("x", 1, "1")


@pytest.mark.parametrize(
    "frames, match",
    [
        ([{"chardevs": []}], "missing 'capabilities'"),
        ([{"capabilities": {"a": 1}, "chardevs": []}], "capability 'a'"),
        ([{"capabilities": {}, "chardevs": {}}], "'chardevs' must be a list"),
        ([{"capabilities": {}, "chardevs": [{"id": 1}]}], r"chardev #0: 'id' must be a string"),
        ([{"capabilities": {}, "chardevs": [[]]}], "chardev #0 must be a mapping"),
        ([{"capabilities": {}, "chardevs": []}, {"capabilities": {}, "chardevs": []}],
         "capabilities belong in the first TABLE frame only"),
    ],
)
def test_malformed_table_is_rejected(frames, match):
    pair = pair_at(State.HELLO)
    fail_with(pair.target, b"".join(frame(FrameType.TABLE, f) for f in frames), match)


def test_table_end_must_count_what_arrived():
    pair = pair_at(State.HELLO)
    data = frame(FrameType.TABLE, {"capabilities": {}, "chardevs": [{"id": "a"}]})
    data += frame(FrameType.TABLE_END, {"chardevs": 2})
    fail_with(pair.target, data, "TABLE_END counts 2 chardevs but 1 arrived")


def test_a_frame_claiming_more_fds_than_arrived_is_rejected():
    pair = pair_at(State.HELD)
    manifest = [{"label": "a", "meta": {}, "outbuf": 0, "fds": ["x", "y", "z"]}]
    fail_with(pair.target, frame(FrameType.SECTIONS, sections_payload(manifest), nfds=3),
              "SECTIONS frame claims 3 fds but 1 arrived", nfds=1)


def test_fds_nobody_claims_are_rejected_once_the_buffer_is_consumed():
    pair = pair_at(State.HELD)
    manifest = [{"label": "a", "meta": {}, "outbuf": 0, "fds": ["x"]}]
    fail_with(pair.target, frame(FrameType.SECTIONS, sections_payload(manifest), nfds=1),
              "2 fds arrived with no manifest entry", nfds=3)


def test_fds_alongside_an_fdless_frame_are_rejected():
    pair = pair_at(State.TABLE_DONE)
    pair.source.receive_data(frame(FrameType.ACCEPT), 2)
    assert pair.source.next_event() == Accept()
    with pytest.raises(RemoteProtocolError, match="2 fds arrived with no manifest entry"):
        pair.source.next_event()


def test_fds_with_eof_are_rejected():
    codec = MigrationCodec(Role.TARGET)
    codec.receive_data(b"", 1)
    with pytest.raises(RemoteProtocolError, match="1 fds arrived with no manifest entry"):
        codec.next_event()


@pytest.mark.parametrize(
    "payload, nfds, match",
    [
        (sections_payload([{"label": "a", "meta": {}, "outbuf": 0, "fds": ["x"]}]), 2,
         "header claims 2 fds but its manifest lists 1"),
        (sections_payload([{"label": "a", "meta": {}, "outbuf": 0, "fds": ["x", "x"]}]), 2, "listed twice"),
        (sections_payload([{"label": "a", "meta": {}, "outbuf": 0, "fds": [""]}]), 1, "non-empty string"),
        (sections_payload([{"label": "a", "meta": {}, "outbuf": 0, "fds": [["deep"]]}]), 1, "must be a non-empty"),
        (sections_payload([{"label": "a", "meta": {}, "outbuf": 5, "fds": []}], b"abc"), 0, "overruns the frame"),
        (sections_payload([{"label": "a", "meta": {}, "outbuf": -1, "fds": []}]), 0, "overruns the frame"),
        (sections_payload([{"label": "a", "meta": {}, "outbuf": 1, "fds": []}], b"abc"), 0,
         "2 bytes after the last outbuf"),
        (sections_payload([{"label": "a", "meta": [], "outbuf": 0, "fds": []}]), 0, "'meta' must be an object"),
        (sections_payload([{"meta": {}, "outbuf": 0, "fds": []}]), 0, "missing 'label'"),
        (sections_payload([{"label": "a", "meta": {}, "outbuf": 0}]), 0, "missing 'fds'"),
        (sections_payload(["a"]), 0, "a manifest entry must be an object"),
        (sections_payload({"a": 1}), 0, "the manifest must be a list"),
        (struct.pack("!I", 100) + b"[]", 0, "manifest of 100 bytes overruns its 6-byte frame"),
        (b"\x00\x00", 0, "has no manifest length"),
        (struct.pack("!I", 1) + b"[", 0, "bad JSON in"),
    ],
)
@pytest.mark.parametrize("state, ftype", [(State.ACCEPTED, FrameType.PRECOPY), (State.HELD, FrameType.SECTIONS)])
def test_malformed_sections_are_rejected(payload, nfds, match, state, ftype):
    pair = pair_at(state)
    fail_with(pair.target, frame(ftype, payload, nfds=nfds), match, nfds=nfds)


def test_end_must_count_what_arrived():
    pair = pair_at(State.HELD)
    manifest = [{"label": "a", "meta": {}, "outbuf": 0, "fds": ["x"]}]
    data = frame(FrameType.SECTIONS, sections_payload(manifest), nfds=1)
    data += frame(FrameType.END, {"sections": 1, "fds": 2})
    fail_with(pair.target, data, "END counts 1 sections and 2 fds but 1 and 1 arrived", nfds=1)


def test_eof_mid_frame_is_a_protocol_error():
    chunk = MigrationCodec(Role.SOURCE).send(HELLO)[0]
    for cut in (3, HEADER.size - 1, HEADER.size, len(chunk.data) - 1):
        codec = MigrationCodec(Role.TARGET)
        codec.receive_data(chunk.data[:cut])
        assert codec.next_event() is NEED_DATA
        codec.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="connection closed mid-frame"):
            codec.next_event()


def test_eof_between_frames_is_connection_closed_in_any_state():
    pair = pair_at(State.TABLE_DONE)
    pair.target.receive_data(b"")
    assert pair.target.next_event() == ConnectionClosed()
    assert pair.target.state is State.TABLE_DONE


def test_error_classes():
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_every_transition_names_a_sender_that_sends_that_frame_type():
    senders = {}
    for (_state, role, ftype), _new in TRANSITIONS.items():
        senders.setdefault(ftype, set()).add(role)
    assert senders[FrameType.ABORT] == {Role.SOURCE, Role.TARGET}
    assert all(len(roles) == 1 for ftype, roles in senders.items() if ftype is not FrameType.ABORT)
    assert not any(state in (State.COMMITTED, State.RELEASED, State.FAILED)
                   for (state, _role, ftype) in TRANSITIONS if ftype is FrameType.ABORT)


# ---------------------------------------------------------------------------
# Typed payloads: Accept.info, Released.info, Section.meta, a TABLE's x-fds


def test_target_info_decodes_with_defaults_and_round_trips_through_its_dict():
    assert TargetInfo.decode({}) == TargetInfo(pid=None, exec=False, control=True, stdio=False)
    info = TargetInfo.decode({"pid": 77, "exec": True, "control": False, "version": "9.9", "later": [1]})
    assert info == TargetInfo(pid=77, exec=True, control=False)  # unknown keys ignored
    assert list(info.to_dict()) == ["pid", "exec", "control", "stdio", "tcp-precopy", "counters-after"]
    assert TargetInfo.decode({"stdio": True}).stdio
    # An older target does not say it stages TCP chardevs from the precopy: none is sent it.
    assert not info.tcp_precopy and TargetInfo.decode({"tcp-precopy": True}).tcp_precopy
    # Nor that it takes RELEASED's byte counts in COUNTERS: they stay in RELEASED for it.
    assert not info.counters_after and TargetInfo.decode({"counters-after": True}).counters_after
    assert TargetInfo.decode(info.to_dict()) == info
    assert TargetInfo.decode(TargetInfo().to_dict()) == TargetInfo()
    assert TargetInfo.decode({"pid": None}).pid is None


def test_a_received_accept_keeps_its_raw_info_and_offers_it_typed():
    pair = pair_at(State.TABLE_DONE)
    sent = Accept({"pid": 77, "version": "0.1.0", "exec": True})
    [got] = pair.send(pair.target, sent)
    assert got == sent and got.info == {"pid": 77, "version": "0.1.0", "exec": True}
    assert got.target == TargetInfo(pid=77, exec=True, control=True)


@pytest.mark.parametrize("pid", [0, -1, True, "7", 7.0, [7]])
def test_a_received_accept_with_a_bad_pid_fails_the_codec(pid):
    pair = pair_at(State.TABLE_DONE)
    fail_with(pair.source, frame(FrameType.ACCEPT, {"info": {"pid": pid}}), "ACCEPT info: pid .* is not a process id")
    assert pair.source.fds_claimed == 0


@pytest.mark.parametrize("info", [{"exec": 1}, {"control": "yes"}, {"control": None}, {"tcp-precopy": 1},
                                  {"counters-after": "yes"}])
def test_a_received_accept_with_non_bool_flags_fails_the_codec(info):
    pair = pair_at(State.TABLE_DONE)
    fail_with(pair.source, frame(FrameType.ACCEPT, {"info": info}), "must be a bool")


@pytest.mark.parametrize("info", [{"pid": 0}, {"pid": -1}, {"pid": True}, {"pid": "7"}, {"pid": 7, "exec": "no"}])
def test_sending_an_accept_with_bad_target_info_is_a_local_protocol_error_and_changes_nothing(info):
    pair = pair_at(State.TABLE_DONE)
    with pytest.raises(LocalProtocolError, match="ACCEPT info"):
        pair.target.send(Accept(info))
    assert pair.target.state is State.TABLE_DONE
    assert pair.send(pair.target, Accept({"pid": 77})) == [Accept({"pid": 77})]


def test_the_message_for_a_bad_pid_shows_numbers_but_not_huge_ones():
    with pytest.raises(RemoteProtocolError, match="pid 0 is not"):
        TargetInfo.decode({"pid": 0})
    with pytest.raises(RemoteProtocolError, match="pid int is not"):
        TargetInfo.decode({"pid": -(10**5000)})
    with pytest.raises(LocalProtocolError, match="pid 'x' is not"):
        TargetInfo.decode({"pid": "x"}, LocalProtocolError)


def test_release_info_decodes_and_round_trips_through_its_dict():
    info = {"quiesce-at": 12.5, "started-at": 10.25, "setup-ms": 3, "counters": [["c0", 5, 6], ["c1", 0, 0]],
            "served": [1, 0], "downtime-ms": 1.5}
    release = ReleaseInfo.decode(info)
    assert release == ReleaseInfo(quiesce_at=12.5, started_at=10.25, setup_ms=3,
                                  counters=(("c0", 5, 6), ("c1", 0, 0)), served=(1, 0), ignored=())
    assert list(release.to_dict()) == ["quiesce-at", "started-at", "counters", "setup-ms", "served"]
    assert ReleaseInfo.decode(release.to_dict()) == release
    assert ReleaseInfo.decode({}) == ReleaseInfo()
    assert ReleaseInfo().to_dict() == {"quiesce-at": None, "started-at": None, "counters": [], "setup-ms": None,
                                       "served": []}


@pytest.mark.parametrize("served", [[0, 2], [0, -1], [0, True], [0, 1.0], "01", {"0": 1}, None, []])
def test_an_order_to_resume_in_is_taken_only_as_indices_into_the_table(served):
    # RELEASED comes after the commit: a bad order is no order, never a refusal.
    assert ReleaseInfo.order({"served": served}, 2) == []
    assert ReleaseInfo.order({"served": [1, 0]}, 2) == [1, 0]
    assert ReleaseInfo.order("junk", 2) == []


def test_junk_in_release_info_is_dropped_and_bad_counters_are_named_in_ignored():
    release = ReleaseInfo.decode({
        "quiesce-at": 12, "started-at": "10.0", "setup-ms": True,
        "counters": [["c0", 5, 6], ["c1", -1, 0], ["c2", True, 0], ["c3", 1], [7, 1, 1], "c4" * 40, {"c5": 1},
                     ["c6", 1.0, 2], ["c7", 1, 2, 3]],
    })
    assert (release.quiesce_at, release.started_at, release.setup_ms) == (None, None, None)
    assert release.counters == (("c0", 5, 6),)
    assert release.ignored == ("list", "list", "list", "list", show("c4" * 40), "dict", "list", "list")
    assert ReleaseInfo.decode({"counters": {"c0": [1, 2]}}) == ReleaseInfo(ignored=("dict",))
    assert ReleaseInfo.decode({"counters": None}) == ReleaseInfo()
    assert ReleaseInfo.decode({"setup-ms": 2.5}).setup_ms == 2.5


def test_counters_follow_released_and_cross_taken_but_come_nowhere_else():
    pair = pair_at(State.RELEASED)
    pair.send(pair.target, Taken(), deliver=False)  # on its way as COUNTERS goes out
    counts = [["c0", 5, 7], ["c1", 0, 3]]
    assert pair.send(pair.source, Counters(counts)) == [Counters(counts)]
    assert pair.source.state is State.RELEASED and pair.target.state is State.TAKEN
    assert pair.send(pair.source, Counters([])) == [Counters([])]  # more than once does no harm
    before = pair_at(State.COMMITTED)
    with pytest.raises(LocalProtocolError, match="cannot send COUNTERS in state COMMITTED"):
        before.source.send(Counters(counts))
    fail_with(before.target, frame(FrameType.COUNTERS, {"counters": counts}), "COUNTERS not allowed in state COMMITTED")


def test_counters_junk_is_left_to_release_info_and_a_released_says_when_they_follow():
    pair = pair_at(State.RELEASED)
    pair.source.receive_data(frame(FrameType.COUNTERS, {"counters": "lots"}))
    pair.target.receive_data(frame(FrameType.COUNTERS, {"counters": "lots"}))
    assert drain(pair.target) == [Counters("lots")]
    release = ReleaseInfo.decode({**ReleaseInfo.info(1.0, 0.5, 2.0, [], [], True), "counters": "lots"})
    assert release.counters_after and release.counters == () and release.ignored == (show("lots"),)
    assert not ReleaseInfo.decode(ReleaseInfo.info(1.0, 0.5, 2.0, [["c0", 1, 2]])).counters_after
    assert "counters-after" not in ReleaseInfo.info(1.0, 0.5, 2.0, [])


def test_a_received_released_with_junk_info_is_passed_on_and_read_leniently():
    pair = pair_at(State.COMMITTED)
    [got] = pair.send(pair.source, Released({"quiesce-at": "soon", "counters": [["c0", 1, 2], None]}))
    assert pair.target.state is State.RELEASED
    assert got.release == ReleaseInfo(counters=(("c0", 1, 2),), ignored=("NoneType",))


NOW = 1_700_000_000.0


def test_section_state_round_trips_through_its_meta():
    state = SectionState(rx_bytes=10, tx_bytes=20, migrations=3, connected_since=NOW - 5,
                         peer=("/run/c0.sock", 1234, "qemu"), stream=("eof-read", "closing"), held=("conn",))
    meta = state.to_meta()
    assert list(meta) == ["rx-bytes", "tx-bytes", "connected-since", "migrations", "peer", "stream", "held"]
    assert meta["peer"] == ["/run/c0.sock", 1234, "qemu"] and meta["stream"] == ["eof-read", "closing"]
    assert SectionState.decode(meta, NOW) == state
    assert SectionState.decode(json.loads(json.dumps(meta)), NOW) == state
    bare = SectionState()
    assert bare.to_meta() == {"rx-bytes": 0, "tx-bytes": 0, "connected-since": None, "migrations": 0, "peer": None}
    assert SectionState.decode(bare.to_meta(), NOW) == bare == SectionState.decode({}, NOW)


def test_a_received_section_offers_its_state_typed():
    pair = pair_at(State.HELD)
    meta = {"state": "connected", "rx-bytes": 7, "tx-bytes": 8, "connected-since": NOW - 1, "migrations": 1,
            "peer": ["p", None, None], "held": ["listener"]}
    [transfer] = pair.send(pair.source, Transfer((Section("c0", meta, b"", {"conn": 3}),)))
    assert transfer.sections[0].meta == meta
    assert transfer.sections[0].state(NOW) == SectionState(7, 8, 1, NOW - 1, ("p", None, None), (), ("listener",))


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"rx-bytes": -1, "tx-bytes": True, "migrations": 1.0}, SectionState()),
        ({"rx-bytes": "5", "tx-bytes": None, "migrations": [1]}, SectionState()),
        ({"rx-bytes": 2**70, "migrations": 2}, SectionState(rx_bytes=2**70, migrations=2)),
        ({"connected-since": NOW + 1}, SectionState()),  # in the future: another clock, or junk
        ({"connected-since": 0}, SectionState()),
        ({"connected-since": -5.0}, SectionState()),
        ({"connected-since": True}, SectionState()),
        ({"connected-since": "2024-01-01"}, SectionState()),
        ({"connected-since": 1000}, SectionState(connected_since=1000.0)),
        ({"connected-since": NOW}, SectionState(connected_since=NOW)),
        ({"peer": "x"}, SectionState()),
        ({"peer": ["a", 1]}, SectionState()),
        ({"peer": ["a", True, None]}, SectionState()),
        ({"peer": ["a", "1", None]}, SectionState()),
        ({"peer": [None, 1, "q"]}, SectionState()),
        ({"peer": ["a", 1, 2]}, SectionState()),
        ({"peer": ("a", 1, "q")}, SectionState()),  # a list, as JSON has it
        ({"peer": ["a", 1, "q"]}, SectionState(peer=("a", 1, "q"))),
        ({"stream": "eof-read"}, SectionState()),
        ({"stream": ["closing", "later-flag", 3, ["x"], "eof-read", "closing"]},
         SectionState(stream=("eof-read", "closing"))),
    ],
)
def test_junk_in_a_section_state_becomes_the_defaults(meta, expected):
    assert SectionState.decode(meta, NOW) == expected
    assert type(SectionState.decode(meta, NOW).connected_since) in (float, type(None))


def test_stream_flags_travel_in_their_own_order():
    assert STREAM_FLAGS == ("eof-read", "eof-pending", "eof-sent", "closing")
    assert SectionState.decode({"stream": list(reversed(STREAM_FLAGS))}, NOW).stream == STREAM_FLAGS


@pytest.mark.parametrize("held", [None, "conn", {"conn": 1}, ["conn", "conn"], [""], [1], ["conn", None]])
def test_a_bad_held_list_is_a_remote_protocol_error_from_section_state(held):
    with pytest.raises(RemoteProtocolError, match="section 'c0': 'held' must be a list of distinct fd roles"):
        Section("c0", {"held": held}).state(NOW)


@pytest.mark.parametrize("held", [None, "conn", ["conn", "conn"], [""], [["conn"]]])
@pytest.mark.parametrize("state, ftype", [(State.ACCEPTED, FrameType.PRECOPY), (State.HELD, FrameType.SECTIONS)])
def test_a_received_section_with_a_bad_held_list_fails_the_codec(held, state, ftype):
    pair = pair_at(state)
    manifest = [{"label": "ok", "meta": {"held": ["conn", "listener"]}, "outbuf": 0, "fds": []},
                {"label": "c0", "meta": {"held": held}, "outbuf": 0, "fds": []}]
    fail_with(pair.target, frame(ftype, sections_payload(manifest)),
              "section 'c0': 'held' must be a list of distinct fd roles")


def test_the_codec_leaves_the_rest_of_a_received_meta_to_section_state():
    # Only "held" is checked per section (cost): junk elsewhere arrives as sent.
    pair = pair_at(State.HELD)
    meta = {"rx-bytes": "junk", "peer": 5, "stream": {}, "connected-since": [], "held": []}
    [transfer] = pair.send(pair.source, Transfer((Section("c0", meta),)))
    assert transfer.sections[0].meta == meta
    assert transfer.sections[0].state(NOW) == SectionState()


def test_sending_a_section_with_a_bad_held_list_is_a_local_protocol_error():
    pair = pair_at(State.HELD)
    with pytest.raises(LocalProtocolError, match="'held' must be a list of distinct fd roles"):
        pair.source.send(Transfer((Section("c0", {"held": ["conn", "conn"]}),)))
    assert pair.source.state is State.HELD


def test_section_states_decode_correctly_by_the_thousand():
    metas = [{"state": "connected", "rx-bytes": i, "tx-bytes": 2 * i, "connected-since": NOW - i, "migrations": 1,
              "peer": ["/run/c.sock", 1000 + i, "qemu"], "held": ["conn", "listener"]} for i in range(10_000)]
    states = [SectionState.decode(meta, NOW) for meta in metas]
    assert states[5] == SectionState(5, 10, 1, NOW - 5, ("/run/c.sock", 1005, "qemu"), (), ("conn", "listener"))
    assert len(set(states)) == len(states)


def test_a_transfer_of_thousands_decodes_in_work_linear_in_its_size():
    # Inside the downtime: twice the sections may cost twice the work, not four
    # times (the benchmark times it; calls are what a busy machine cannot skew).
    def delivering(n):
        pair = pair_at(State.HELD)
        sections = tuple(Section(f"c{i}", {"rx-bytes": i, "held": ["conn"]}, b"x" * (i % 50),
                                 {"listener": 10_000 + i}) for i in range(n))
        chunks = pair.source.send(Transfer(sections=sections))
        return lambda: pair.deliver(pair.source, chunks)
    small, large = calls(delivering(2_000)), calls(delivering(8_000))
    assert large < small * 4 * 1.2, f"{small} calls for 2,000 sections, {large} for 8,000"


def test_entry_fds_counts_what_a_table_entry_says_will_come():
    assert entry_fds({"id": "c0"}) == 0
    assert [entry_fds({"id": "c0", "x-fds": n}) for n in (0, 1, 2)] == [0, 1, 2]
    with pytest.raises(RemoteProtocolError, match="chardev 'c0': 'x-fds' is 3"):
        entry_fds({"id": "c0", "x-fds": 3})


@pytest.mark.parametrize("fds", [3, -1, True, "1", None, 1.0, [1]])
def test_a_received_table_with_a_bad_fd_count_fails_the_codec(fds):
    pair = pair_at(State.HELLO)
    table = {"capabilities": {}, "chardevs": [{"id": "ok", "x-fds": 2}, {"id": "c1", "x-fds": fds}]}
    fail_with(pair.target, frame(FrameType.TABLE, table), "chardev 'c1': 'x-fds' is")


def test_a_received_table_keeps_its_fd_counts():
    pair = pair_at(State.HELLO)
    table = Table({}, ({"id": "a", "x-fds": 2}, {"id": "b"}, {"id": "c", "x-fds": 0}))
    [got] = pair.send(pair.source, table)
    assert got == table and [entry_fds(entry) for entry in got.chardevs] == [2, 0, 0]


def test_sending_a_table_with_a_bad_fd_count_is_a_local_protocol_error():
    pair = pair_at(State.HELLO)
    with pytest.raises(LocalProtocolError, match="chardev 'c1': 'x-fds' is 5"):
        pair.source.send(Table({}, ({"id": "c0"}, {"id": "c1", "x-fds": 5})))
    assert pair.source.state is State.HELLO


def test_show_quotes_short_strings_and_names_everything_else():
    assert show("conn") == "'conn'"
    assert show("x" * 100) == repr("x" * 57) + "..."
    assert show(["deep"] * 3) == "list" and show(None) == "NoneType" and show(7) == "int"


# ---------------------------------------------------------------------------
# A bug of ours while decoding


@pytest.mark.parametrize("exc", [TypeError("boom"), KeyError("label")])
def test_an_exception_in_a_decoder_fails_the_codec_and_is_raised_as_it_is(monkeypatch, exc):
    def broken(self, payload):
        raise exc

    pair = pair_at(State.HELLO)
    monkeypatch.setattr(MigrationCodec, "_decode_table", broken)
    pair.target.receive_data(b"".join(chunk.data for chunk in pair.source.send(TABLE)))
    with pytest.raises(type(exc)) as raised:
        pair.target.next_event()
    assert raised.value is exc
    assert pair.target.state is State.FAILED
    assert pair.target.fds_claimed == 0
    # Every later call says so, as after the peer's mistakes.
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match=r"the codec failed earlier: (TypeError|KeyError)\("):
            pair.target.next_event()
    # And the peer may still be told why, once, as after a RemoteProtocolError.
    [chunk] = pair.target.send(Abort("internal error"))
    assert pair.target.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        pair.target.send(Abort("again"))


def test_an_exception_in_a_decoder_with_an_unprintable_repr_still_fails_the_codec(monkeypatch):
    class Weird(Exception):
        def __repr__(self):
            raise ValueError("no repr")

    def broken(self, payload):
        raise Weird()

    codec = MigrationCodec(Role.TARGET)
    monkeypatch.setattr(MigrationCodec, "_decode_hello", broken)
    codec.receive_data(frame(FrameType.HELLO, {"name": "x", "pid": 1, "version": "1"}))
    with pytest.raises(Weird):
        codec.next_event()
    with pytest.raises(RemoteProtocolError, match=r"the codec failed earlier: Weird"):
        codec.next_event()


# ---------------------------------------------------------------------------
# Property tests


def _answer(codec):
    """Play the target's part so that fuzzed input can reach the later states."""
    if codec.state is State.TABLE_DONE:
        codec.send(Accept())
    elif codec.state is State.PRECOPY_DONE:
        codec.send(Held())
    elif codec.state is State.TRANSFER_DONE:
        codec.send(Ack())


def _feed_expecting_only_remote_errors(codec, pieces):
    try:
        for data, nfds in pieces:
            codec.receive_data(data, nfds)
            for event in drain(codec):
                assert not isinstance(event, type(NEED_DATA))
                _answer(codec)
        codec.receive_data(b"")
        drain(codec)
    except RemoteProtocolError:
        assert codec.state is State.FAILED


def _valid_source_bytes():
    """Everything a source sends in a whole conversation."""
    pair = CodecPair()
    data = b""
    for _, side, event in SCRIPT:
        pair.send(getattr(pair, side), event)
        if side == "source":
            data += b"".join(chunk.data for chunk in pair.chunks)
    return data


VALID_SOURCE_BYTES = _valid_source_bytes()

fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(
    role=st.sampled_from(Role),
    pieces=st.lists(st.tuples(st.binary(min_size=1, max_size=64), st.integers(0, 3)), max_size=8),
)
def test_any_bytes_yield_events_or_remote_protocol_errors(role, pieces):
    _feed_expecting_only_remote_errors(MigrationCodec(role, max_frame=4096), pieces)


@fuzz
@given(
    cut=st.integers(0, len(VALID_SOURCE_BYTES)),
    garbage=st.binary(max_size=200),
    splits=st.lists(st.integers(0, len(VALID_SOURCE_BYTES) + 200), max_size=6),
    fd_counts=st.lists(st.integers(0, 4), min_size=7, max_size=7),
)
def test_garbage_after_a_valid_prefix_yields_events_or_remote_protocol_errors(cut, garbage, splits, fd_counts):
    data = VALID_SOURCE_BYTES[:cut] + garbage
    bounds = sorted({0, len(data), *(min(s, len(data)) for s in splits)})
    pieces = [(data[a:b], n) for (a, b), n in zip(zip(bounds, bounds[1:]), fd_counts) if b > a]
    _feed_expecting_only_remote_errors(MigrationCodec(Role.TARGET), pieces)


@fuzz
@given(position=st.integers(0, len(VALID_SOURCE_BYTES) - 1), value=st.integers(0, 255), extra_fds=st.integers(0, 2))
def test_a_corrupted_byte_yields_events_or_remote_protocol_errors(position, value, extra_fds):
    data = bytearray(VALID_SOURCE_BYTES)
    data[position] = value
    _feed_expecting_only_remote_errors(MigrationCodec(Role.TARGET), [(bytes(data), 5 + extra_fds)])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)


def _without(key):
    # The codec checks "x-fds" in a chardev and "held" in a section's meta (see
    # the typed payloads' tests), and Hypothesis draws keys from the module's own
    # string constants: random values there are not meant to round-trip.
    return lambda obj: {k: v for k, v in obj.items() if k != key}


chardevs = st.builds(lambda cid, rest: {**rest, "id": cid}, st.text(max_size=12), json_objects.map(_without("x-fds")))
sections = st.builds(
    Section,
    label=st.text(max_size=12),
    meta=json_objects.map(_without("held")),
    outbuf=st.binary(max_size=300),
    fds=st.dictionaries(st.text(min_size=1, max_size=8), st.integers(0, 65535), max_size=4),
)


@settings(max_examples=150, deadline=None)
@given(
    max_frame=st.sampled_from([2048, 8192, MAX_FRAME]),
    capabilities=st.dictionaries(st.text(max_size=8), st.booleans(), max_size=4),
    chardev_list=st.lists(chardevs, max_size=30),
    section_list=st.lists(sections, max_size=30),
)
def test_random_tables_and_sections_round_trip(max_frame, capabilities, chardev_list, section_list):
    pair = CodecPair(max_frame=max_frame)
    pair.send(pair.source, HELLO)
    table = Table(capabilities=capabilities, chardevs=tuple(chardev_list))
    assert pair.send(pair.source, table) == [table]
    pair.send(pair.target, Accept())
    [precopy] = pair.send(pair.source, Precopy(tuple(section_list)))
    assert precopy == Precopy(tuple(Section(s.label, s.meta, s.outbuf, dict(zip(s.fds, range(n, n + len(s.fds)))))
                                    for s, n in zip(section_list, _starts(section_list))))
    pair.send(pair.target, Held())
    base = pair.target.fds_received
    [transfer] = pair.send(pair.source, Transfer(tuple(section_list)))
    assert all(len(c.data) - HEADER.size <= max_frame for c in pair.chunks)
    assert len(transfer.sections) == len(section_list)
    for sent, got in zip(section_list, transfer.sections):
        assert (got.label, got.meta, got.outbuf) == (sent.label, sent.meta, sent.outbuf)
        assert pair.fds_of(Role.TARGET, got) == sent.fds
        assert list(got.fds) == list(sent.fds)  # role order survives
    assert pair.target.fds_claimed == pair.target.fds_received == base + sum(len(s.fds) for s in section_list)


def _starts(sections):
    """The index of each section's first fd among those received."""
    starts, n = [], 0
    for section in sections:
        starts.append(n)
        n += len(section.fds)
    return starts


def _service_state(**more):
    from fdmig.migration import wire
    return wire.ServiceState(("gunicorn", "app:app"), 300, "running", True, None, 2, True, "no", 15, 90.0, 1024, 0,
                             **more)


def test_a_service_section_carries_its_draining_generations_and_refuses_junk():
    from fdmig.migration import wire
    state = _service_state(overlap=True, ready_delay=0.5,
                           draining=((100, 1796600000.0, 1796600090.0, False), (200, 1796600010.0, 1.7966001e9, True)))
    assert wire.ServiceState.decode(state.to_meta()) == state
    older = {k: v for k, v in _service_state().to_meta().items() if k not in ("overlap", "ready-delay", "draining")}
    assert wire.ServiceState.decode(older) == _service_state()  # a source before --overlap
    for junk, said in (([{"pid": 0, "since": 1, "kill-at": 2}], "is not a process id"),
                       ([{"pid": 7, "since": "now", "kill-at": 2}], "must be times"),
                       ([{"pid": 7, "since": 1, "kill-at": 2, "killed": 1}], "'killed' must be a bool"),
                       ({"pid": 7}, "must be a list"),
                       ([{"pid": 7, "since": 1, "kill-at": 2}] * (wire.MAX_DRAINING + 1), "at most")):
        with pytest.raises(RemoteProtocolError, match=said):
            wire.ServiceState.decode(dict(state.to_meta(), draining=junk))
