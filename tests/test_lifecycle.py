"""The two lifecycles as tables: an instance's run state and migration status
(fdmig.lifecycle), and a chardev's state (fdmig.chardev.TRANSITIONS). A step the
table does not list is a bug in fdmig and is refused where it happens, before it
can leave an instance half-changed."""

import asyncio
import socket

import pytest

from fdmig import chardev as chardevs, lifecycle
from fdmig.lifecycle import Lifecycle, MigrationStatus as M, RunState, TransitionError
from fdmig.poller import Poller
from fdmig.spec import parse_spec


def recording(incoming=False):
    events, notes = [], []
    life = Lifecycle(incoming, lambda name, data: events.append((name, data)), notes.append)
    return life, events, notes


def test_a_source_that_completes_is_postmigrate_and_says_so_once_with_fdmigs_fields():
    life, events, notes = recording()
    life.migration_to(M.SETUP, chardevs=0, error=None)
    assert life.migrating and life.run_state is RunState.RUNNING
    life.migration_to(M.ACTIVE, setup_ms=1.5)
    life.migration_to(M.COMPLETED, chardevs=3, downtime_ms=0.7, target={"pid": 9})
    assert life.run_state is RunState.POSTMIGRATE and not life.migrating
    assert [data["status"] for _, data in events] == ["setup", "active", "completed"]
    assert events[-1] == ("MIGRATION", {"status": "completed", "x-fdmig-error": None, "x-fdmig-timed-out": False,
                                        "x-fdmig-chardevs": 3, "x-fdmig-downtime-ms": 0.7, "x-fdmig-total-ms": None,
                                        "x-fdmig-target": {"pid": 9}})
    assert notes == ["STATUS=migration setup", "STATUS=migration active", "STATUS=migration completed"]
    # The status JSON's migration object: status first, fields in their old order.
    assert list(life.info()) == ["status", "chardevs", "downtime-ms", "total-ms", "setup-ms", "error", "target"]


def test_a_target_that_refuses_a_source_waits_on_and_runs_once_one_completes():
    life, events, _ = recording(incoming=True)
    life.migration_to(M.ACTIVE, source_pid=5)
    life.migration_to(M.FAILED, error="refused source pid 5: foreign")
    assert life.run_state is RunState.INMIGRATE and life.get("error").startswith("refused")
    life.migration_to(M.ACTIVE, error=None, source_pid=6)
    life.migration_to(M.COMPLETED, chardevs=1)
    assert life.run_state is RunState.RUNNING
    life.migration_to(M.SETUP)  # and it may migrate on, as a source
    assert life.migrating


@pytest.mark.parametrize("before, after", [(M.NONE, M.COMPLETED), (M.SETUP, M.SETUP), (M.COMPLETED, M.ACTIVE)])
def test_a_migration_step_the_table_does_not_list_is_refused_and_changes_nothing(before, after):
    life, events, _ = recording()
    life.status = before
    with pytest.raises(TransitionError):
        life.migration_to(after, error="x")
    assert life.status is before and life.get("error") is None and events == []


def test_every_status_has_its_successors_and_only_terminal_ones_end_a_migration():
    assert set(lifecycle.MIGRATION_TRANSITIONS) == set(M)
    assert lifecycle.TERMINAL.isdisjoint(lifecycle.IN_PROGRESS)
    for status in lifecycle.IN_PROGRESS:
        assert lifecycle.MIGRATION_TRANSITIONS[status] & lifecycle.TERMINAL


def test_a_chardev_state_change_the_table_does_not_list_is_refused(tmp_path):
    async def main():
        changes = []
        poller = Poller(asyncio.get_running_loop())
        spec = parse_spec(f"socket,id=app,path={tmp_path}/app.sock,server=on")
        chardev = chardevs.Chardev(spec, lambda c: changes.append(c.state), poller)
        await chardev.open()
        assert chardev.state is chardevs.State.LISTENING
        chardev.quiesce()
        assert chardev.quiesced and chardev.settled is chardevs.State.LISTENING
        chardev.released()
        assert chardev.state is chardevs.State.MIGRATED
        with pytest.raises(chardevs.TransitionError, match="migrated -> connected"):
            chardev._set_state(chardevs.State.CONNECTED)
        assert chardev.state is chardevs.State.MIGRATED
        assert changes == [chardevs.State.LISTENING, chardevs.State.MIGRATING, chardevs.State.MIGRATED]
        poller.close()
    asyncio.run(main())


def test_quiesce_all_and_resume_all_leave_each_where_it_stood_and_bytes_written_meanwhile_go_out(tmp_path):
    # The downtime's inline path (quiesce_all, resume_all) must do what quiesce()
    # and resume() do: a listener accepts again, and bytes given to a quiesced
    # chardev go out once it resumes, though no update_io ran for them.
    async def main():
        poller = Poller(asyncio.get_running_loop())
        path = f"{tmp_path}/peer.sock"
        peer_listener = socket.socket(socket.AF_UNIX)
        peer_listener.bind(path)
        peer_listener.listen()
        connected = asyncio.Event()
        server = chardevs.Chardev(parse_spec(f"socket,id=srv,path={tmp_path}/srv.sock,server=on"),
                                  lambda c: c.state is chardevs.State.CONNECTED and connected.set(), poller)
        client = chardevs.Chardev(parse_spec(f"socket,id=cli,path={path}"), lambda c: None, poller)
        await server.open()
        await client.open()
        peer, _ = peer_listener.accept()
        both = [server, client]
        chardevs.quiesce_all(both)
        assert [(c.state, c.settled) for c in both] == [
            (chardevs.State.MIGRATING, chardevs.State.LISTENING), (chardevs.State.MIGRATING, chardevs.State.CONNECTED)]
        client.write(b"while quiesced")
        chardevs.resume_all(both)
        assert [c.state for c in both] == [chardevs.State.LISTENING, chardevs.State.CONNECTED]
        assert all(c.paused_from is None for c in both)
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        got = await asyncio.wait_for(loop.sock_recv(peer, 100), 10)
        newcomer = socket.socket(socket.AF_UNIX)
        newcomer.connect(f"{tmp_path}/srv.sock")
        await asyncio.wait_for(connected.wait(), 10)
        for sock in (peer, peer_listener, newcomer):
            sock.close()
        for c in both:
            c.close()
        poller.close()
        return got
    assert asyncio.run(main()) == b"while quiesced"


def test_a_quiesced_chardev_resumes_where_it_stood_and_watches_again(tmp_path):
    async def main():
        poller = Poller(asyncio.get_running_loop())
        path = f"{tmp_path}/app.sock"
        connected = asyncio.Event()

        def changed(c):
            if c.state is chardevs.State.CONNECTED:
                connected.set()
        chardev = chardevs.Chardev(parse_spec(f"socket,id=app,path={path},server=on"), changed, poller)
        await chardev.open()
        assert chardev.watched  # accepting
        chardev.quiesce()
        chardev.unwatch()
        assert not chardev.watched
        chardev.resume()
        assert chardev.state is chardevs.State.LISTENING and chardev.watched
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        await asyncio.wait_for(connected.wait(), 10)
        client.close()
        chardev.close()
        poller.close()
    asyncio.run(main())
