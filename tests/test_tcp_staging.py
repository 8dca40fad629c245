"""What a migration's target refuses of a source's TCP sections (capability
x-tcp-repair), on a target session fed the sections as its codec would hand
them over: no channel, no network namespace, but real sockets in repair mode
(CAP_NET_ADMIN)."""

import asyncio
import errno
import socket
import time
import types

import pytest

from fdmig import tcprepair

pytestmark = pytest.mark.skipif(not tcprepair.capable(), reason="TCP_REPAIR needs CAP_NET_ADMIN (root)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _staging_target(port: int, host: str = "127.0.0.1"):
    """A target session over TCP as it takes the precopy: one marked TCP echo
    server chardev, e0, with its blank socket and listener made (no channel:
    the sections are handed to it as the codec would)."""
    from fdmig import daemon, poller
    from fdmig.migration import target, wire
    from fdmig.spec import parse_spec

    instance = daemon.Instance("web", "/nonexistent/web.sock", capabilities=("x-tcp-repair",), incoming=True)
    instance.poller = poller.Poller(asyncio.get_running_loop())
    spec = parse_spec(f"socket,id=e0,host={host},port={port},server=on,support-local-migration=on,frontend=echo")
    session = target.TargetSession(instance, types.SimpleNamespace(close=lambda: None), [], {})
    session.remote = True
    session.plan = target.Plan({"e0": spec}, ["e0"], {"x-tcp-repair": True})
    session.table_index = {"e0": 0}
    session.chardevs = {"e0": instance.register(spec, frame=False)}
    session.restorer.prepare([spec])
    instance.freeze(quiesce=False)
    session.expected = (wire.Precopy, None, "its precopy")
    return session


def _in_downtime(session) -> None:
    from fdmig.migration import wire
    session.seen = set()
    session.expected = (wire.Transfer, None, "the state")


def _chardev_meta(**more) -> dict:
    from fdmig.migration import wire
    return {**wire.SectionState.meta(5, 5, 0, time.time() - 1, ("tcp:127.0.0.1:40000", None, None), (), ()), **more}


def _tcp_state(port: int) -> bytes:
    from fdmig import tcpstate
    return tcpstate.encode(tcpstate.TcpState(family=socket.AF_INET, local=("127.0.0.1", port), peer=("127.0.0.1", 40000),
                                             send_seq=1000, recv_seq=2000, mss=1460, sack=True, wscale=(7, 7)))


@pytest.mark.parametrize("case", ["plain-after-staged", "piece-for-a-list", "tcp-in-precopy", "later-with-bytes",
                                  "length-not-a-count", "alone-not-staged", "local-a-name", "local-not-a-pair",
                                  "local-elsewhere", "local-another-port", "local-another-host",
                                  "local-wildcard", "states-in-precopy", "states-lengths-off",
                                  "states-not-a-chardev", "states-not-staged", "states-twice"])
def test_a_source_s_tcp_sections_out_of_place_are_refused_with_the_reason(case):
    from fdmig.migration import repair, target, wire

    async def main():
        port = _free_port()
        session = _staging_target(port, "0.0.0.0" if case == "local-elsewhere" else "127.0.0.1")
        blob = _tcp_state(port)
        if case in ("plain-after-staged", "length-not-a-count", "states-twice"):
            session._take([wire.Section("e0", _chardev_meta(**{repair.LATER: True}))])
            _in_downtime(session)
        if case == "local-elsewhere":  # a connection the precopy said is from another address
            session._take([wire.Section("e0", _chardev_meta(**{repair.LATER: True,
                                                               repair.LOCAL: ["127.0.0.2", port]}))])
            _in_downtime(session)
        sections = {
            "plain-after-staged": [wire.Section("e0", _chardev_meta())],
            "piece-for-a-list": [wire.Section("#tcp-1.0", {"chardev": ["e0"]}, b"")],
            "tcp-in-precopy": [wire.Section("e0", _chardev_meta(tcp=len(blob), **{"tcp-here": len(blob)}), blob)],
            "later-with-bytes": [wire.Section("e0", _chardev_meta(**{repair.LATER: True}), b"carried")],
            "length-not-a-count": [wire.Section("#tcp-1.0", {"chardev": "e0", "tcp": True}, blob)],
            "alone-not-staged": [wire.Section("#tcp-1.0", {"chardev": "e0", "tcp": len(blob)}, blob)],
            # Never a name to look up: an address as the kernel writes it.
            "local-a-name": [wire.Section("e0", _chardev_meta(**{repair.LATER: True,
                                                                 repair.LOCAL: ["localhost", port]}))],
            "local-not-a-pair": [wire.Section("e0", _chardev_meta(**{repair.LATER: True,
                                                                     repair.LOCAL: f"127.0.0.1:{port}"}))],
            # The server's connections are at its address and port: never a
            # port of the host's other services, held the session long.
            "local-another-port": [wire.Section("e0", _chardev_meta(**{repair.LATER: True,
                                                                       repair.LOCAL: ["127.0.0.1", 22]}))],
            "local-another-host": [wire.Section("e0", _chardev_meta(**{repair.LATER: True,
                                                                       repair.LOCAL: ["127.0.0.2", port]}))],
            "local-wildcard": [wire.Section("e0", _chardev_meta(**{repair.LATER: True,
                                                                   repair.LOCAL: ["0.0.0.0", port]}))],
            "local-elsewhere": [wire.Section("#tcp-1.0", {"chardev": "e0", "tcp": len(blob)}, blob)],
            "states-in-precopy": [_states(["e0"], blob)],
            "states-lengths-off": [wire.Section("#tcps-1", {"chardevs": ["e0"], "tcp": [len(blob) + 1]}, blob)],
            "states-not-a-chardev": [_states(["e1"], blob)],
            "states-not-staged": [_states(["e0"], blob)],
            "states-twice": [_states(["e0", "e0"], blob + blob)],
        }[case]
        if case in ("piece-for-a-list", "alone-not-staged", "states-lengths-off", "states-not-a-chardev",
                    "states-not-staged"):
            _in_downtime(session)
        with pytest.raises(target.Refused) as refused:
            session._take(sections)
        return str(refused.value)

    reason = asyncio.run(main())
    assert {"plain-after-staged": "staged to come with its TCP state, but its section has none",
            "piece-for-a-list": "not a chardev of the table",
            "tcp-in-precopy": "TCP state before the downtime",
            "later-with-bytes": "a connection to come with its TCP state, for a chardev that cannot move so",
            "length-not-a-count": "bytes of TCP state arrived, the section says",
            "alone-not-staged": "its chardev was not in the precopy",
            "local-a-name": "'localhost' is not an IP address",
            "local-not-a-pair": "not [address, port]",
            "local-elsewhere": "from 127.0.0.1 port",
            "local-another-port": "127.0.0.1 port 22: not the server's address",
            "local-another-host": "not the server's address",
            "local-wildcard": "no connection is from such an address",
            "states-in-precopy": "TCP state over a unix channel, before the downtime",
            "states-lengths-off": "not TCP states",
            "states-not-a-chardev": "'e1', not a chardev of the table",
            "states-not-staged": "its chardev was not in the precopy",
            "states-twice": "its TCP state came twice"}[case] in reason
    if case == "local-elsewhere":
        assert "its precopy said 127.0.0.2 port" in reason


def _states(labels, blob):
    """A TCP_STATES section: the states of staged chardevs, one after another."""
    from fdmig.migration import wire
    each = len(blob) // len(labels)
    return wire.Section("#tcps-1", {"chardevs": labels, "tcp": [each] * len(labels)}, blob)


def test_a_connection_made_since_the_precopy_from_another_address_is_restored_into_a_socket_of_its_own():
    """A server listening on every address: the precopy's connection was to one,
    the one at the dump (made since, so its chardev comes whole) to another.
    The socket staged and bound for the first gives way to one of its own."""
    from fdmig.migration import repair, wire

    async def main():
        port = _free_port()
        session = _staging_target(port, "0.0.0.0")
        session._take([wire.Section("e0", _chardev_meta(**{repair.LATER: True, repair.LOCAL: ["127.0.0.2", port]}))])
        staged = session.restorer.staged["e0"][0]
        staged_fd = staged.fileno()
        _in_downtime(session)
        blob = _tcp_state(port)  # from 127.0.0.1
        session._take([wire.Section("e0", _chardev_meta(tcp=len(blob), **{"tcp-here": len(blob)}), blob)])
        conn = session.sockets["e0"]["conn"]
        assert conn is not staged and staged.fileno() == -1
        assert conn.getsockname() == ("127.0.0.1", port) and session.restorer.conns == [conn]
        handlers = session.instance.poller._handlers
        assert conn.fileno() in handlers and (staged_fd == conn.fileno() or staged_fd not in handlers)
        session.restorer.discard()
        conn.close()

    asyncio.run(main())


@pytest.mark.parametrize("form", ["pieces", "states"])
def test_a_staged_connection_is_bound_before_the_downtime_and_restored_into_that_socket(form):
    """The precopy says where the connection is from: the target binds the socket
    it stages for it then, and the downtime restores the connection into it,
    its state in pieces (as a send queue of megabytes comes) or among the
    states of a frame."""
    from fdmig.migration import repair, wire

    async def main():
        port = _free_port()
        session = _staging_target(port)
        session._take([wire.Section("e0", _chardev_meta(**{repair.LATER: True, repair.LOCAL: ["127.0.0.1", port]}))])
        staged = session.restorer.staged["e0"][0]
        assert staged.getsockname() == ("127.0.0.1", port)
        _in_downtime(session)
        blob = _tcp_state(port)
        if form == "pieces":
            session._take([wire.Section("#tcp-1.0", {"chardev": "e0"}, blob[:40]),
                           wire.Section("#tcp-1.1", {"chardev": "e0", "tcp": len(blob)}, blob[40:])])
        else:
            session._take([_states(["e0"], blob)])
        assert session.restorer.conns == [staged]
        assert staged.getpeername() == ("127.0.0.1", 40000)
        info = staged.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        assert info[0] == tcprepair.TCP_ESTABLISHED
        session.restorer.discard()
        staged.close()

    asyncio.run(main())


def test_a_staged_connection_that_fails_to_restore_leaves_nothing_watched(monkeypatch):
    """The staged socket is watched from the precopy on: a failed restore leaves
    it open for the abort to unwatch first, so that no stale entry in the poller
    swallows the next socket to get its fd number."""
    from fdmig.migration import repair, target, wire

    async def main():
        port = _free_port()
        session = _staging_target(port)
        session._take([wire.Section("e0", _chardev_meta(**{repair.LATER: True}))])
        staged = session.restorer.staged["e0"][0]
        fd = staged.fileno()
        assert fd in session.instance.poller._handlers
        _in_downtime(session)

        def no_memory(sock, option, value):
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        monkeypatch.setattr(tcprepair, "_set", no_memory)
        blob = _tcp_state(port)
        with pytest.raises(target.Refused, match="Cannot allocate memory"):
            session._take([wire.Section("#tcp-1.0", {"chardev": "e0", "tcp": len(blob)}, blob)])
        assert staged.fileno() == fd  # still open: the chardev's, watched
        session.chan = types.SimpleNamespace(codec=types.SimpleNamespace(state=wire.State.FAILED), close=lambda: None)
        await session.abort(target.Refused("the test"))
        assert staged.fileno() == -1 and fd not in session.instance.poller._handlers

    asyncio.run(main())


def test_the_dump_sends_a_frame_s_one_piece_states_together_each_section_bounded(monkeypatch):
    """Unchanged since the precopy, a frame's connections go as TCP_STATES
    sections, none over a piece's bound; one whose send queue is bigger than a
    piece goes in pieces, the last saying their length. Every state is there
    once, and each is its connection's."""
    from fdmig import tcpstate
    from fdmig.migration import form, repair
    from fdmig.spec import parse_spec

    monkeypatch.setattr(repair, "PIECE", 200)  # a state of no bytes is 92: two to a section
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        port = server.getsockname()[1]
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(7)]
        peers = [server.accept()[0] for _ in conns]
        conns[2].setblocking(False)
        try:  # c2's peer reads nothing: its send queue fills
            while True:
                conns[2].send(b"x" * 65536)
        except BlockingIOError:
            pass
        chardevs = [types.SimpleNamespace(
            label=f"c{i}", conn=conn, outbuf=bytearray(), settled=True, listener=None, eof_read=False,
            eof_pending=False, eof_sent=False, closing=False,
            spec=parse_spec(f"socket,id=c{i},host=127.0.0.1,port={port},support-local-migration=on"))
            for i, conn in enumerate(conns)]
        names = {c.label: (c.conn.getsockname(), c.conn.getpeername()) for c in chardevs}
        precopied = {c.label: (form.fingerprint(c), names[c.label]) for c in chardevs}
        in_repair, moved = [], repair.Moved()
        try:
            frames = list(repair.dump(chardevs, True, in_repair, moved, None, precopied, set(), batch=4))
        finally:
            for conn in conns + peers:
                conn.close()  # in repair mode: silent
    assert len(frames) == 2 and moved.precopied == 7
    states, pieces = {}, []
    for section in (s for frame in frames for s in frame):
        assert len(section.outbuf) <= 200, section.label
        if section.label.startswith(repair.TCP_STATES):
            states.update(repair.Restorer.states(section, {c.label for c in chardevs}))
        else:
            pieces.append(section)
    assert sorted(states) == ["c0", "c1", "c3", "c4", "c5", "c6"]
    assert all(s.meta["chardev"] == "c2" for s in pieces) and len(pieces) > 2
    assert pieces[-1].meta["tcp"] == sum(len(s.outbuf) for s in pieces) and "tcp" not in pieces[0].meta
    big = tcpstate.decode(b"".join(s.outbuf for s in pieces))
    assert len(big.send_queue) > 200
    for label, blob in states.items():
        assert (tcpstate.decode(blob).local, tcpstate.decode(blob).peer) == names[label]
