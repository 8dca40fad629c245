"""The precopy is paced (fdmig.pacing): between two frames the source's loop
serves the chardevs for PACE times as long as the frame took to make, and the
target takes the sections a slice at a time, paced the same way (issue 13: the
precopy, and the target's checking of it, took the CPU from serving)."""

import asyncio
import resource
import socket
import types

import pytest

from fdmig import daemon, pacing, poller, spec
from fdmig.migration import source, target, wire


@pytest.mark.timeout(60)
def test_the_precopy_yields_to_serving_between_frames_for_a_time_in_proportion_to_its_own(tmp_path, monkeypatch):
    count = 2 * source.PRECOPY_SLICE + 10  # three frames (of one fd per chardev)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * count:  # each chardev's socket and its peer's, and the rest of the suite's
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * count)), hard))
    pauses, sent = [], []

    async def main():
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "peers.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(count)
        listener.setblocking(False)
        instance = daemon.Instance("pace", str(tmp_path / "c.sock"), capabilities=("local-char-socket",))
        instance.poller = poller.Poller(loop)
        for i in range(count):
            chardev = instance.register(
                spec.parse_spec(f"id=c{i},path={path},frontend=echo,support-local-migration=on"))
            await instance.open_registered(chardev)
        peers = [(await loop.sock_accept(listener))[0] for _ in range(count)]
        session = source.SourceSession(instance, types.SimpleNamespace(tcp=False), None)

        async def send(event, deadline=None):
            sent.append(len(event.sections))
        session.chan = types.SimpleNamespace(send=send)
        real_sleep = asyncio.sleep

        async def paced(delay):
            pauses.append(delay)
            await real_sleep(0)
        monkeypatch.setattr(pacing.asyncio, "sleep", paced)
        await session._precopy()
        for sock in (*peers, listener):
            sock.close()
        instance.shutdown()

    asyncio.run(main())
    assert sum(sent) == count and len(sent) == 3
    assert len(pauses) == 2 and all(pause > 0 for pause in pauses)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("paced", [True, False])
def test_the_target_takes_the_precopy_a_slice_at_a_time_yielding_in_proportion_and_the_downtime_at_once(
        monkeypatch, paced):
    taken, pauses, clock = [], [], [100.0]

    def take(sections):
        taken.append(len(sections))
        clock[0] += 0.002 * len(sections)  # each section costs 2 ms of this clock

    async def sleep(delay):
        pauses.append(delay)
    monkeypatch.setattr(pacing.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(pacing.asyncio, "sleep", sleep)
    session = target.TargetSession.__new__(target.TargetSession)
    session._take = take
    session.expected = (wire.Precopy if paced else wire.Transfer, None, "")
    asyncio.run(session._take_some(list(range(2 * target.SLICE + 3))))
    if paced:
        assert taken == [target.SLICE, target.SLICE, 3]
        assert pauses == pytest.approx([0.002 * n * pacing.PACE for n in taken])
    else:
        assert taken == [2 * target.SLICE + 3] and pauses == []


@pytest.mark.timeout(30)
def test_a_target_that_fails_after_the_precopy_leaves_its_staging_to_the_collector():
    # The collector is off on a target from the table to the resume; what the
    # session staged is frozen (out of every collection, for good) only at the
    # commit. A session refused after HELD is garbage the collector takes, not a
    # copy of its staging kept by a target that goes on waiting for the next source.
    import gc
    import weakref
    held, refs = [], {}

    async def send(event, deadline=None):
        held.append(event)

    async def main():
        instance = daemon.Instance("web", "/nonexistent/web.sock", capabilities=("local-char-socket",), incoming=True)
        instance.poller = poller.Poller(asyncio.get_running_loop())
        chan = types.SimpleNamespace(send=send, close=lambda: None, codec=types.SimpleNamespace(state=wire.State.FAILED))
        session = target.TargetSession(instance, chan, [], {})
        chardev_spec = spec.parse_spec("id=c0,path=/nonexistent/c0.sock,frontend=echo,support-local-migration=on")
        session.plan = target.Plan({"c0": chardev_spec}, ["c0"], {"local-char-socket": True})
        session.table_index = {"c0": 0}
        session.chardevs = {"c0": instance.register(chardev_spec, frame=False)}
        instance.freeze(quiesce=False)  # as on_table leaves it
        session.expected = (wire.Precopy, session.on_precopy, "its precopy")
        await session.on_precopy(wire.Precopy([]))
        assert [type(event) for event in held] == [wire.Held]
        refs["session"], refs["plan"] = weakref.ref(session), weakref.ref(session.plan)
        await session.abort(target.Refused("the source's TRANSFER names a chardev not in its table"))

    frozen = gc.get_freeze_count()
    try:
        asyncio.run(main())
        assert gc.isenabled(), "abort() leaves the collector off"
        gc.collect()
        assert gc.get_freeze_count() == frozen
        assert refs["session"]() is None and refs["plan"]() is None
    finally:
        gc.unfreeze()  # whatever a failure froze in this process
