"""Live migration with real processes, real sockets and real SCM_RIGHTS: what a
peer of a moved connection sees, rollback at each step, and the target's checks."""

import json
import os
import select
import signal
import socket
import threading
import time

import psutil
import pytest

from fdmig.demo import Peer
from fdmig.migration import wire
from fdmig import paths, qmp
from fdmig.errors import QMPError
from tests.helpers import (Pump, connect_unix, connect_when_bound, echoes, read_event, recv_exactly, run,
                           send_chunks)

ECHO = "socket,id=app,path={path},server=on,frontend=echo,support-local-migration=on"


def status(*instance_args) -> dict:
    result = run("status", "--json", *instance_args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def chardev(state: dict, label: str) -> dict:
    return next(c for c in state["chardevs"] if c["label"] == label)


@pytest.fixture
def echo_instance(daemons, short_dir):
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", ECHO.format(path=path))
    return source, path


def stream_is_intact(peer: Peer) -> None:
    peer.finish()
    assert peer.bad is None
    assert not peer.eof, "the peer saw EOF"
    assert peer.sent > 0 and peer.echoed == peer.sent


def test_peer_streams_through_50_migrations_without_loss_or_eof(echo_instance, last_instance):
    source, path = echo_instance
    peer = Peer(path)
    peer.start()
    pids = [source.pid]
    open_fds = []
    for _ in range(50):
        result = run("migrate-out", "--name", "web", "--spawn", "--json", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert outcome["source-pid"] == pids[-1] and outcome["target-pid"] not in pids
        assert not psutil.pid_exists(pids[-1]) or psutil.Process(pids[-1]).status() == psutil.STATUS_ZOMBIE
        pids.append(outcome["target-pid"])
        open_fds.append(status("--name", "web")["open-fds"])
        assert peer.bad is None and not peer.eof
    state = status("--name", "web")
    app = chardev(state, "app")
    assert state["pid"] == pids[-1]
    assert app["migrations"] == 50 and app["state"] == "connected"
    assert state["migration"]["status"] == "completed" and state["migration"]["chardevs"] == 1
    assert state["migration"]["downtime-ms"] > 0
    assert len(set(open_fds[5:])) == 1, f"open fds drift across migrations: {open_fds}"
    stream_is_intact(peer)


def test_status_after_migration_shows_new_pid_and_counters(echo_instance):
    source, path = echo_instance
    sock = connect_unix(path)
    sock.sendall(b"before\n")
    assert recv_exactly(sock, 7) == b"before\n"
    result = run("migrate-out", "--name", "web", "--spawn", "--json")
    assert result.returncode == 0, result.stderr
    target_pid = json.loads(result.stdout)["target-pid"]
    assert source.proc.wait(10) == 0
    sock.sendall(b"after\n")
    assert recv_exactly(sock, 6) == b"after\n"
    state = status("--name", "web")
    app = chardev(state, "app")
    assert state["pid"] == target_pid
    # Counted by the kernel (the size of /proc/PID/fd), not listed; the status
    # call's own connection is one more than what we list once it has closed.
    assert 0 <= state["open-fds"] - len(os.listdir(f"/proc/{target_pid}/fd")) <= 1
    assert (app["rx-bytes"], app["tx-bytes"]) == (13, 13)
    assert app["peer-pid"] == os.getpid()
    assert state["capabilities"] == {"local-char-socket": True, "x-tcp-repair": False}
    mig = state["migration"]
    assert mig["status"] == "completed" and mig["total-ms"] >= mig["downtime-ms"] > 0
    os.kill(target_pid, signal.SIGTERM)


def test_a_moved_chardev_logs_on_into_the_same_logfile(daemons, short_dir, last_instance):
    path, logfile = os.path.join(short_dir, "app.sock"), os.path.join(short_dir, "app.log")
    daemons("serve", "--name", "web", "--capability", "local-char-socket",
            "--chardev", ECHO.format(path=path) + f",logfile={logfile}")
    sock = connect_unix(path)
    assert echoes(sock, b"before;")
    result = run("migrate-out", "--name", "web", "--spawn", "--json")
    assert result.returncode == 0, result.stderr
    assert echoes(sock, b"after;")
    result = run("migrate-out", "--name", "web", "--spawn", "--json")  # and back, the log still one
    assert result.returncode == 0, result.stderr
    assert echoes(sock, b"again;")
    with open(logfile, "rb") as f:
        assert f.read() == b"before;after;again;"


def test_bytes_a_stalled_bridge_holds_move_with_it_and_arrive_once_in_order(daemons, short_dir, last_instance):
    a_path, b_path = f"{short_dir}/a.sock", f"{short_dir}/b.sock"
    flags = "server=on,support-local-migration=on"
    daemons("serve", "--name", "web", "--capability", "local-char-socket",
            "--chardev", f"socket,id=a,path={a_path},{flags},bridge=b", "--chardev", f"socket,id=b,path={b_path},{flags}")
    a, b = connect_unix(a_path), connect_unix(b_path)
    assert run("status", "--name", "web", "--wait", "a=connected", "--wait", "b=connected").returncode == 0
    data = os.urandom(8 << 20)
    view, sent = memoryview(data), 0
    b.setblocking(False)
    while True:  # `a` reads nothing: b's peer stalls once the instance holds all it will
        try:
            sent += b.send(view[sent:sent + 65536])
        except BlockingIOError:
            _, writable, _ = select.select([], [b], [], 1.0)
            if not writable:
                break  # nothing drained for a second: the bridge's out-buffer is full
    assert sent < len(data) // 2
    result = run("migrate-out", "--name", "web", "--spawn", "--json")
    assert result.returncode == 0, result.stderr
    reader = Pump(recv_exactly, a, len(data))
    b.setblocking(True)
    b.settimeout(20)
    b.sendall(view[sent:])
    assert reader.join() == data  # what the source held came first, once, then the rest
    state = status("--name", "web")
    assert state["pid"] == json.loads(result.stdout)["target-pid"]
    assert chardev(state, "a")["tx-bytes"] == chardev(state, "b")["rx-bytes"] == len(data)


def test_migrate_in_and_out_as_two_commands(daemons, echo_instance):
    source, path = echo_instance
    sock = connect_unix(path)
    target = daemons("migrate-in", "--name", "web", ready=False)
    result = run("migrate-out", "--name", "web")
    assert result.returncode == 0, result.stderr
    assert "migrated 1 chardev(s) live" in result.stdout
    target.wait_ready()
    assert target.notify.wait_for("MAINPID")["MAINPID"] == str(target.pid)
    sock.sendall(b"x" * 1000)
    assert recv_exactly(sock, 1000) == b"x" * 1000
    assert source.proc.wait(10) == 0
    assert os.path.exists(path), "the source unlinked a socket path that is the target's now"
    assert target.stop() == 0
    assert not os.path.exists(path), "the target left its socket path behind on exit"


def test_unmarked_chardev_peer_sees_eof_and_reconnects_to_target(daemons, short_dir, last_instance):
    moved, fresh = os.path.join(short_dir, "m.sock"), os.path.join(short_dir, "f.sock")
    daemons("serve", "--name", "web", "--capability", "local-char-socket",
            "--chardev", ECHO.format(path=moved),
            "--chardev", f"socket,id=plain,path={fresh},server=on,frontend=echo")
    kept, dropped = connect_unix(moved), connect_unix(fresh)
    for sock in (kept, dropped):
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
    assert run("migrate-out", "--name", "web", "--spawn").returncode == 0
    assert dropped.recv(10) == b"", "the unmarked chardev's peer should see EOF"
    again = connect_unix(fresh)
    again.sendall(b"new")
    assert recv_exactly(again, 3) == b"new"
    kept.sendall(b"still")
    assert recv_exactly(kept, 5) == b"still"


def test_listening_chardev_moves_and_queued_clients_are_served(daemons, short_dir, last_instance):
    path = os.path.join(short_dir, "l.sock")
    daemons("serve", "--name", "web", "--capability", "local-char-socket",
            "--chardev", ECHO.format(path=path))
    first = connect_unix(path)
    first.sendall(b"1")
    assert recv_exactly(first, 1) == b"1"
    # A second client waits in the listen backlog, which moves with the listener.
    second = connect_unix(path)
    assert run("migrate-out", "--name", "web", "--spawn").returncode == 0
    second.sendall(b"2")
    first.close()
    assert recv_exactly(second, 1) == b"2"
    second.close()
    third = connect_unix(path)
    third.sendall(b"3")
    assert recv_exactly(third, 1) == b"3"


def test_capability_forgotten_refuses_to_drop_a_marked_peer(daemons, short_dir, runtime_dir, last_instance):
    # Regression: migrate-out said "migrated 0 chardev(s) live", exited 0, and the peer got EOF.
    path = os.path.join(short_dir, "a.sock")
    source = daemons("serve", "--name", "web", "--chardev", ECHO.format(path=path))
    sock = connect_unix(path)
    sock.sendall(b"1")
    assert recv_exactly(sock, 1) == b"1"
    result = run("migrate-out", "--name", "web", "--spawn", "--timeout", "10")
    assert result.returncode == 1, result.stderr
    assert "chardev(s) app are marked support-local-migration=on" in result.stderr
    assert "--capability local-char-socket" in result.stderr and "--reconnect" in result.stderr
    assert source.proc.poll() is None
    sock.sendall(b"2")
    assert recv_exactly(sock, 1) == b"2", "the source stopped serving its peer"


def test_reconnect_lets_marked_peers_reconnect_when_asked(daemons, short_dir, last_instance):
    path = os.path.join(short_dir, "a.sock")
    daemons("serve", "--name", "web", "--chardev", ECHO.format(path=path))
    sock = connect_unix(path)
    result = run("migrate-out", "--name", "web", "--spawn", "--reconnect")
    assert result.returncode == 0, result.stderr
    assert "local-char-socket is off: 1 marked chardev(s) (app) will reconnect" in result.stderr
    assert sock.recv(10) == b""
    again = connect_unix(path)
    again.sendall(b"ok")
    assert recv_exactly(again, 2) == b"ok"


def test_tcp_channel_is_refused_naming_unix(echo_instance):
    source, path = echo_instance
    result = run("migrate-out", "--name", "web", "--channel", "tcp:127.0.0.1:4444")
    assert result.returncode == 2
    assert "a unix channel is needed" in result.stderr


def test_no_target_times_out_with_exit_4_and_source_serves(echo_instance):
    source, path = echo_instance
    sock = connect_unix(path)
    result = run("migrate-out", "--name", "web", "--timeout", "0.5")
    assert result.returncode == 4, result.stderr
    assert "no target listens" in result.stderr or "timed out" in result.stderr
    sock.sendall(b"alive")
    assert recv_exactly(sock, 5) == b"alive"
    assert status("--name", "web")["migration"]["status"] == "failed"


def test_missing_local_incoming_label_fails_naming_it(daemons, echo_instance, short_dir):
    source, path = echo_instance
    peer = Peer(path)
    peer.start()
    target = daemons("migrate-in", "--name", "web", "--chardev",
                     f"socket,id=db,path={short_dir}/db.sock,server=on,local-incoming=on", ready=False)
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    assert result.returncode == 1
    assert "chardev db" in result.stderr and "no such chardev" in result.stderr
    assert "still serves every chardev" in result.stderr
    assert source.proc.poll() is None and target.proc.poll() is None  # the target goes on waiting
    stream_is_intact(peer)


def test_a_target_chardev_on_a_moving_ones_address_is_refused(daemons, echo_instance):
    # The target's own chardev would listen where the source's moves to: two
    # listeners on one path. Refused by the target's check of the whole set,
    # which it makes a piece at a time behind the source's serving.
    source, path = echo_instance
    peer = Peer(path)
    peer.start()
    target = daemons("migrate-in", "--name", "web", "--chardev", f"socket,id=other,path={path},server=on",
                     ready=False)
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    assert result.returncode == 1
    assert "do not fit together" in result.stderr and "other" in result.stderr, result.stderr
    assert "still serves every chardev" in result.stderr
    assert source.proc.poll() is None and target.proc.poll() is None
    stream_is_intact(peer)


def test_local_incoming_with_capability_off_is_refused(daemons, short_dir):
    path = os.path.join(short_dir, "a.sock")
    daemons("serve", "--name", "web", "--chardev", ECHO.format(path=path))
    daemons("migrate-in", "--name", "web", "--chardev",
            f"socket,id=app,path={path},server=on,local-incoming=on", ready=False)
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    assert result.returncode == 1
    assert "local-char-socket is off" in result.stderr


@pytest.mark.parametrize("point", ["target-after-hello", "target-after-table", "target-before-ack"])
def test_target_killed_before_commit_leaves_source_serving(daemons, echo_instance, point):
    source, path = echo_instance
    peer = Peer(path)
    peer.start()
    target = daemons("migrate-in", "--name", "web", ready=False, env=dict(os.environ, FDMIG_FAULT=f"{point}=kill"))
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    assert result.returncode == 1, result.stderr
    assert target.proc.wait(10) == -signal.SIGKILL
    assert "still serves every chardev" in result.stderr
    state = status("--name", "web")
    assert state["pid"] == source.pid and state["migration"]["status"] == "failed"
    assert state["migration"]["error"]
    assert chardev(state, "app")["state"] == "connected"
    stream_is_intact(peer)


def test_hung_target_times_out_and_source_rolls_back(daemons, echo_instance):
    source, path = echo_instance
    peer = Peer(path)
    peer.start()
    target = daemons("migrate-in", "--name", "web", ready=False,
                     env=dict(os.environ, FDMIG_FAULT="target-before-ack=stop"))
    result = run("migrate-out", "--name", "web", "--timeout", "1")
    assert result.returncode == 4, result.stderr
    assert "timed out" in result.stderr
    target.proc.kill()
    stream_is_intact(peer)


def stopped(daemon) -> None:
    """Until the process has stopped itself at an FDMIG_FAULT=POINT=stop."""
    os.waitid(os.P_PID, daemon.pid, os.WSTOPPED | os.WNOWAIT)


def test_the_source_serves_on_while_the_target_checks_the_precopy(daemons, echo_instance, short_dir):
    source, path = echo_instance
    first = connect_unix(path)
    assert echoes(first)
    target = daemons("migrate-in", "--name", "web", ready=False,
                     env=dict(os.environ, FDMIG_FAULT="target-after-precopy=stop"))
    with qmp.connect(os.path.join(short_dir, "rt", "web.sock")) as client:
        client.execute("migrate", {"uri": f"unix:{short_dir}/rt/web.migrate.sock", "x-fdmig-timeout": 60})
        stopped(target)  # it holds every fd, checked, and has not said HELD
        assert client.execute("query-migrate")["status"] == "active"  # QEMU's name for the precopy
        assert echoes(first, b"still the source")
        # The table is the target's plan: it cannot change under a migration.
        for command, arguments in (("chardev-remove", {"id": "app"}),
                                   ("chardev-add", {"id": "x", "backend": {"type": "null", "data": {}}})):
            with pytest.raises(QMPError, match="migration process in progress"):
                client.execute(command, arguments)
        # The connection the precopy carried goes; another comes, to the source.
        first.close()
        second = connect_unix(path)
        assert echoes(second, b"new since the precopy")
        os.kill(target.pid, signal.SIGCONT)
        target.wait_ready()
    state = status("--name", "web")
    assert state["pid"] == target.pid and chardev(state, "app")["state"] == "connected"
    assert echoes(second, b"moved")
    assert source.proc.wait(10) == 0


def test_bytes_moved_after_the_precopy_are_counted_on_the_target(daemons, echo_instance, short_dir):
    source, path = echo_instance
    sock = connect_unix(path)
    assert echoes(sock, b"1234")
    target = daemons("migrate-in", "--name", "web", ready=False,
                     env=dict(os.environ, FDMIG_FAULT="target-after-precopy=stop"))
    with qmp.connect(os.path.join(short_dir, "rt", "web.sock")) as client:
        client.execute("migrate", {"uri": f"unix:{short_dir}/rt/web.migrate.sock", "x-fdmig-timeout": 60})
        stopped(target)
        assert echoes(sock, b"56789")  # the source's, after the precopy took the counts
        os.kill(target.pid, signal.SIGCONT)
        target.wait_ready()
    app = chardev(status("--name", "web"), "app")
    assert (app["rx-bytes"], app["tx-bytes"], app["migrations"]) == (9, 9, 1)
    assert echoes(sock, b"0")
    app = chardev(status("--name", "web"), "app")
    assert (app["rx-bytes"], app["tx-bytes"]) == (10, 10)
    os.kill(target.pid, signal.SIGTERM)


def test_bytes_the_target_serves_before_it_puts_in_the_sources_counts_are_counted_too(daemons, echo_instance,
                                                                                       short_dir):
    """The source's counts (RELEASED) go in after the target's first turn of
    serving: what that turn read is added to them, never overwritten."""
    source, path = echo_instance
    sock = connect_unix(path)
    assert echoes(sock, b"1234")  # in the precopy's counts
    target = daemons("migrate-in", "--name", "web", ready=False,
                     env=dict(os.environ, FDMIG_FAULT="target-after-precopy=stop,target-after-released=stop"))
    with qmp.connect(os.path.join(short_dir, "rt", "web.sock")) as client:
        client.execute("migrate", {"uri": f"unix:{short_dir}/rt/web.migrate.sock", "x-fdmig-timeout": 60})
        stopped(target)
        assert echoes(sock, b"56789")  # counted by the source only: RELEASED carries it
        os.kill(target.pid, signal.SIGCONT)
        stopped(target)  # RELEASED is in: the source has let go, the target has read nothing
        sock.sendall(b"abc")  # waits in the socket, for the target's first turn
        os.kill(target.pid, signal.SIGCONT)
        assert recv_exactly(sock, 3) == b"abc"
        target.wait_ready()
    app = chardev(status("--name", "web"), "app")
    assert (app["rx-bytes"], app["tx-bytes"], app["migrations"]) == (12, 12, 1)
    os.kill(target.pid, signal.SIGTERM)


def test_byte_counts_too_many_for_one_frame_are_left_out_and_an_empty_counters_goes_instead(caplog):
    """The target waits for COUNTERS behind RELEASED before it opens what did
    not move: counts that no frame can hold must not leave it waiting."""
    import asyncio
    import types
    from fdmig.migration import source

    codec = wire.MigrationCodec(wire.Role.SOURCE, max_frame=400)
    sent = []

    async def send(event, deadline=None):
        codec._encode(event)  # what the channel's codec.send() checks before anything goes out
        sent.append(event)

    session = source.SourceSession.__new__(source.SourceSession)
    session.chan = types.SimpleNamespace(send=send, codec=codec)
    session.changed = set()
    session.sent = [types.SimpleNamespace(label=f"chardev-{i:04d}", rx_bytes=i, tx_bytes=i, counts_changed=True)
                    for i in range(40)]
    asyncio.run(session._send_counters())
    assert sent == [wire.Counters([])]
    assert "the byte counts since the precopy are left out" in caplog.text
    session.sent = session.sent[:2]
    asyncio.run(session._send_counters())
    assert sent[-1] == wire.Counters([["chardev-0000", 0, 0], ["chardev-0001", 1, 1]])


def test_the_source_lets_go_only_once_the_target_closes_the_channel_after_its_first_turn(daemons, echo_instance,
                                                                                         short_dir):
    """After TAKEN the source waits for the target to close the channel (after
    its first turn of serving), so that its teardown takes no CPU from that
    turn; a target that never does (stopped here) keeps it CLOSE_WAIT at most."""
    from fdmig.migration import source as sources
    source, path = echo_instance
    sock = connect_unix(path)
    assert echoes(sock)
    target = daemons("migrate-in", "--name", "web", ready=False,
                     env=dict(os.environ, FDMIG_FAULT="target-after-taken=stop"))
    started = time.monotonic()
    with qmp.connect(os.path.join(short_dir, "rt", "web.sock")) as client:
        client.execute("migrate", {"uri": f"unix:{short_dir}/rt/web.migrate.sock", "x-fdmig-timeout": 60})
        stopped(target)
        assert source.proc.wait(10) == 0
    assert time.monotonic() - started >= sources.CLOSE_WAIT
    os.kill(target.pid, signal.SIGCONT)
    target.wait_ready()
    assert echoes(sock, b"served by the target")
    os.kill(target.pid, signal.SIGTERM)


def test_a_connection_lost_after_the_precopy_is_opened_afresh_by_the_target(daemons, short_dir):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.path.join(short_dir, "peer.sock"))
    server.listen(4)
    server.settimeout(10)
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket", "--chardev",
                     f"socket,id=app,path={short_dir}/peer.sock,reconnect-ms=600000,support-local-migration=on")
    first, _ = server.accept()
    target = daemons("migrate-in", "--name", "web", ready=False,
                     env=dict(os.environ, FDMIG_FAULT="target-after-precopy=stop"))
    with qmp.connect(os.path.join(short_dir, "rt", "web.sock")) as client:
        client.execute("migrate", {"uri": f"unix:{short_dir}/rt/web.migrate.sock", "x-fdmig-timeout": 60})
        stopped(target)
        first.close()  # the target holds a copy from the precopy; the source sees the loss
        assert run("status", "--name", "web", "--wait", "app=connecting", "--timeout", "10").returncode == 0
        os.kill(target.pid, signal.SIGCONT)
        target.wait_ready()
    second, _ = server.accept()  # the chardev, opened afresh, connects from the target
    assert paths.peercred(second)[0] == target.pid
    assert chardev(status("--name", "web"), "app")["state"] == "connected"
    assert source.proc.wait(10) == 0
    second.close()
    server.close()


def test_source_killed_right_after_the_ack_leaves_target_serving(daemons, short_dir):
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", ECHO.format(path=path),
                     env=dict(os.environ, FDMIG_FAULT="source-after-ack=kill"))
    peer = Peer(path)
    peer.start()
    target = daemons("migrate-in", "--name", "web", ready=False)
    run("migrate-out", "--name", "web", "--timeout", "10")
    assert source.proc.wait(10) == -signal.SIGKILL
    target.wait_ready()  # it saw the source die after the commit: the fds are its own
    state = status("--name", "web")
    assert state["pid"] == target.pid and chardev(state, "app")["state"] == "connected"
    stream_is_intact(peer)


def test_foreign_source_is_refused_and_target_keeps_waiting(daemons, echo_instance, short_dir):
    source, path = echo_instance
    channel = os.path.join(short_dir, "rt", "web.migrate.sock")
    target = daemons("migrate-in", "--name", "web", ready=False)
    fake = connect_when_bound(channel)
    codec = wire.MigrationCodec(wire.Role.SOURCE)
    send_chunks(fake, codec.send(wire.Hello("db", os.getpid(), "0")))
    reply = read_event(fake, codec)
    assert isinstance(reply, wire.Abort) and "foreign" in reply.reason
    fake.close()
    result = run("migrate-out", "--name", "web")
    assert result.returncode == 0, result.stderr
    target.wait_ready()


def test_garbage_on_the_channel_is_refused_and_target_keeps_waiting(daemons, echo_instance, short_dir):
    source, path = echo_instance
    channel = os.path.join(short_dir, "rt", "web.migrate.sock")
    target = daemons("migrate-in", "--name", "web", ready=False)
    fake = connect_when_bound(channel)
    fake.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert fake.recv(4096) is not None
    fake.close()
    assert run("migrate-out", "--name", "web").returncode == 0
    target.wait_ready()


def test_target_refuses_a_tcp_fd_where_the_spec_says_unix(daemons, short_dir):
    channel = os.path.join(short_dir, "rt", "web.migrate.sock")
    path = os.path.join(short_dir, "app.sock")
    target = daemons("migrate-in", "--name", "web", ready=False)
    server = socket.create_server(("127.0.0.1", 0))
    tcp = socket.create_connection(server.getsockname())
    fake = connect_when_bound(channel)
    codec = wire.MigrationCodec(wire.Role.SOURCE)
    spec = {"id": "app", "path": path, "server": False, "support-local-migration": True}
    send_chunks(fake, codec.send(wire.Hello("web", os.getpid(), "0")))
    send_chunks(fake, codec.send(wire.Table({"local-char-socket": True}, [spec])))
    assert isinstance(read_event(fake, codec), wire.Accept)
    send_chunks(fake, codec.send(wire.Precopy([wire.Section("app", {}, b"", {"conn": tcp.fileno()})])))
    reply = read_event(fake, codec)
    assert isinstance(reply, wire.Abort)
    assert "AF_INET socket" in reply.reason and "unix:" in reply.reason
    fake.close()
    # The target dropped the fd it got: closing ours ends the TCP connection for real.
    accepted, _ = server.accept()
    tcp.close()
    accepted.settimeout(10)
    assert accepted.recv(1) == b""
    assert target.proc.poll() is None
    target.stop()
    assert "refused source" in target.stderr()


def test_migrate_in_exits_4_when_nothing_arrives(runtime_dir):
    result = run("migrate-in", "--name", "web", "--timeout", "0.3")
    assert result.returncode == 4
    assert "no migration arrived" in result.stderr


def test_local_incoming_on_serve_is_a_usage_error(runtime_dir, short_dir):
    result = run("serve", "--chardev", f"socket,id=a,path={short_dir}/a.sock,server=on,local-incoming=on")
    assert result.returncode == 2
    assert "local-incoming" in result.stderr and "migrate-in" in result.stderr


def test_demo_runs_and_loses_nothing(runtime_dir):
    result = run("demo", "--migrations", "3", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost 0" in result.stdout


def test_the_demo_peer_measures_its_pauses_in_a_process_of_its_own(runtime_dir):
    """Not in the demo's: there the live view and the migrations' work would add
    their own pauses to what the peer measures."""
    import re
    import subprocess
    from tests.helpers import FDMIG
    demo = subprocess.Popen(FDMIG + ["demo", "--migrations", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    out, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, out
    peer = re.search(r"peer pid (\d+) streaming", out)
    assert peer is not None, out
    assert int(peer.group(1)) != demo.pid
    assert not psutil.pid_exists(int(peer.group(1)))  # and it ended with the demo



def test_deferred_target_listens_where_qmp_migrate_incoming_says(daemons, echo_instance, short_dir):
    import asyncio
    from qemu.qmp import QMPClient
    source, path = echo_instance
    peer = Peer(path)
    peer.start()
    target = daemons("migrate-in", "--name", "web", "--channel", "defer", ready=False)
    channel = os.path.join(short_dir, "elsewhere.sock")
    incoming = os.path.join(short_dir, "rt", "web.incoming.sock")

    async def point_target():
        client = QMPClient("test")
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.connect(incoming)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)  # the target binds this path as it starts
        assert (await client.execute("query-status"))["status"] == "inmigrate"
        await client.execute("migrate-incoming", {"uri": f"unix:{channel}"})
        await client.disconnect()

    asyncio.run(point_target())
    result = run("migrate-out", "--name", "web", "--channel", f"unix:{channel}")
    assert result.returncode == 0, result.stderr
    target.wait_ready()
    assert not os.path.exists(incoming)
    stream_is_intact(peer)


@pytest.mark.timeout(120)
def test_ten_thousand_chardevs_move_in_one_migration(daemons, short_dir, last_instance):
    os.mkdir(os.path.join(short_dir, "c"))
    args = []
    for i in range(10_000):
        args += ["--chardev", f"id=c{i},path={short_dir}/c/{i},server=on,support-local-migration=on"
                              + (",frontend=echo" if i % 1000 == 0 else "")]
    daemons("serve", "--name", "web", "--capability", "local-char-socket", *args)
    peers = [connect_unix(f"{short_dir}/c/{i}") for i in range(0, 10_000, 1000)]
    for peer in peers:
        peer.sendall(b"ping")
        assert recv_exactly(peer, 4) == b"ping"
    result = run("migrate-out", "--name", "web", "--spawn", "--json", "--timeout", "60", timeout=90)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["chardevs"] == 10_000
    for peer in peers:
        peer.sendall(b"pong")
        assert recv_exactly(peer, 4) == b"pong"
    late = connect_unix(f"{short_dir}/c/9999")
    assert status("--name", "web")["open-fds"] < 10_100
    late.close()


def fake_target(path: str, behave) -> threading.Thread:
    """A process-local target on the channel that runs `behave(conn)` for one source."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)

    def serve():
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with conn:
                behave(conn)
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def query_migrate(runtime_dir: str) -> dict:
    import asyncio
    from qemu.qmp import QMPClient

    async def ask():
        client = QMPClient("test")
        await client.connect(os.path.join(runtime_dir, "web.sock"))
        try:
            return await client.execute("query-migrate")
        finally:
            await client.disconnect()
    return asyncio.run(ask())


def test_target_sending_garbage_rolls_the_source_back(echo_instance, short_dir, runtime_dir):
    source, path = echo_instance
    peer = Peer(path)
    peer.start()

    def garbage(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        while conn.recv(65536):  # until the source hangs up: it must be the one to
            pass  # notice, not a send of its failing on our closed socket

    thread = fake_target(os.path.join(runtime_dir, "web.migrate.sock"), garbage)
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    thread.join(10)
    assert result.returncode == 1
    assert "broke the protocol" in result.stderr and "bad magic" in result.stderr
    reply = query_migrate(runtime_dir)
    assert reply["status"] == "failed" and "bad magic" in reply["error-desc"]
    stream_is_intact(peer)


def test_channel_breaking_mid_transfer_rolls_the_source_back(echo_instance, runtime_dir):
    source, path = echo_instance
    peer = Peer(path)
    peer.start()

    def accept_then_vanish(conn):
        codec = wire.MigrationCodec(wire.Role.TARGET)
        while not isinstance(read_event(conn, codec), wire.Table):
            pass
        send_chunks(conn, codec.send(wire.Accept()))
        data, fds, _, _ = socket.recv_fds(conn, 65536, 253)  # the fds arrive; then we vanish
        for fd in fds:
            os.close(fd)

    thread = fake_target(os.path.join(runtime_dir, "web.migrate.sock"), accept_then_vanish)
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    thread.join(10)
    assert result.returncode == 1
    assert "the target closed the channel" in result.stderr  # mid-send, or before its ACK
    state = status("--name", "web")
    assert state["pid"] == source.pid and chardev(state, "app")["state"] == "connected"
    stream_is_intact(peer)


def test_migrate_cancel_before_the_commit_rolls_back(echo_instance, runtime_dir):
    import asyncio
    from qemu.qmp import QMPClient
    source, path = echo_instance
    peer = Peer(path)
    peer.start()

    async def migrate_then_cancel():
        client = QMPClient("test")
        await client.connect(os.path.join(runtime_dir, "web.sock"))
        events = client.events
        await client.execute("migrate", {"uri": f"unix:{runtime_dir}/nobody.sock", "x-fdmig-timeout": 30})
        await client.execute("migrate_cancel")
        statuses = []
        while not statuses or statuses[-1] not in ("cancelled", "failed", "completed"):
            event = await asyncio.wait_for(events.get(), 10)
            if event["event"] == "MIGRATION":
                statuses.append(event["data"]["status"])
        reply = await client.execute("query-migrate")
        await client.disconnect()
        return statuses, reply

    statuses, reply = asyncio.run(migrate_then_cancel())
    assert statuses[-1] == "cancelled" and reply["status"] == "cancelled"
    stream_is_intact(peer)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spin, cpus, sleeps", [(True, True, False), (False, True, True), (True, False, True)])
def test_inside_the_downtime_a_side_polls_for_the_next_message_instead_of_sleeping(monkeypatch, spin, cpus, sleeps):
    """A process woken from sleep took 0.2 to 0.3 ms to run again, three times in a
    downtime: there each side polls for the next message (channel.SPIN at most),
    but only where it may run on two CPUs (on one, the sender needs that CPU)."""
    import asyncio
    from fdmig.migration import channel

    monkeypatch.setattr(channel, "_two_cpus", lambda: cpus)

    async def main():
        a, b = socket.socketpair()
        source, target = channel.Channel(a, wire.Role.SOURCE), channel.Channel(b, wire.Role.TARGET)
        tries, slept = [0], [0]
        real_recv, real_ready = target._recv, target._ready

        def recv():
            tries[0] += 1
            if tries[0] == 3:  # the message arrives while the target waits
                source.send_now(wire.Hello("spin", os.getpid(), "0"))
            return real_recv()

        async def ready(*args):
            slept[0] += 1
            await real_ready(*args)
        target._recv, target._ready = recv, ready
        if not (spin and cpus):
            asyncio.get_running_loop().call_soon(source.send_now, wire.Hello("spin", os.getpid(), "0"))
        event = await target.next_event(time.monotonic() + 5, spin=spin)
        source.close()
        target.close()
        return event, tries[0], slept[0]

    event, tries, slept = asyncio.run(main())
    assert isinstance(event, wire.Hello) and event.name == "spin"
    assert bool(slept) == sleeps
    if not sleeps:
        assert tries >= 3
