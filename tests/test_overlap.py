"""`fdmig run --overlap`: the servers people run (gunicorn, uvicorn, HAProxy)
restart as they do behind Server::Starter: the new generation starts beside the
old one, which drains once the new one is ready; a build that does not start
changes nothing. Real servers, real load from a process of its own."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.helpers import FDMIG, free_port, needs, recv_exactly, run, status_of, wait_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = "tests.services.drain_app"


def gunicorn(*more: str) -> list[str]:
    config = pytest.importorskip("gunicorn.config")
    command = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--graceful-timeout", "30", *more]
    if hasattr(config, "ControlSocketDisable"):  # gunicorn >= 25 would bind ~/.gunicorn/gunicorn.ctl
        command.append("--no-control-socket")
    return command + [f"{APP}:app"]


def start_run(daemons, *options, command):
    return daemons("run", "--name", "web", *options, "--", *command, cwd=ROOT)


def service_of(runtime_dir: str) -> dict:
    return status_of(os.path.join(runtime_dir, "web.sock"))["service"]


def draining_of(runtime_dir: str) -> list[int]:
    return [entry["pid"] for entry in service_of(runtime_dir)["draining"]]


def restart(*options: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run("restart", "--name", "web", *options, timeout=timeout)


class Load:
    """HTTP requests from a process of its own (tests/services/load.py), over a
    fresh connection every `interval` seconds; its results as they come."""

    def __init__(self, port: int, path: str = "/", interval: float = 0.01):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.services.load", str(port), path, str(interval)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.results: list[dict] = []
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.results.append(json.loads(line))
                self.changed.notify_all()

    def wait_for(self, predicate, what: str, timeout: float = 30.0) -> list[dict]:
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self.results), timeout):
                raise AssertionError(f"waited {timeout:g} s for {what}; results: {self.results[-5:]}")
            return list(self.results)

    def served_by(self, master: int) -> bool:
        with self.changed:
            return any(r["ok"] and r["by"].split()[0] == str(master) for r in self.results)

    def wait_served_by(self, master: int, timeout: float = 30.0) -> None:
        self.wait_for(lambda results: any(r["ok"] and r["by"].split()[0] == str(master) for r in results),
                      f"a request served by the generation of pid {master}", timeout)

    def failures(self) -> list[dict]:
        with self.changed:
            return [r for r in self.results if not r["ok"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(80)
        self._reader.join(10)


@pytest.fixture
def loads():
    started = []

    def start(*args, **kwargs):
        load = Load(*args, **kwargs)
        started.append(load)
        return load
    yield start
    for load in started:
        load.stop()


@pytest.fixture
def app_env(short_dir, monkeypatch):
    """The flags of tests/services/drain_app.py, in a directory of the test's."""
    begun = os.path.join(short_dir, "begun")
    os.mkdir(begun)
    flags = {"begun": begun, "broken": os.path.join(short_dir, "broken"), "hang": os.path.join(short_dir, "hang")}
    monkeypatch.setenv("DRAIN_APP_BEGUN", begun)
    monkeypatch.setenv("DRAIN_APP_BROKEN", flags["broken"])
    monkeypatch.setenv("DRAIN_APP_HANG", flags["hang"])
    return flags


def slow_request_in_flight(loads, port: int, begun: str, seconds: float) -> Load:
    """One request that takes `seconds`, begun (its worker says so) when this returns."""
    before = set(os.listdir(begun))
    slow = loads(port, f"/slow?{seconds:g}", interval=3600)
    deadline = time.monotonic() + 20
    while set(os.listdir(begun)) == before:  # no event but the file the worker makes
        assert time.monotonic() < deadline and slow.proc.poll() is None, "the slow request did not begin"
        time.sleep(0.01)
    return slow


def serving(daemons, runtime_dir, loads, *options, command):
    port = free_port()
    daemon = start_run(daemons, "--overlap", *options, "--chardev", f"id=http,host=127.0.0.1,port={port},server=on",
                       command=command)
    load = loads(port)
    first = service_of(runtime_dir)["pid"]
    load.wait_served_by(first)
    return daemon, port, load, first


# ----- gunicorn ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_gunicorn_restarts_beside_itself_and_no_request_waits_for_the_old_ones_drain(
        daemons, runtime_dir, loads, app_env):
    daemon, port, load, old = serving(daemons, runtime_dir, loads, "--notify", command=gunicorn())
    slow = slow_request_in_flight(loads, port, app_env["begun"], 8)

    result = restart()
    assert result.returncode == 0, result.stderr
    new = service_of(runtime_dir)["pid"]
    assert new != old and draining_of(runtime_dir) == [old]
    # Fresh requests are served by the new generation while the old one still
    # finishes the slow request: nobody waits for its drain.
    load.wait_served_by(new)
    assert slow.results == [] and old in draining_of(runtime_dir)
    done = slow.wait_for(lambda results: results, "the slow request's end", 30)
    assert done[0]["ok"] and done[0]["by"].split()[0] == str(old), done
    wait_status(os.path.join(runtime_dir, "web.sock"), lambda s: s["service"]["draining"] == [],
                "the old generation drained")
    load.stop()
    assert load.failures() == []
    assert f"generation pid {old} drained" in daemon.stderr()


@pytest.mark.timeout(120)
def test_a_broken_build_fails_the_restart_and_the_old_generation_serves_on_unsignalled(
        daemons, runtime_dir, loads, app_env):
    daemon, port, load, old = serving(daemons, runtime_dir, loads, "--notify", command=gunicorn())
    open(app_env["broken"], "w").close()
    result = restart()
    assert result.returncode == 1, result.stderr
    assert "this build is broken" in result.stderr, result.stderr  # its last line of stderr
    assert f"the old generation (pid {old}) serves on" in result.stderr
    assert service_of(runtime_dir)["pid"] == old and draining_of(runtime_dir) == []
    # Never signalled: a gunicorn that got SIGTERM would stop serving and exit.
    served = len(load.results)
    load.wait_for(lambda results: len(results) > served + 20, "more requests after the failed restart")
    assert psutil.pid_exists(old) and load.served_by(old)
    os.unlink(app_env["broken"])
    fixed = restart()
    assert fixed.returncode == 0, fixed.stderr
    load.wait_served_by(service_of(runtime_dir)["pid"])
    load.stop()
    assert load.failures() == []


@pytest.mark.timeout(120)
def test_a_new_generation_not_ready_in_time_is_stopped_and_exit_4_names_the_old_one(
        daemons, runtime_dir, loads, app_env):
    daemon, port, load, old = serving(daemons, runtime_dir, loads, "--notify", command=gunicorn())
    open(app_env["hang"], "w").close()
    result = restart("--timeout", "3")
    assert result.returncode == 4, result.stderr
    assert f"the old generation (pid {old}) serves on" in result.stderr, result.stderr
    assert service_of(runtime_dir)["pid"] == old
    wait_status(os.path.join(runtime_dir, "web.sock"), lambda s: s["service"]["draining"] == [],
                "the generation that hung stopped")
    os.unlink(app_env["hang"])
    served = len(load.results)
    load.wait_for(lambda results: len(results) > served + 20, "more requests after the failed restart")
    assert load.served_by(old)
    load.stop()
    assert load.failures() == []


@pytest.mark.timeout(120)
def test_several_generations_drain_at_once_and_a_restart_never_waits_for_one(daemons, runtime_dir, loads, app_env):
    daemon, port, load, first = serving(daemons, runtime_dir, loads, "--notify", command=gunicorn())
    slow_first = slow_request_in_flight(loads, port, app_env["begun"], 10)
    assert restart().returncode == 0
    second = service_of(runtime_dir)["pid"]
    load.wait_served_by(second)
    slow_second = slow_request_in_flight(loads, port, app_env["begun"], 10)
    assert restart().returncode == 0
    third = service_of(runtime_dir)["pid"]
    assert draining_of(runtime_dir) == [first, second]
    load.wait_served_by(third)
    for slow, master in ((slow_first, first), (slow_second, second)):
        done = slow.wait_for(lambda results: results, "a slow request's end", 30)
        assert done[0]["ok"] and done[0]["by"].split()[0] == str(master), done
    wait_status(os.path.join(runtime_dir, "web.sock"), lambda s: s["service"]["draining"] == [],
                "both old generations drained")
    load.stop()
    assert load.failures() == []


@pytest.mark.timeout(120)
def test_a_live_migration_carries_the_draining_generations_to_the_new_holder(
        daemons, runtime_dir, loads, app_env, last_instance):
    daemon, port, load, old = serving(daemons, runtime_dir, loads, "--notify", "--capability", "local-char-socket",
                                      command=gunicorn())
    slow = slow_request_in_flight(loads, port, app_env["begun"], 8)
    assert restart().returncode == 0
    new = service_of(runtime_dir)["pid"]
    moved = run("migrate-out", "--name", "web", "--spawn", timeout=60)
    assert moved.returncode == 0, moved.stderr
    after = status_of(os.path.join(runtime_dir, "web.sock"))
    assert after["pid"] != daemon.pid and after["service"]["pid"] == new
    assert [entry["pid"] for entry in after["service"]["draining"]] == [old]  # supervised there now
    done = slow.wait_for(lambda results: results, "the slow request's end", 30)
    assert done[0]["ok"] and done[0]["by"].split()[0] == str(old), done
    wait_status(os.path.join(runtime_dir, "web.sock"), lambda s: s["service"]["draining"] == [],
                "the new holder saw the old generation exit")
    assert f"generation pid {old} drains, as it did at the source" in daemon.stderr()  # the log follows the holder
    assert f"generation pid {old} " in daemon.stderr().split("drains, as it did at the source")[-1]
    load.stop()
    assert load.failures() == []


@pytest.mark.timeout(60)
def test_a_generation_that_will_not_drain_is_killed_at_run_timeout(daemons, runtime_dir, short_dir):
    # A service that ignores its stop signal, with a run --timeout of 2 s.
    ignores = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                     "time.sleep(600)"]
    daemon = start_run(daemons, "--overlap", "--ready-delay", "0.2", "--timeout", "2", command=ignores)
    old = service_of(runtime_dir)["pid"]
    assert restart().returncode == 0
    assert draining_of(runtime_dir) == [old]
    entry = service_of(runtime_dir)["draining"][0]
    assert entry["since"] and entry["kill-at"]
    wait_status(os.path.join(runtime_dir, "web.sock"), lambda s: s["service"]["draining"] == [],
                "the generation that would not drain gone", timeout=20)
    log = daemon.stderr()
    assert f"generation pid {old} did not drain within 2 s; SIGKILL" in log
    assert f"generation pid {old} was killed after" in log and "(killed by SIGKILL)" in log


@pytest.mark.timeout(60)
def test_a_crash_under_overlap_restarts_as_on_failure_does(daemons, runtime_dir):
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    start_run(daemons, "--overlap", "--ready-delay", "0.2", "--restart", "on-failure", command=sleeper)
    old = service_of(runtime_dir)["pid"]
    os.kill(old, signal.SIGKILL)
    after = wait_status(os.path.join(runtime_dir, "web.sock"),
                        lambda s: s["service"]["restarts"] == 1 and s["service"]["ready"], "started again")
    assert after["service"]["pid"] != old and after["service"]["draining"] == []


# READY=1, then (where the flag file exists) an exit 0.3 s later: a build that says
# it is ready before it can serve, and dies.
READY_THEN_DIE = ("import os, socket, sys, time\n"
                  "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                  "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
                  "if os.path.exists(sys.argv[1]):\n"
                  "    time.sleep(0.3)\n"
                  "    sys.exit('dies after READY=1')\n"
                  "time.sleep(600)\n")


@pytest.mark.timeout(60)
def test_with_notify_a_ready_delay_keeps_the_old_generation_until_the_new_one_has_lived_it(
        daemons, runtime_dir, short_dir):
    flag = os.path.join(short_dir, "die")
    start_run(daemons, "--overlap", "--notify", "--ready-delay", "2",
              command=[sys.executable, "-c", READY_THEN_DIE, flag])
    old = service_of(runtime_dir)["pid"]
    open(flag, "w").close()
    result = restart()
    assert result.returncode == 1, result.stderr
    assert "dies after READY=1" in result.stderr and f"the old generation (pid {old}) serves on" in result.stderr
    assert service_of(runtime_dir)["pid"] == old and psutil.pid_exists(old)


@pytest.mark.timeout(60)
def test_stop_during_an_overlapping_restart_stops_both_generations(daemons, runtime_dir, short_dir):
    flag = os.path.join(short_dir, "mute")  # the new generation never says READY=1
    # The old generation drains for 1.5 s after its stop signal, as a server with
    # requests in flight does; the new one never says READY=1.
    mute = ("import os, signal, socket, sys, time\n"
            "if not os.path.exists(sys.argv[1]):\n"
            "    signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), sys.exit(0)))\n"
            "    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
            "time.sleep(600)\n")
    daemon = start_run(daemons, "--overlap", "--notify", command=[sys.executable, "-c", mute, flag])
    old = service_of(runtime_dir)["pid"]
    open(flag, "w").close()
    restarting = subprocess.Popen(FDMIG + ["restart", "--name", "web", "--timeout", "50"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    during = wait_status(os.path.join(runtime_dir, "web.sock"), lambda s: s["service"]["pid"] not in (None, old),
                         "the new generation started")["service"]
    new = during["pid"]
    assert during["serving-beside"] == {"pid": old} and during["state"] == "starting"
    assert f"serving: pid {old} (the old generation" in run("status", "--name", "web").stdout
    stopped = run("stop", "--name", "web", "--timeout", "20")
    assert stopped.returncode == 0, stopped.stderr
    assert daemon.proc.wait(10) == 0
    assert not psutil.pid_exists(old) and not psutil.pid_exists(new)
    _, err = restarting.communicate(timeout=20)
    assert restarting.returncode != 0, err


# Non-blocking on its listener, as event-loop servers are; where the flag file
# exists at its start, a build that cannot start.
NONBLOCKING = ("import fcntl, os, sys, time\n"
               "if os.path.exists(sys.argv[1]):\n"
               "    sys.exit('this build cannot start')\n"
               "fcntl.fcntl(3, fcntl.F_SETFL, fcntl.fcntl(3, fcntl.F_GETFL) | os.O_NONBLOCK)\n"
               "time.sleep(600)\n")


def _fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(next(line for line in f if line.startswith("flags:")).split()[1], 8)


@pytest.mark.timeout(60)
def test_a_new_generation_leaves_the_old_ones_listener_as_the_old_one_set_it(daemons, runtime_dir, short_dir):
    # Regression: each start made the listener blocking again, and the open file is
    # the old generation's too: it then hung in accept() at its stop signal.
    flag = os.path.join(short_dir, "broken")
    port = free_port()
    start_run(daemons, "--overlap", "--ready-delay", "0.5", "--chardev", f"id=http,host=127.0.0.1,port={port},server=on",
              command=[sys.executable, "-c", NONBLOCKING, flag])
    old = service_of(runtime_dir)["pid"]
    deadline = time.monotonic() + 10
    while not _fd_flags(old, 3) & os.O_NONBLOCK:  # no event for another process's fcntl
        assert time.monotonic() < deadline, "the service did not set O_NONBLOCK"
        time.sleep(0.01)
    open(flag, "w").close()
    result = restart()
    assert result.returncode == 1 and "this build cannot start" in result.stderr, result.stderr
    assert service_of(runtime_dir)["pid"] == old
    assert _fd_flags(old, 3) & os.O_NONBLOCK, "the old generation's listener was made blocking"


@pytest.mark.timeout(60)
def test_a_new_generation_stopped_at_the_timeout_says_how_it_ended(daemons, runtime_dir, short_dir):
    flag = os.path.join(short_dir, "mute")
    mute = ("import os, socket, sys, time\n"
            "if os.path.exists(sys.argv[1]):\n"
            "    print('never ready', file=sys.stderr, flush=True)\n"
            "else:\n"
            "    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
            "time.sleep(600)\n")
    start_run(daemons, "--overlap", "--notify", command=[sys.executable, "-c", mute, flag])
    old = service_of(runtime_dir)["pid"]
    open(flag, "w").close()
    result = restart("--timeout", "2")
    assert result.returncode == 4, result.stderr
    assert "was not ready within 2 s: stopped, it was killed by SIGTERM: never ready" in result.stderr, result.stderr
    assert f"the old generation (pid {old}) serves on" in result.stderr


@pytest.mark.timeout(60)
def test_sigkill_at_the_timeout_takes_the_services_children_too(daemons, runtime_dir):
    # Regression: only the main process was killed; a child that ignores the stop
    # signal lived on, orphaned, holding the service's sockets.
    family = ["sh", "-c", "trap '' TERM; python3 -c 'import time; time.sleep(600)' & wait"]
    daemon = start_run(daemons, "--overlap", "--ready-delay", "0.2", "--timeout", "1", command=family)
    main = psutil.Process(service_of(runtime_dir)["pid"])
    deadline = time.monotonic() + 10
    while not main.children():  # no event for another process's fork
        assert time.monotonic() < deadline, "the service started no child"
        time.sleep(0.01)
    child = main.children()[0]
    assert restart().returncode == 0  # the old generation: SIGKILL at 1 s
    assert child.wait(20) is not None or not child.is_running()
    stopped = run("stop", "--name", "web", "--timeout", "20")
    assert stopped.returncode == 0, stopped.stderr


def test_ready_delay_goes_with_overlap(runtime_dir):
    result = run("run", "--ready-delay", "2", "--", "true")
    assert result.returncode == 2 and "--ready-delay goes with --overlap" in result.stderr, result.stderr


# ----- uvicorn ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_uvicorn_without_ready_1_restarts_beside_itself_after_the_ready_delay(daemons, runtime_dir, loads, app_env):
    pytest.importorskip("uvicorn")
    command = [sys.executable, "-m", "uvicorn", "--fd", "3", "--no-access-log", f"{APP}:asgi"]
    daemon, port, load, old = serving(daemons, runtime_dir, loads, "--ready-delay", "1", command=command)
    slow = slow_request_in_flight(loads, port, app_env["begun"], 6)
    result = restart()
    assert result.returncode == 0, result.stderr
    new = service_of(runtime_dir)["pid"]
    assert draining_of(runtime_dir) == [old]
    load.wait_served_by(new)
    assert slow.results == []
    done = slow.wait_for(lambda results: results, "the slow request's end", 30)
    assert done[0]["ok"], done
    wait_status(os.path.join(runtime_dir, "web.sock"), lambda s: s["service"]["draining"] == [],
                "the old uvicorn drained")
    load.stop()
    assert load.failures() == []


# ----- HAProxy ----------------------------------------------------------------------

HAPROXY_CONFIG = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend front
    bind fd@3
    default_backend back
backend back
    server echo 127.0.0.1:{port}
"""


def _connections_of(master: int) -> set:
    """The local TCP ports of the connections the processes of a HAProxy hold."""
    found = set()
    for proc in [psutil.Process(master)] + psutil.Process(master).children(recursive=True):
        connections = getattr(proc, "net_connections", proc.connections)
        found |= {c.raddr.port for c in connections(kind="tcp") if c.raddr}
    return found


@needs("haproxy")
@pytest.mark.timeout(120)
def test_haproxy_soft_stops_its_old_worker_which_keeps_a_long_connection_whole(daemons, runtime_dir, short_dir):
    echo = subprocess.Popen([sys.executable, "-m", "tests.services.tcp_echo"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        backend = int(echo.stdout.readline())
        config = os.path.join(short_dir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY_CONFIG.format(port=backend))
        port = free_port()
        # -Ws: master-worker, READY=1 on NOTIFY_SOCKET; SIGUSR1: HAProxy's soft stop.
        start_run(daemons, "--overlap", "--notify", "--stop-signal", "SIGUSR1",
                  "--chardev", f"id=front,host=127.0.0.1,port={port},server=on",
                  command=["haproxy", "-Ws", "-f", config])
        old = service_of(runtime_dir)["pid"]
        long = socket.create_connection(("127.0.0.1", port), timeout=10)
        sent = 0

        def exchange(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                record = b"%08d\n" % sent
                long.sendall(record)
                assert recv_exactly(long, len(record)) == record
                sent += 1
        exchange(100)
        assert long.getsockname()[1] in _connections_of(old)
        result = restart()
        assert result.returncode == 0, result.stderr
        new = service_of(runtime_dir)["pid"]
        assert draining_of(runtime_dir) == [old]
        exchange(100)  # through the old worker, soft-stopped: it keeps its connection whole
        fresh = socket.create_connection(("127.0.0.1", port), timeout=10)
        fresh.sendall(b"new\n")
        assert recv_exactly(fresh, 4) == b"new\n"
        assert fresh.getsockname()[1] in _connections_of(new)  # new connections go to the new one
        exchange(100)
        assert old in draining_of(runtime_dir)
        long.close()  # the old worker's last connection: then it exits
        wait_status(os.path.join(runtime_dir, "web.sock"), lambda s: s["service"]["draining"] == [],
                    "the old HAProxy exited once its connection closed")
        fresh.close()
    finally:
        echo.kill()
        echo.wait()
