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


def _staging_target(port: int):
    """A target session over TCP as it takes the precopy: one marked TCP echo
    server chardev, e0, with its blank socket and listener made (no channel:
    the sections are handed to it as the codec would)."""
    from fdmig import daemon, poller
    from fdmig.migration import target, wire
    from fdmig.spec import parse_spec

    instance = daemon.Instance("web", "/nonexistent/web.sock", capabilities=("x-tcp-repair",), incoming=True)
    instance.poller = poller.Poller(asyncio.get_running_loop())
    spec = parse_spec(f"socket,id=e0,host=127.0.0.1,port={port},server=on,support-local-migration=on,frontend=echo")
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
                                  "length-not-a-count", "alone-not-staged"])
def test_a_source_s_tcp_sections_out_of_place_are_refused_with_the_reason(case):
    from fdmig.migration import repair, target, wire

    async def main():
        port = _free_port()
        session = _staging_target(port)
        blob = _tcp_state(port)
        if case in ("plain-after-staged", "length-not-a-count"):
            session._take([wire.Section("e0", _chardev_meta(**{repair.LATER: True}))])
            _in_downtime(session)
        sections = {
            "plain-after-staged": [wire.Section("e0", _chardev_meta())],
            "piece-for-a-list": [wire.Section("#tcp-1.0", {"chardev": ["e0"]}, b"")],
            "tcp-in-precopy": [wire.Section("e0", _chardev_meta(tcp=len(blob), **{"tcp-here": len(blob)}), blob)],
            "later-with-bytes": [wire.Section("e0", _chardev_meta(**{repair.LATER: True}), b"carried")],
            "length-not-a-count": [wire.Section("#tcp-1.0", {"chardev": "e0", "tcp": True}, blob)],
            "alone-not-staged": [wire.Section("#tcp-1.0", {"chardev": "e0", "tcp": len(blob)}, blob)],
        }[case]
        if case in ("piece-for-a-list", "alone-not-staged"):
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
            "alone-not-staged": "its chardev was not in the precopy"}[case] in reason


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

        def no_memory(sock, on):
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        monkeypatch.setattr(tcprepair, "_transparent", no_memory)
        blob = _tcp_state(port)
        with pytest.raises(target.Refused, match="Cannot allocate memory"):
            session._take([wire.Section("#tcp-1.0", {"chardev": "e0", "tcp": len(blob)}, blob)])
        assert staged.fileno() == fd  # still open: the chardev's, watched
        session.chan = types.SimpleNamespace(codec=types.SimpleNamespace(state=wire.State.FAILED), close=lambda: None)
        await session.abort(target.Refused("the test"))
        assert staged.fileno() == -1 and fd not in session.instance.poller._handlers

    asyncio.run(main())
