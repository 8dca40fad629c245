"""migrate-out as a user meets it: migrations that would lose a chardev are refused,
Ctrl-C and SIGTERM cancel, a killed client does not leave the instance waiting, a
spawned target that dies fails the migration at once, the fdmig that runs is the
fdmig spawned, and after the commit no wait is without its deadline."""

import json
import os
import pty
import signal
import socket
import subprocess
import time

import psutil
import pytest

from fdmig import qmp
from tests.helpers import FDMIG, connect_unix, echoes, run

ECHO = "socket,id=app,path={path},server=on,frontend=echo,support-local-migration=on"


@pytest.fixture
def web(daemons, short_dir, last_instance):
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket", "--chardev", ECHO.format(path=path))
    return source, path


def migration_of(runtime_dir: str, name: str = "web") -> dict:
    with qmp.connect(f"{runtime_dir}/{name}.sock") as client:
        return client.execute("x-fdmig-status")["migration"]


def await_migration_end(runtime_dir: str) -> str:
    """The status a migration under way ends with, from the MIGRATION events."""
    with qmp.connect(f"{runtime_dir}/web.sock") as client:
        deadline = time.monotonic() + 20
        while True:
            status = client.execute("x-fdmig-status")["migration"]["status"]
            if status not in ("setup", "active"):
                return status
            client.wait_event({"MIGRATION"}, deadline)


def test_an_inherited_fd_chardev_without_the_mark_is_not_migrated_away(daemons, short_dir, runtime_dir, last_instance):
    # Regression: migrate-out said "migrated 0 chardev(s)" and exited 0; the target had nothing.
    listening = socket.create_server(f"{short_dir}/act.sock", family=socket.AF_UNIX)
    fd = listening.fileno()
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", f"socket,id=act,fd={fd},server=on,frontend=echo",
                     pass_fds=(fd,))
    listening.close()
    peer = connect_unix(f"{short_dir}/act.sock")
    assert echoes(peer)
    result = run("migrate-out", "--name", "web", "--spawn", "--timeout", "10")
    assert result.returncode == 1, result.stderr
    assert "act" in result.stderr and "support-local-migration=on" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert echoes(peer), "the source stopped serving"
    assert source.proc.poll() is None and migration_of(runtime_dir)["status"] == "none"

    alone = run("migrate-out", "--name", "web", "--timeout", "10")
    assert alone.returncode == 1 and "act" in alone.stderr  # with no target at all: refused before it waits


def test_a_bridge_with_one_side_marked_is_refused_rather_than_spliced(daemons, short_dir, runtime_dir, last_instance):
    daemons("serve", "--name", "web", "--capability", "local-char-socket",
            "--chardev", f"socket,id=front,path={short_dir}/f.sock,server=on,support-local-migration=on,bridge=back",
            "--chardev", f"socket,id=back,path={short_dir}/b.sock,server=on")
    result = run("migrate-out", "--name", "web", "--spawn", "--timeout", "10")
    assert result.returncode == 1
    assert "bridge front-back: back is not support-local-migration=on" in result.stderr


def test_a_refused_migration_leaves_the_capabilities_it_was_given_as_they_were(daemons, short_dir, runtime_dir,
                                                                              last_instance):
    # A migration either completes or changes nothing: `--capability` is for it only.
    daemons("serve", "--name", "web",
            "--chardev", f"socket,id=front,path={short_dir}/f.sock,server=on,support-local-migration=on,bridge=back",
            "--chardev", f"socket,id=back,path={short_dir}/b.sock,server=on")
    result = run("migrate-out", "--name", "web", "--spawn", "--capability", "local-char-socket", "--timeout", "10")
    assert result.returncode == 1 and "bridge front-back" in result.stderr, result.stderr
    status = json.loads(run("status", "--name", "web", "--json").stdout)
    assert status["capabilities"]["local-char-socket"] is False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_migrate_out_cancels_the_migration_and_the_source_serves_on(web, runtime_dir, sig):
    source, path = web
    peer = connect_unix(path)
    # No target: the source waits for one; a terminal would say so.
    with qmp.connect(f"{runtime_dir}/web.sock") as client:
        proc = subprocess.Popen(FDMIG + ["migrate-out", "--name", "web", "--timeout", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client.wait_event({"X_FDMIG_MIGRATION_WAITING"}, time.monotonic() + 20)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, err
    assert f"migration cancelled: interrupted by {sig.name}; the source still serves every chardev" in err
    assert "Traceback" not in err and "Aborted" not in err
    assert migration_of(runtime_dir)["status"] == "cancelled"
    assert echoes(peer)
    attached = run("attach", "--name", "web", f"socket,id=more,path={os.path.dirname(path)}/more.sock,server=on")
    assert attached.returncode == 0, attached.stderr


def test_a_killed_migrate_out_does_not_leave_the_instance_waiting_for_a_target(web, runtime_dir):
    source, path = web
    with qmp.connect(f"{runtime_dir}/web.sock") as client:
        proc = subprocess.Popen(FDMIG + ["migrate-out", "--name", "web", "--timeout", "60"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client.wait_event({"X_FDMIG_MIGRATION_WAITING"}, time.monotonic() + 20)
        proc.kill()
        proc.wait()
        data = client.wait_event({"MIGRATION"}, time.monotonic() + 20)["data"]
    assert data["status"] == "cancelled" and "has gone" in data["x-fdmig-error"]
    attached = run("attach", "--name", "web", f"socket,id=more,path={os.path.dirname(path)}/more.sock,server=on")
    assert attached.returncode == 0, attached.stderr


def test_on_a_terminal_migrate_out_says_it_waits_for_a_target_and_on_which_channel(web, runtime_dir):
    main, tty = pty.openpty()
    proc = subprocess.Popen(FDMIG + ["migrate-out", "--name", "web", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=tty, text=True)
    os.close(tty)
    seen = b""
    while b"\n" not in seen:
        seen += os.read(main, 4096)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    os.close(main)
    assert seen.decode().startswith(f"fdmig: waiting for a target to listen on unix:{runtime_dir}/web.migrate.sock")
    # Regression: the hint left out --name web, and the command it gave, run as is, waited for another.
    assert "(start one with: fdmig migrate-in --name web)" in seen.decode()


def test_a_spawned_target_that_exits_before_the_commit_fails_the_migration_with_its_last_words(web, runtime_dir):
    source, path = web
    peer = connect_unix(path)
    # Something that is not a socket where the target must listen: it refuses and exits.
    os.makedirs(runtime_dir, exist_ok=True)
    with open(f"{runtime_dir}/web.migrate.sock", "w") as f:
        f.write("not a socket")
    result = run("migrate-out", "--name", "web", "--spawn", "--timeout", "60", timeout=40)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "the target (pid" in last and "exited with status 1 before the commit: fdmig: " in last, result.stderr
    assert "web.migrate.sock" in last and "timed out" not in last
    assert echoes(peer) and migration_of(runtime_dir)["status"] == "cancelled"


def test_spawn_starts_the_fdmig_that_runs_not_the_first_on_path(web, short_dir):
    source, path = web
    bin_dir = os.path.join(short_dir, "bin")
    os.mkdir(bin_dir)
    marker = os.path.join(short_dir, "impostor-ran")
    with open(os.path.join(bin_dir, "fdmig"), "w") as f:
        f.write(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    os.chmod(os.path.join(bin_dir, "fdmig"), 0o755)
    peer = connect_unix(path)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = run("migrate-out", "--name", "web", "--spawn", "--json", "--timeout", "20", env=env, cwd=short_dir)
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(marker), "migrate-out --spawn ran the fdmig first on PATH"
    assert echoes(peer)
    target = psutil.Process(json.loads(result.stdout)["target-pid"])
    assert os.path.samefile(target.exe(), psutil.Process().exe())


def test_a_source_whose_target_stops_after_the_commit_still_exits_on_sigterm(daemons, web, runtime_dir):
    # Regression: the source waited for TAKEN without a deadline and lived on through SIGTERM.
    source, path = web
    peer = connect_unix(path)
    target = daemons("migrate-in", "--name", "web", ready=False,
                     env=dict(os.environ, FDMIG_FAULT="target-after-released=stop"))
    migrating = subprocess.Popen(FDMIG + ["migrate-out", "--name", "web", "--timeout", "30"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = psutil.Process(target.pid)
    deadline = time.monotonic() + 20
    while stopped.status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, "the target never reached its fault point"
        time.sleep(0.01)  # a stopped process sends no event: its state is polled
    source.proc.send_signal(signal.SIGTERM)
    assert source.proc.wait(5) == 0, source.stderr()
    assert "holds every connection, so this source lets go" in source.stderr()
    os.kill(target.pid, signal.SIGCONT)
    target.wait_ready()
    out, err = migrating.communicate(timeout=20)
    assert echoes(peer), "a connection was lost or read twice"


def _spawn_captured(*args) -> subprocess.CompletedProcess:
    """migrate-out --spawn as a CI script runs it: both streams captured in pipes."""
    return subprocess.run(FDMIG + ["migrate-out", "--name", "web", "--spawn", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=30)


def test_a_captured_migrate_out_returns_and_the_log_follows_the_instance(web, runtime_dir):
    # Regression: $(fdmig migrate-out --spawn 2>&1) hung until the new holder exited,
    # which kept migrate-out's stderr as its own.
    source, path = web
    peer = connect_unix(path)
    holders = [source.pid]
    for _ in range(2):
        result = _spawn_captured()  # would raise TimeoutExpired while a target held the pipes
        assert result.returncode == 0, result.stderr
        with qmp.connect(f"{runtime_dir}/web.sock") as client:
            holders.append(client.execute("x-fdmig-status")["pid"])
        # Until its commit, the target's log came through migrate-out...
        assert "waiting for a source on" in result.stderr
        assert echoes(peer)
    # ...and from it on, it goes where the instance's log went: the first holder's stderr.
    log = source.stderr()
    for before, after in zip(holders, holders[1:]):
        assert f"moved live from pid {before}" in log, log[-2000:]


def test_a_spawned_target_shows_as_fdmig_migrate_in(web, runtime_dir):
    result = _spawn_captured()
    assert result.returncode == 0, result.stderr
    with qmp.connect(f"{runtime_dir}/web.sock") as client:
        target = psutil.Process(client.execute("x-fdmig-status")["pid"])
    assert target.name() == "fdmig"
    assert "fdmig migrate-in --name web" in " ".join(target.cmdline())
