"""`fdmig stop`, `fdmig list`, what stops an instance (SIGTERM, SIGINT, SIGHUP:
a closed terminal), and the stale control socket an instance killed outright
leaves: DESIGN.md's "Command line" and its "Signals". Real instances, real
signals; `run` instances' signals are in test_service.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FDMIG, connect_unix, connect_when_bound, echoes, run, status_of

ROOT = str(Path(__file__).resolve().parent.parent)
ECHO = "socket,id=app,path={path},server=on,frontend=echo"
# A service that ignores SIGTERM, ready (READY=1) only once it does.
STUBBORN = [sys.executable, "-c", "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "from tests.services import libsd; libsd.notify('READY=1'); signal.pause()"]


def control(runtime_dir: str, name: str = "web") -> str:
    return os.path.join(runtime_dir, f"{name}.sock")


def listed(*args) -> list[dict]:
    result = run("list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def killed(daemon) -> None:
    """SIGKILL: no cleanup, its control socket left stale."""
    daemon.proc.kill()
    daemon.proc.wait(10)


def waiting_target(daemons, runtime_dir: str, name: str = "web"):
    """A migrate-in target that waits, once it answers on <name>.incoming.sock."""
    target = daemons("migrate-in", "--name", name, ready=False)
    connect_when_bound(os.path.join(runtime_dir, f"{name}.incoming.sock"),
                       alive=lambda: target.proc.poll() is None).close()
    return target


def socket_files(directory: str) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


# ----- fdmig stop -------------------------------------------------------------------

def test_stop_stops_an_instance_cleanly_and_waits_until_it_has_exited(daemons, runtime_dir, short_dir):
    path = os.path.join(short_dir, "app.sock")
    daemon = daemons("serve", "--name", "web", "--chardev", ECHO.format(path=path))
    result = run("stop", "--name", "web")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"stopped instance web (pid {daemon.pid})"
    assert daemon.proc.poll() == 0  # exited already when stop returned
    assert not os.path.exists(path) and socket_files(runtime_dir) == []
    assert "stopping on QMP quit" in daemon.stderr()


def test_stop_by_control_path(daemons, short_dir):
    path = os.path.join(short_dir, "ctl.sock")
    daemon = daemons("serve", "--control", path)
    result = run("stop", "--control", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"stopped instance ctl (pid {daemon.pid})"
    assert not os.path.exists(path)


def test_stop_of_a_run_instance_stops_its_service_first(daemons, runtime_dir, short_dir):
    path = os.path.join(short_dir, "app.sock")
    daemon = daemons("run", "--name", "web", "--notify", "--chardev", f"id=app,path={path},server=on", "--",
                     sys.executable, "-m", "tests.services.store_echo", cwd=ROOT)
    service = status_of(control(runtime_dir))["service"]["pid"]
    result = run("stop", "--name", "web")
    assert result.returncode == 0, result.stderr
    assert daemon.proc.poll() == 0
    log = daemon.stderr()
    assert log.index(f"service: pid {service} ended") < log.index("instance web stopped")
    assert socket_files(runtime_dir) == [] and not os.path.exists(path)


@pytest.mark.timeout(60)
def test_stop_exits_4_at_its_timeout_saying_what_it_still_waits_for(daemons, runtime_dir):
    daemon = daemons("run", "--name", "web", "--notify", "--timeout", "300", "--", *STUBBORN, cwd=ROOT)
    service = status_of(control(runtime_dir))["service"]["pid"]
    began = time.monotonic()
    result = run("stop", "--name", "web", "--timeout", "1")
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - began < 20
    assert (f"instance web (pid {daemon.pid}) has not exited after 1 s: its service (pid {service}) has "
            "not stopped yet; SIGKILL at ") in result.stderr, result.stderr
    assert "it goes on stopping" in result.stderr
    assert daemon.proc.poll() is None
    os.kill(service, signal.SIGKILL)  # what run --timeout would do later: the stop goes on
    assert daemon.proc.wait(20) == 0, daemon.stderr()
    assert socket_files(runtime_dir) == []


def test_stop_stops_a_migration_target_that_still_waits(daemons, runtime_dir):
    target = waiting_target(daemons, runtime_dir)
    result = run("stop", "--name", "web")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"stopped instance web (pid {target.pid})"
    assert target.proc.poll() == 0
    assert socket_files(runtime_dir) == []  # web.incoming.sock and web.migrate.sock


def test_stop_exits_3_when_no_instance_answers(daemons, runtime_dir):
    result = run("stop", "--name", "web")
    assert result.returncode == 3
    assert result.stderr.strip() == f"fdmig: no instance answers at {control(runtime_dir)}"
    killed(daemons("serve", "--name", "web"))
    result = run("stop", "--name", "web")  # a stale socket: nobody to stop, a name to free
    assert result.returncode == 3, result.stderr
    assert "removed the stale socket" in result.stderr
    assert not os.path.exists(control(runtime_dir)) and json.loads(run("list", "--json").stdout) == []


# ----- fdmig list -------------------------------------------------------------------

def test_list_shows_each_instance_a_waiting_target_and_a_stale_socket(daemons, runtime_dir, short_dir):
    web = daemons("serve", "--name", "web", "--chardev", ECHO.format(path=os.path.join(short_dir, "a.sock")),
                  "--chardev", "id=b,path=%s,server=on" % os.path.join(short_dir, "b.sock"))
    killed(daemons("serve", "--name", "old"))
    target = waiting_target(daemons, runtime_dir, "next")
    assert listed() == [
        {"name": "next", "pid": target.pid, "state": "inmigrate", "chardevs": 0,
         "control": os.path.join(runtime_dir, "next.incoming.sock")},
        {"name": "old", "pid": None, "state": "stale", "chardevs": None, "control": control(runtime_dir, "old")},
        {"name": "web", "pid": web.pid, "state": "running", "chardevs": 2, "control": control(runtime_dir)},
    ]


def test_list_in_a_pipe_is_a_heading_and_one_row_per_line(daemons, runtime_dir):
    web = daemons("serve", "--name", "web")
    killed(daemons("serve", "--name", "old"))
    result = run("list")
    assert result.returncode == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["NAME", "PID", "STATE", "CHARDEVS", "CONTROL"],
        ["old", "-", "stale", "-", control(runtime_dir, "old")],
        ["web", str(web.pid), "running", "0", control(runtime_dir)],
    ]


def test_list_of_an_empty_runtime_dir(runtime_dir):
    assert listed() == []
    result = run("list")
    assert (result.returncode, result.stdout) == (0, "")


@pytest.mark.timeout(60)
def test_a_hung_instance_costs_list_one_short_timeout_not_one_each(daemons, runtime_dir):
    hung = [daemons("serve", "--name", f"hung{n}") for n in range(3)]
    web = daemons("serve", "--name", "web")
    for daemon in hung:
        daemon.proc.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        rows = listed()
        took = time.monotonic() - began
    finally:
        for daemon in hung:
            daemon.proc.send_signal(signal.SIGCONT)
    # Asked one after another, three would take 3 x 2 s: asked at once, 2 s.
    assert took < 5.5, f"list took {took:.1f} s"
    assert [(row["name"], row["pid"], row["state"]) for row in rows] == [
        *[(f"hung{n}", daemon.pid, "unresponsive") for n, daemon in enumerate(hung)], ("web", web.pid, "running")]


# ----- signals ----------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_stops_a_serve_instance_cleanly_and_the_log_names_it(signum, daemons, runtime_dir, short_dir):
    # Regression: SIGHUP (a closed terminal) killed it, exit 129, every socket file left behind.
    path = os.path.join(short_dir, "app.sock")
    daemon = daemons("serve", "--name", "web", "--chardev", ECHO.format(path=path))
    daemon.proc.send_signal(signum)
    assert daemon.proc.wait(20) == 0, daemon.stderr()
    assert f"fdmig[web]: stopping on {signum.name}" in daemon.stderr().splitlines()
    assert not os.path.exists(path) and socket_files(runtime_dir) == []


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_stops_a_waiting_migration_target_cleanly(signum, daemons, runtime_dir):
    target = waiting_target(daemons, runtime_dir)
    target.proc.send_signal(signum)
    assert target.proc.wait(20) == 0, target.stderr()
    assert f"fdmig[web]: stopping on {signum.name}" in target.stderr().splitlines()
    assert socket_files(runtime_dir) == []


@pytest.mark.timeout(60)
def test_sighup_stops_a_migrated_target_cleanly(daemons, runtime_dir, short_dir):
    # Regression: the README's `fdmig migrate-in &`, its terminal closed: exit 129, no cleanup.
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket", "--chardev",
                     ECHO.format(path=path) + ",support-local-migration=on")
    target = waiting_target(daemons, runtime_dir)
    peer = connect_unix(path)
    assert echoes(peer)
    moved = run("migrate-out", "--name", "web", timeout=60)
    assert moved.returncode == 0, moved.stderr
    assert source.proc.wait(20) == 0
    target.wait_ready()
    assert echoes(peer)  # the target serves the moved connection
    target.proc.send_signal(signal.SIGHUP)
    assert target.proc.wait(20) == 0, target.stderr()
    assert "fdmig[web]: stopping on SIGHUP" in target.stderr().splitlines()
    assert not os.path.exists(path) and socket_files(runtime_dir) == []
    peer.close()


# ----- a stale control socket ------------------------------------------------------

def test_the_next_serve_of_a_stale_name_replaces_its_control_socket(daemons, runtime_dir):
    killed(daemons("serve", "--name", "web"))
    assert [row["state"] for row in listed()] == ["stale"]
    again = daemons("serve", "--name", "web")
    assert [(row["pid"], row["state"]) for row in listed()] == [(again.pid, "running")]
    assert status_of(control(runtime_dir))["pid"] == again.pid


# ----- completion -------------------------------------------------------------------

def completed_names(incomplete: str = "") -> list[str]:
    """What click's bash completion offers for `fdmig status --name INCOMPLETE`."""
    env = dict(os.environ, _FDMIG_COMPLETE="bash_complete", COMP_WORDS=f"fdmig status --name {incomplete}",
               COMP_CWORD="3")
    result = subprocess.run(FDMIG, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [line.split(",", 1)[1] for line in result.stdout.splitlines()]


def test_name_completion_offers_only_instances_that_answer(daemons, runtime_dir):
    # Regression: --name <TAB> offered every socket file, dead instances' too.
    daemons("serve", "--name", "web")
    daemons("serve", "--name", "www")
    killed(daemons("serve", "--name", "wiki"))
    waiting_target(daemons, runtime_dir, "next")
    assert completed_names() == ["next", "web", "www"]
    assert completed_names("w") == ["web", "www"]


def test_a_chardev_socket_in_the_runtime_dir_is_not_listed_as_an_instance(daemons, runtime_dir):
    # Regression: a chardev's unix socket in the runtime dir showed as an unresponsive instance.
    os.makedirs(runtime_dir, exist_ok=True)
    daemons("serve", "--name", "web", "--chardev", f"id=app,path={runtime_dir}/app.sock,server=on,frontend=echo")
    result = run("list", "--json")
    assert result.returncode == 0, result.stderr
    assert [row["name"] for row in json.loads(result.stdout)] == ["web"], result.stdout
