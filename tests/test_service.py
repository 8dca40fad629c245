"""`fdmig run` as a service manager, end to end: real services (tests/services/)
that speak systemd's protocols through libsystemd itself, systemd-notify, gunicorn,
and real peers on the sockets fdmig holds for them. The contract is DESIGN.md's
"Services: `fdmig run` and the fd store"."""

import array
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import FDMIG, Stream, connect_unix, echoes, free_port, recv_exactly, run, status_of

ROOT = str(Path(__file__).resolve().parent.parent)
STORE_ECHO = [sys.executable, "-m", "tests.services.store_echo"]


# -- the test's side of the services ------------------------------------------------

class Puppet:
    """One start of tests/services/puppet.py: what it reported at start, its
    LISTEN_FDS descriptors (received here, so identities can be compared), and
    the commands it runs for the test."""

    def __init__(self, conn: socket.socket, hello: dict, fds: list[int]):
        self.conn, self.hello, self.fds = conn, hello, fds
        self.pid = hello["pid"]
        self.env = hello["env"]

    @property
    def names(self) -> list[str]:
        names = self.env.get("LISTEN_FDNAMES", "")
        return names.split(":") if names else []

    def passed(self, name: str) -> socket.socket:
        """The descriptor passed under `name`, as a socket of this process."""
        return socket.socket(fileno=os.dup(self.fds[self.names.index(name)]))

    def request(self, command: dict, fds=()) -> dict:
        data = json.dumps(command).encode()
        fds = [fd if isinstance(fd, int) else fd.fileno() for fd in fds]
        if fds:
            socket.send_fds(self.conn, [data], fds)
        else:
            self.conn.send(data)
        answer = json.loads(self.conn.recv(1 << 16))
        assert answer["ok"], answer
        return answer

    def notify(self, state: str, *fds, barrier: bool = True) -> dict:
        """sd_pid_notify_with_fds from the service, then (barrier) sd_notify_barrier:
        once this returns, the instance has handled the message."""
        return self.request({"notify": state, "barrier": barrier}, fds)

    def stop_signal(self) -> str:
        """The name of the stop signal the service got (it exits right after)."""
        data = self.conn.recv(1 << 16)
        assert data, "the service exited without reporting a stop signal"
        return json.loads(data)["signal"]

    def exited(self) -> bool:
        """Blocks until the service's end of the control connection closes."""
        try:
            while self.conn.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self):
        self.conn.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class Puppets:
    """The socket each start of the puppet service connects to: accepting on it
    is the event "the service has started"."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "pp.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.started: list[Puppet] = []

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.services.puppet", self.path]

    def next(self, daemon=None, timeout: float = 20.0) -> Puppet:
        """The next start of the service; fails early if `daemon` (fdmig run) exits."""
        deadline = time.monotonic() + timeout
        self.listener.settimeout(0.25)
        while True:
            try:
                conn, _ = self.listener.accept()
                break
            except socket.timeout:
                if daemon is not None and daemon.proc.poll() is not None:
                    raise AssertionError(f"fdmig run exited {daemon.proc.returncode}: {daemon.stderr()[-3000:]}")
                if time.monotonic() > deadline:
                    log = daemon.stderr()[-3000:] if daemon is not None else ""
                    raise AssertionError(f"the service did not start within {timeout} s: {log}") from None
        conn.settimeout(timeout)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 64)
        puppet = Puppet(conn, json.loads(data), fds)
        self.started.append(puppet)
        return puppet

    def close(self):
        for puppet in self.started:
            puppet.close()
        self.listener.close()


@pytest.fixture
def puppets(short_dir):
    puppets = Puppets(short_dir)
    yield puppets
    puppets.close()


def start_run(daemons, *options, command, ready=True):
    """`fdmig run --name web OPTIONS -- COMMAND`, the services importable from the repo."""
    return daemons("run", "--name", "web", *options, "--", *command, cwd=ROOT, ready=ready)


def control_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "web.sock")


def service_of(runtime_dir: str) -> dict:
    return status_of(control_path(runtime_dir))["service"]


def stored_of(runtime_dir: str) -> list[dict]:
    return status_of(control_path(runtime_dir))["stored"]


def wait_status(runtime_dir: str, condition, what: str, timeout: float = 15.0) -> dict:
    return helpers.wait_status(control_path(runtime_dir), condition, what, timeout)


def restart(*options, timeout: float = 60) -> subprocess.CompletedProcess:
    return run("restart", "--name", "web", *options, timeout=timeout)


def sees_eof(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once every other copy of the peer's descriptor is closed."""
    sock.settimeout(timeout)
    return sock.recv(1) == b""


def refusal_lines(daemon, pid: int, reason: str) -> list[str]:
    """Log lines of a refusal that name the sender's pid and say `reason` (a word of it)."""
    return [line for line in daemon.stderr().splitlines()
            if "refus" in line.lower() and reason.lower() in line.lower()
            and str(pid) in line.replace(":", " ").replace(",", " ").split()]


def drained(notify) -> list[dict]:
    """The messages waiting on a test's NOTIFY_SOCKET right now, without blocking."""
    notify.sock.setblocking(False)
    try:
        while True:
            data = notify.sock.recv(4096)
            notify.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))
    except BlockingIOError:
        pass
    finally:
        notify.sock.setblocking(True)
    return notify.messages


def lockstep(sock: socket.socket, data: bytes) -> None:
    sock.settimeout(20)
    assert echoes(sock, data)


# -- what the service is started with -----------------------------------------------

def test_the_service_gets_its_chardevs_then_its_stored_fds_as_socket_activation_does(
        puppets, daemons, runtime_dir, short_dir, monkeypatch):
    monkeypatch.setenv("FDMIG_TEST_MARK", "inherited from run")
    zed, mid, port = os.path.join(short_dir, "z.sock"), os.path.join(short_dir, "m.sock"), free_port()
    daemon = start_run(daemons,
                       "--chardev", f"id=zed,path={zed},server=on",
                       "--chardev", f"id=mid,path={mid},server=on,frontend=echo",  # fdmig's own, not passed
                       "--chardev", f"id=alpha,host=127.0.0.1,port={port},server=on",
                       command=puppets.command)
    first = puppets.next(daemon)
    env = first.env
    assert (env["LISTEN_FDS"], env["LISTEN_PID"], env["LISTEN_FDNAMES"]) == ("2", str(first.pid), "zed:alpha")
    assert env["NOTIFY_SOCKET"] == os.path.join(runtime_dir, "web.notify.sock")
    assert env["FDMIG_TEST_MARK"] == "inherited from run"
    assert first.hello["stdin-is-dev-null"]
    # fds 3 and 4 and nothing else beyond stderr; blocking, and inherited across exec
    assert first.hello["fds"] == [{"fd": 3, "cloexec": False, "nonblock": False},
                                  {"fd": 4, "cloexec": False, "nonblock": False}]
    with first.passed("zed") as listener:
        assert listener.getsockname() == zed
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    with first.passed("alpha") as listener:
        assert listener.getsockname() == ("127.0.0.1", port)
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    with connect_unix(mid) as peer:
        assert echoes(peer, b"served by fdmig")

    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    first.notify("FDSTORE=1\nFDNAME=s-b", theirs, barrier=False)
    first.notify("FDSTORE=1\nFDNAME=s-a", write_end)
    theirs.close()
    os.close(write_end)
    assert restart().returncode == 0

    second = puppets.next(daemon)
    assert second.env["LISTEN_PID"] == str(second.pid) != str(first.pid)
    assert (second.env["LISTEN_FDS"], second.env["LISTEN_FDNAMES"]) == ("4", "zed:alpha:s-b:s-a")
    assert second.hello["fds"] == [{"fd": fd, "cloexec": False, "nonblock": False} for fd in (3, 4, 5, 6)]
    with second.passed("s-b") as stored:  # the very socket stored, not a look-alike
        stored.sendall(b"same socket")
        ours.settimeout(10)
        assert recv_exactly(ours, 11) == b"same socket"
    os.write(second.fds[3], b"same pipe")
    assert os.read(read_end, 9) == b"same pipe"
    os.close(read_end)
    ours.close()


def test_fds_are_blocking_for_each_start_even_after_a_service_made_them_non_blocking(
        puppets, daemons, runtime_dir, short_dir):
    path = os.path.join(short_dir, "a.sock")
    daemon = start_run(daemons, "--chardev", f"id=app,path={path},server=on", command=puppets.command)
    first = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)  # as a service using it with asyncio would have left it
    first.notify("FDSTORE=1\nFDNAME=conn", theirs)
    theirs.close()
    # O_NONBLOCK is on the open file, shared with fdmig's copy: gunicorn sets it on its listener.
    first.request({"nonblock": True})
    assert restart().returncode == 0
    second = puppets.next(daemon)
    assert second.names == ["app", "conn"]
    assert second.hello["fds"] == [{"fd": 3, "cloexec": False, "nonblock": False},
                                   {"fd": 4, "cloexec": False, "nonblock": False}]
    ours.close()


@pytest.mark.parametrize("command", ["serve", "attach"])
def test_frontend_service_outside_run_is_a_usage_error(command, daemons, runtime_dir, short_dir):
    spec = f"socket,id=app,path={os.path.join(short_dir, 'x.sock')},server=on,frontend=service"
    if command == "attach":
        daemons("serve", "--name", "web")
        result = run("attach", "--name", "web", spec)
    else:
        result = run("serve", "--name", "web", "--chardev", spec)
    assert result.returncode == 2, result.stderr
    assert "frontend" in result.stderr and "service" in result.stderr


# -- readiness and status ---------------------------------------------------------------

def test_run_reports_ready_only_after_the_service_sent_ready(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--notify", command=puppets.command, ready=False)
    puppet = puppets.next(daemon)
    service = service_of(runtime_dir)
    assert (service["pid"], service["state"], service["ready"]) == (puppet.pid, "starting", False)
    assert not any("READY" in message for message in drained(daemon.notify))
    puppet.notify("READY=1")
    daemon.wait_ready()
    service = service_of(runtime_dir)
    assert (service["state"], service["ready"]) == ("running", True)


def test_without_notify_the_service_is_ready_once_started(puppets, daemons, runtime_dir):
    start_run(daemons, command=puppets.command)  # waits for run's READY=1
    puppet = puppets.next()
    service = service_of(runtime_dir)
    assert (service["pid"], service["state"], service["ready"]) == (puppet.pid, "running", True)


@helpers.needs("systemd-notify")
def test_systemd_notify_from_the_service_sets_ready_and_the_status_text(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--notify", command=puppets.command, ready=False)
    puppet = puppets.next(daemon)
    answer = puppet.request({"run": ["systemd-notify", "--ready", "--status=serving 3 peers"]})
    assert answer["rc"] == 0
    daemon.wait_ready()
    result = run("status", "--name", "web", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    service = status["service"]
    assert service["command"] in (puppets.command, " ".join(puppets.command))
    assert {key: service[key] for key in ("pid", "state", "ready", "status-text", "restarts",
                                          "fdstore-max", "fdstore-refused")} == {
        "pid": puppet.pid, "state": "running", "ready": True, "status-text": "serving 3 peers",
        "restarts": 0, "fdstore-max": 1024, "fdstore-refused": 0}
    assert status["stored"] == []


# -- the fd store, through libsystemd's client ------------------------------------------

@pytest.mark.timeout(60)
def test_stored_connections_stream_through_restarts_without_eof_loss_or_reorder(
        daemons, runtime_dir, short_dir):
    path, port = os.path.join(short_dir, "app.sock"), free_port()
    start_run(daemons, "--notify", "--chardev", f"id=app,path={path},server=on",
              "--chardev", f"id=web,host=127.0.0.1,port={port},server=on", command=STORE_ECHO)
    tcp = socket.create_connection(("127.0.0.1", port), timeout=10)
    tcp_peer = "tcp:127.0.0.1:%d" % tcp.getsockname()[1]
    streams = [Stream(connect_unix(path)), Stream(tcp), Stream(connect_unix(path))]
    for stream in streams:
        stream.wait_echoed(1)
    pids = {service_of(runtime_dir)["pid"]}
    for _ in range(3):
        result = restart()
        assert result.returncode == 0, result.stderr
        pids.add(service_of(runtime_dir)["pid"])
        for stream in streams:  # records sent after the restart come back: the new service echoes
            stream.wait_echoed(stream.sent + 1)
    assert len(pids) == 4

    stored = sorted(stored_of(runtime_dir), key=lambda entry: entry["kind"])
    assert sorted(entry["name"] for entry in stored) == ["conn-1", "conn-2", "conn-3"]
    assert [entry["kind"] for entry in stored] == ["tcp", "unix", "unix"]
    assert stored[0]["address"] == f"tcp:127.0.0.1:{port}" and stored[0]["peer"] == tcp_peer
    assert all(entry["address"] == f"unix:{path}" and entry["peer"].startswith("unix:") for entry in stored[1:])
    assert all(isinstance(entry["fd"], int) and entry["stored-at"] for entry in stored)
    table = run("status", "--name", "web").stdout
    assert "conn-1" in table and str(service_of(runtime_dir)["pid"]) in table

    assert all(stream.finish() > 0 for stream in streams)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("crash", [signal.SIGKILL, signal.SIGUSR1], ids=["killed", "exits-3"])
def test_a_crashed_service_comes_back_with_its_store_under_restart_on_failure(
        crash, daemons, runtime_dir, short_dir):
    path = os.path.join(short_dir, "app.sock")
    start_run(daemons, "--notify", "--restart", "on-failure", "--chardev", f"id=app,path={path},server=on",
              command=STORE_ECHO)
    peers = [connect_unix(path), connect_unix(path)]
    for peer in peers:
        lockstep(peer, b"before the crash")
    status = wait_status(runtime_dir, lambda s: len(s["stored"]) == 2, "both connections stored")
    old = status["service"]["pid"]

    os.kill(old, crash)  # nothing in flight: the service has echoed all it read
    for peer in peers:
        lockstep(peer, b"after the crash")  # the same connections, served by the new service
    status = wait_status(runtime_dir, lambda s: s["service"]["state"] == "running", "the service running again")
    assert status["service"]["pid"] != old
    assert status["service"]["restarts"] == 1
    assert sorted(entry["name"] for entry in status["stored"]) == ["conn-1", "conn-2"]
    for peer in peers:
        peer.close()


def test_the_same_open_file_stored_twice_is_kept_once(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, command=puppets.command)
    first = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    first.notify("FDSTORE=1\nFDNAME=twice", theirs, theirs)  # one fd twice in one message
    duplicate = os.dup(theirs.fileno())
    first.notify("FDSTORE=1\nFDNAME=twice", duplicate)  # and a dup of it in another
    os.close(duplicate)
    theirs.close()
    stored = stored_of(runtime_dir)
    assert [(entry["name"], entry["kind"]) for entry in stored] == [("twice", "unix")]
    assert restart().returncode == 0
    assert puppets.next(daemon).names == ["twice"]
    ours.close()


def test_any_kind_of_fd_is_stored_named_stored_by_default_and_reported_by_kind(
        puppets, daemons, runtime_dir, short_dir):
    daemon = start_run(daemons, command=puppets.command)
    puppet = puppets.next(daemon)
    read_end, write_end = os.pipe()
    memfd = os.memfd_create("fdmig-test")
    path = os.path.join(short_dir, "plain")
    plain = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    eventfd = os.eventfd(0)
    puppet.notify("FDSTORE=1", read_end, barrier=False)  # no FDNAME: "stored"
    for name, fd in [("memfd", memfd), ("file", plain), ("udp", udp), ("eventfd", eventfd)]:
        puppet.notify(f"FDSTORE=1\nFDNAME={name}", fd, barrier=False)
    puppet.notify("BARRIER=1", barrier=True)
    kinds = [(entry["name"], entry["kind"]) for entry in stored_of(runtime_dir)]
    assert kinds == [("stored", "pipe"), ("memfd", "memfd"), ("file", "file"), ("udp", "udp"),
                     ("eventfd", "other")]
    for fd in (read_end, write_end, memfd, plain, eventfd):
        os.close(fd)
    udp.close()


def test_fdstoreremove_closes_every_fd_stored_under_that_name(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, command=puppets.command)
    puppet = puppets.next(daemon)
    pairs = [socket.socketpair() for _ in range(3)]
    for name, (_, theirs) in zip(["gone", "gone", "kept"], pairs):
        puppet.notify(f"FDSTORE=1\nFDNAME={name}", theirs)
        theirs.close()
    assert [entry["name"] for entry in stored_of(runtime_dir)] == ["gone", "gone", "kept"]
    puppet.notify("FDSTOREREMOVE=1\nFDNAME=gone")
    assert sees_eof(pairs[0][0]) and sees_eof(pairs[1][0])
    assert [entry["name"] for entry in stored_of(runtime_dir)] == ["kept"]
    for ours, _ in pairs:
        ours.close()


def test_a_stored_socket_whose_peer_hangs_up_is_removed_unless_stored_with_fdpoll_0(
        puppets, daemons, runtime_dir):
    daemon = start_run(daemons, command=puppets.command)
    puppet = puppets.next(daemon)
    watched, watched_theirs = socket.socketpair()
    unwatched, unwatched_theirs = socket.socketpair()
    puppet.notify("FDSTORE=1\nFDNAME=unwatched\nFDPOLL=0", unwatched_theirs)
    puppet.notify("FDSTORE=1\nFDNAME=watched", watched_theirs)
    watched_theirs.close()
    unwatched_theirs.close()
    unwatched.close()  # hangs up first: had it been watched, it would be gone before the other
    watched.close()
    status = wait_status(runtime_dir, lambda s: "watched" not in [e["name"] for e in s["stored"]],
                         "the hung-up socket removed")
    assert [entry["name"] for entry in status["stored"]] == ["unwatched"]


def test_a_descendant_of_the_service_may_store_fds(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, command=puppets.command)
    puppet = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    answer = puppet.request({"notify": "FDSTORE=1\nFDNAME=from-child", "fork": True}, [theirs])
    assert answer["status"] == 0
    theirs.close()
    status = status_of(control_path(runtime_dir))
    assert [entry["name"] for entry in status["stored"]] == ["from-child"]
    assert status["service"]["fdstore-refused"] == 0
    ours.close()


# -- refusals: logged with the sender's pid, fds closed, counted --------------------------

@pytest.mark.parametrize("name", ["a:b", "tab\there", "x" * 256], ids=["colon", "control-character", "256-chars"])
def test_a_bad_fdname_is_refused_logged_counted_and_its_fds_closed(name, puppets, daemons, runtime_dir):
    daemon = start_run(daemons, command=puppets.command)
    puppet = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    puppet.notify(f"FDSTORE=1\nFDNAME={name}", theirs)
    theirs.close()
    assert sees_eof(ours)  # fdmig closed the copy it refused
    status = status_of(control_path(runtime_dir))
    assert status["stored"] == [] and status["service"]["fdstore-refused"] == 1
    assert refusal_lines(daemon, puppet.pid, "FDNAME"), daemon.stderr()


def test_an_fdname_of_255_characters_is_stored(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, command=puppets.command)
    puppet = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    puppet.notify(f"FDSTORE=1\nFDNAME={'x' * 255}", theirs)
    status = status_of(control_path(runtime_dir))
    assert [entry["name"] for entry in status["stored"]] == ["x" * 255]
    assert status["service"]["fdstore-refused"] == 0
    ours.close()
    theirs.close()


def test_a_message_that_would_exceed_fdstore_max_is_refused_whole(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--fdstore-max", "2", command=puppets.command)
    puppet = puppets.next(daemon)
    pairs = [socket.socketpair() for _ in range(4)]
    puppet.notify("FDSTORE=1\nFDNAME=first", pairs[0][1])
    puppet.notify("FDSTORE=1\nFDNAME=pair", pairs[1][1], pairs[2][1])  # 3 > 2: neither is kept
    for _, theirs in pairs:
        theirs.close()
    assert sees_eof(pairs[1][0]) and sees_eof(pairs[2][0])
    status = status_of(control_path(runtime_dir))
    assert [entry["name"] for entry in status["stored"]] == ["first"]
    assert status["service"]["fdstore-max"] == 2 and status["service"]["fdstore-refused"] == 1
    assert refusal_lines(daemon, puppet.pid, "--fdstore-max"), daemon.stderr()
    ours, theirs = socket.socketpair()
    puppet.notify("FDSTORE=1\nFDNAME=second", theirs)  # up to the limit still fits
    theirs.close()
    assert [entry["name"] for entry in stored_of(runtime_dir)] == ["first", "second"]
    for sock in [ours] + [ours for ours, _ in pairs]:
        sock.close()


def test_fdstore_max_0_turns_the_store_off(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--fdstore-max", "0", command=puppets.command)
    puppet = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    puppet.notify("FDSTORE=1\nFDNAME=conn", theirs)
    theirs.close()
    assert sees_eof(ours)
    status = status_of(control_path(runtime_dir))
    assert status["stored"] == [] and status["service"]["fdstore-refused"] == 1
    assert refusal_lines(daemon, puppet.pid, "off"), daemon.stderr()


def test_an_outsider_cannot_store_fds_or_speak_for_the_service(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--notify", command=puppets.command, ready=False)
    puppet = puppets.next(daemon)
    puppet.notify("READY=1\nSTATUS=the service's own")
    daemon.wait_ready()
    ours, theirs = socket.socketpair()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as outsider:  # this test is no descendant
        outsider.sendmsg([b"FDSTORE=1\nFDNAME=intruder"],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))],
                         0, os.path.join(runtime_dir, "web.notify.sock"))
        outsider.sendto(b"STATUS=taken over", os.path.join(runtime_dir, "web.notify.sock"))
    theirs.close()
    assert sees_eof(ours)
    puppet.notify("BARRIER=1")  # the outsider's second message has been handled too
    status = status_of(control_path(runtime_dir))
    assert status["stored"] == []
    assert status["service"]["fdstore-refused"] >= 1
    assert status["service"]["status-text"] == "the service's own"
    assert refusal_lines(daemon, os.getpid(), ""), daemon.stderr()


# -- fdmig restart ---------------------------------------------------------------------

def test_restart_exits_0_only_once_the_new_service_sent_ready(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--notify", command=puppets.command, ready=False)
    first = puppets.next(daemon)
    first.notify("READY=1")
    daemon.wait_ready()
    restarting = subprocess.Popen(FDMIG + ["restart", "--name", "web"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stop_signal() == "SIGTERM"
        second = puppets.next(daemon)
        service = service_of(runtime_dir)
        assert (service["pid"], service["state"], service["ready"]) == (second.pid, "starting", False)
        assert restarting.poll() is None, restarting.communicate()
        second.notify("READY=1\nSTATUS=second start")
        out, err = restarting.communicate(timeout=20)
        assert restarting.returncode == 0, err
    finally:
        if restarting.poll() is None:
            restarting.kill()
            restarting.wait()
    service = service_of(runtime_dir)
    assert (service["state"], service["ready"], service["status-text"]) == ("running", True, "second start")


def test_restart_takes_the_messages_the_service_sent_just_before_it_exited(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, command=puppets.command)
    first = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    first.request({"on-stop": "FDSTORE=1\nFDNAME=parting"}, [theirs])  # sent on SIGTERM, then exit
    theirs.close()
    result = restart()
    assert result.returncode == 0, result.stderr
    assert first.stop_signal() == "SIGTERM"
    second = puppets.next(daemon)
    assert second.names == ["parting"]
    with second.passed("parting") as stored:
        stored.sendall(b"kept")
        ours.settimeout(10)
        assert recv_exactly(ours, 4) == b"kept"
    ours.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_no_connection_attempt_is_refused_while_the_service_restarts(family, daemons, runtime_dir, short_dir):
    if family == "unix":
        path = os.path.join(short_dir, "app.sock")
        spec, connect = f"id=app,path={path},server=on", lambda: connect_unix(path)
    else:
        port = free_port()
        spec = f"id=app,host=127.0.0.1,port={port},server=on"
        connect = lambda: socket.create_connection(("127.0.0.1", port), timeout=10)  # noqa: E731
    start_run(daemons, "--notify", "--chardev", spec, command=STORE_ECHO + ["--greet"])
    old = service_of(runtime_dir)["pid"]
    old_gone = select.poll()
    old_gone.register(os.pidfd_open(old), select.POLLIN)  # readable once the old service has exited
    restarting = subprocess.Popen(FDMIG + ["restart", "--name", "web"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopping, down = [], []  # made while the old service runs (and stops); once it is gone
    try:
        while not old_gone.poll(2):
            assert restarting.poll() is None, restarting.communicate()
            stopping.append(connect())  # ECONNREFUSED (or any error) fails the test
        while restarting.poll() is None and len(down) < 500:
            down.append(connect())
        out, err = restarting.communicate(timeout=30)
        assert restarting.returncode == 0, err
    finally:
        if restarting.poll() is None:
            restarting.kill()
            restarting.wait()
    new = service_of(runtime_dir)["pid"]

    def served_by(sock: socket.socket, n: int) -> int:
        sock.settimeout(20)
        sock.sendall(b"%d\n" % n)
        with sock, sock.makefile("rb") as lines:
            pid = int(lines.readline())
            assert lines.readline() == b"%d\n" % n
        return pid

    assert {served_by(sock, n) for n, sock in enumerate(stopping)} <= {old, new}
    assert down, "the new service was ready before the old one was seen gone"
    assert {served_by(sock, n) for n, sock in enumerate(down)} == {new}


def test_restart_exits_1_when_the_new_service_fails_keeping_the_store_and_listener(daemons, runtime_dir, short_dir):
    path, marker = os.path.join(short_dir, "app.sock"), os.path.join(short_dir, "fail")
    start_run(daemons, "--notify", "--chardev", f"id=app,path={path},server=on",
              command=STORE_ECHO + ["--fail-if-exists", marker])
    stored_peer = connect_unix(path)
    lockstep(stored_peer, b"first")
    wait_status(runtime_dir, lambda s: len(s["stored"]) == 1, "the connection stored")

    open(marker, "w").close()
    result = restart()
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip()  # the reason is printed
    status = status_of(control_path(runtime_dir))
    assert status["service"]["state"] == "failed"
    assert [entry["name"] for entry in status["stored"]] == ["conn-1"]
    assert [chardev["state"] for chardev in status["chardevs"]] == ["listening"]
    waiting = connect_unix(path)  # the listener is still held: this waits in the backlog
    waiting.sendall(b"waited")
    stored_peer.sendall(b"held")

    os.remove(marker)
    result = restart()
    assert result.returncode == 0, result.stderr
    waiting.settimeout(20)
    stored_peer.settimeout(20)
    assert recv_exactly(waiting, 6) == b"waited"
    assert recv_exactly(stored_peer, 4) == b"held"
    waiting.close()
    stored_peer.close()


def test_restart_exits_4_when_the_new_service_is_not_ready_within_the_timeout(daemons, runtime_dir, short_dir):
    path, marker = os.path.join(short_dir, "app.sock"), os.path.join(short_dir, "hang")
    start_run(daemons, "--notify", "--chardev", f"id=app,path={path},server=on",
              command=STORE_ECHO + ["--hang-if-exists", marker])
    open(marker, "w").close()
    result = restart("--timeout", "1")
    assert result.returncode == 4, result.stderr
    service = service_of(runtime_dir)
    assert (service["state"], service["ready"]) == ("starting", False)
    os.remove(marker)
    result = restart()  # the one that never became ready is stopped; a good one starts
    assert result.returncode == 0, result.stderr
    with connect_unix(path) as peer:
        lockstep(peer, b"ready at last")


def test_a_service_that_ignores_the_stop_signal_is_killed_after_the_timeout(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--timeout", "1", command=puppets.command)
    first = puppets.next(daemon)
    first.request({"ignore-stop": True})
    began = time.monotonic()
    result = restart()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began >= 1
    assert first.exited()
    second = puppets.next(daemon)
    assert service_of(runtime_dir)["pid"] == second.pid


def wait_logged(daemon, predicate, what: str, timeout: float = 10.0) -> str:
    """The daemon's log once `predicate(log)` holds: a line the service wrote to
    its stderr reaches it through a copier process, whose end the test cannot await."""
    deadline = time.monotonic() + timeout
    while not predicate(daemon.stderr()):
        assert time.monotonic() < deadline, f"not logged within {timeout} s: {what}: {daemon.stderr()[-2000:]}"
        time.sleep(0.02)
    return daemon.stderr()


def wait_stopping(runtime_dir: str) -> dict:
    """The service once the instance is stopping it (the stop signal sent, the log
    line that says so written: both happen in the turn that makes it so)."""
    return wait_status(runtime_dir, lambda s: s["service"]["state"] == "stopping", "the service stopping")["service"]


@pytest.mark.timeout(60)
def test_restart_timeout_bounds_the_wait_for_a_service_that_will_not_stop_and_the_restart_goes_on(
        puppets, daemons, runtime_dir):
    # Regression: restart --timeout 3 waited out run --timeout (90 s) before the wait it bounds.
    daemon = start_run(daemons, "--timeout", "300", command=puppets.command)
    first = puppets.next(daemon)
    first.request({"ignore-stop": True})
    began = time.monotonic()
    result = restart("--timeout", "1", timeout=30)
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - began < 20
    assert f"the old service (pid {first.pid}) has not stopped yet; SIGKILL at " in result.stderr, result.stderr
    assert "run --timeout 300 s" in result.stderr and "the restart goes on in the instance" in result.stderr
    service = service_of(runtime_dir)
    assert (service["state"], service["pid"], service["stop-timeout-s"]) == ("stopping", first.pid, 300)
    assert service["kill-at"]
    os.kill(first.pid, signal.SIGKILL)  # what run --timeout would do later: the restart it began goes on
    second = puppets.next(daemon)
    status = wait_status(runtime_dir, lambda s: s["service"]["pid"] == second.pid and s["service"]["ready"],
                         "the restart that went on without its client")
    assert status["service"]["restarts"] == 1


def test_a_restart_joins_a_restart_under_way(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--timeout", "300", command=puppets.command)
    first = puppets.next(daemon)
    first.request({"ignore-stop": True})
    waiting_for_the_first = f"the old service (pid {first.pid}) has not stopped yet"
    for _ in range(2):  # the second joins the first: no error, no second stop
        result = restart("--timeout", "0.5", timeout=30)
        assert result.returncode == 4 and waiting_for_the_first in result.stderr, result.stderr
    os.kill(first.pid, signal.SIGKILL)
    second = puppets.next(daemon)
    status = wait_status(runtime_dir, lambda s: s["service"]["pid"] == second.pid and s["service"]["ready"],
                         "the second start")
    assert status["service"]["restarts"] == 1
    result = restart()
    assert result.returncode == 0, result.stderr
    third = puppets.next(daemon)  # the next start is this restart's: none came in between
    assert result.stdout.strip() == f"service restarted: pid {third.pid}, ready"
    assert service_of(runtime_dir)["restarts"] == 2


def test_restart_says_what_it_still_awaits_when_the_new_service_is_not_ready(daemons, runtime_dir, short_dir):
    marker = os.path.join(short_dir, "hang")
    start_run(daemons, "--notify", command=STORE_ECHO + ["--hang-if-exists", marker])
    open(marker, "w").close()
    result = restart("--timeout", "1")
    assert result.returncode == 4, result.stderr
    pid = service_of(runtime_dir)["pid"]
    assert f"the new service (pid {pid}) is not ready yet (no READY=1 from it yet)" in result.stderr, result.stderr


def test_a_failed_restart_says_the_new_services_exit_status_and_last_line_of_stderr(
        daemons, runtime_dir, short_dir):
    # Regression: it said "it exited before it was ready (exit status 1)", and not why.
    marker = os.path.join(short_dir, "fail")
    script = f'echo "warming up" >&2; exec {" ".join(STORE_ECHO)} --fail-if-exists {marker}'
    daemon = start_run(daemons, "--notify", command=["sh", "-c", script])
    open(marker, "w").close()
    result = restart()
    assert result.returncode == 1, result.stderr
    said = re.search(r"the new service \(pid (\d+)\) exited with status 1 before it was ready: (.*?); its "
                     r"listening sockets and fd store stay held", result.stderr)
    assert said, result.stderr
    assert said.group(2) == f"store_echo {said.group(1)}: failing at start, {marker} exists"
    wait_logged(daemon, lambda log: log.splitlines().count("warming up") == 2 and said.group(2) in log,
                "every line of both starts")  # run's stderr has every line of it
    assert service_of(runtime_dir)["state"] == "failed"


def test_a_service_keeps_a_working_stderr_after_its_holder_is_killed(puppets, daemons, runtime_dir):
    # The service's stderr goes through a pipe (its last line is kept for restart's
    # message): the copier at its other end is not the holder, so it outlives it.
    daemon = start_run(daemons, command=puppets.command)
    puppet = puppets.next(daemon)
    daemon.proc.kill()
    daemon.proc.wait(10)
    answer = puppet.request({"run": ["sh", "-c", "echo written after the holder died >&2"]})
    assert answer["rc"] == 0  # no EPIPE, no SIGPIPE
    os.kill(puppet.pid, signal.SIGTERM)
    assert puppet.stop_signal() == "SIGTERM" and puppet.exited()
    wait_logged(daemon, lambda log: "written after the holder died" in log, "the line")


def test_ctrl_c_during_restart_says_where_the_service_stands_and_the_restart_goes_on(
        puppets, daemons, runtime_dir):
    # Regression: click's "Aborted!" only, and the restart was given up with the
    # client: the old service stopped, and no new one started.
    daemon = start_run(daemons, "--timeout", "300", command=puppets.command)
    first = puppets.next(daemon)
    first.request({"ignore-stop": True})
    restarting = subprocess.Popen(FDMIG + ["restart", "--name", "web"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    try:
        wait_stopping(runtime_dir)
        restarting.send_signal(signal.SIGINT)
        out, err = restarting.communicate(timeout=20)
    finally:
        restarting.kill()
    assert restarting.returncode == 1, err
    assert "Aborted!" not in err and err.count("\n") == 1, err
    assert (f"interrupted; the restart goes on in the instance: the old service (pid {first.pid}) is stopping; "
            "SIGKILL at ") in err, err
    os.kill(first.pid, signal.SIGKILL)
    second = puppets.next(daemon)
    wait_status(runtime_dir, lambda s: s["service"]["pid"] == second.pid, "the new service")


# -- exits by itself: the --restart policy ---------------------------------------------------

def test_restart_always_starts_the_service_again_after_a_clean_exit(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--restart", "always", command=puppets.command)
    first = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    first.notify("FDSTORE=1\nFDNAME=conn", theirs)
    theirs.close()
    first.request({"exit": 0})
    second = puppets.next(daemon)
    assert second.names == ["conn"]
    status = wait_status(runtime_dir, lambda s: s["service"]["pid"] == second.pid, "the second start")
    assert status["service"]["restarts"] == 1
    ours.close()


@pytest.mark.parametrize("policy, code, state", [("on-failure", 0, "exited"), ("no", 1, "failed")])
def test_a_service_that_is_not_started_again_stays_down_with_its_fds_held_until_restart(
        policy, code, state, puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--restart", policy, command=puppets.command)
    first = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    first.notify("FDSTORE=1\nFDNAME=conn", theirs)
    theirs.close()
    first.request({"exit": code})
    status = wait_status(runtime_dir, lambda s: s["service"]["state"] == state, f"the service {state}")
    assert status["service"]["restarts"] == 0
    assert [entry["name"] for entry in status["stored"]] == ["conn"]
    result = restart()
    assert result.returncode == 0, result.stderr
    second = puppets.next(daemon)
    assert second.names == ["conn"]
    ours.close()


# -- stopping fdmig run ----------------------------------------------------------------------

@pytest.mark.parametrize("stop_signal", [None, "SIGINT"], ids=["default", "SIGINT"])
def test_sigterm_to_run_stops_the_service_with_its_stop_signal_closes_everything_and_exits_0(
        stop_signal, puppets, daemons, runtime_dir, short_dir):
    path = os.path.join(short_dir, "app.sock")
    options = ["--stop-signal", stop_signal] if stop_signal else []
    daemon = start_run(daemons, *options, "--chardev", f"id=app,path={path},server=on", command=puppets.command)
    puppet = puppets.next(daemon)
    ours, theirs = socket.socketpair()
    puppet.notify("FDSTORE=1\nFDNAME=conn", theirs)
    theirs.close()
    daemon.proc.send_signal(signal.SIGTERM)
    assert puppet.stop_signal() == (stop_signal or "SIGTERM")
    assert daemon.proc.wait(20) == 0, daemon.stderr()
    assert sees_eof(ours)  # the store is closed
    for sock in (path, control_path(runtime_dir), os.path.join(runtime_dir, "web.notify.sock")):
        assert not os.path.exists(sock), sock
    ours.close()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_sighup_and_sigint_to_run_stop_the_service_first_remove_every_socket_and_exit_0(
        signum, puppets, daemons, runtime_dir, short_dir):
    # Regression: SIGHUP (a closed terminal) killed it: exit 129, the service left
    # running, every socket file left behind.
    path = os.path.join(short_dir, "app.sock")
    daemon = start_run(daemons, "--chardev", f"id=app,path={path},server=on", command=puppets.command)
    puppet = puppets.next(daemon)
    puppet.notify("STATUS=serving")  # its signal handlers are set once it answers
    daemon.proc.send_signal(signum)
    assert puppet.stop_signal() == "SIGTERM"  # --stop-signal, whatever stopped the instance
    assert daemon.proc.wait(20) == 0, daemon.stderr()
    assert f"stopping on {signum.name}" in daemon.stderr()
    for sock in (path, control_path(runtime_dir), os.path.join(runtime_dir, "web.notify.sock")):
        assert not os.path.exists(sock), sock


@pytest.mark.timeout(60)
def test_a_second_sigint_kills_a_service_that_will_not_stop(puppets, daemons, runtime_dir):
    daemon = start_run(daemons, "--timeout", "300", command=puppets.command)
    puppet = puppets.next(daemon)
    puppet.request({"ignore-stop": True})
    daemon.proc.send_signal(signal.SIGINT)
    wait_stopping(runtime_dir)
    assert f"stopping pid {puppet.pid} (SIGKILL in 300 s; Ctrl-C again to kill now)" in daemon.stderr()
    assert daemon.proc.poll() is None
    daemon.proc.send_signal(signal.SIGINT)
    assert puppet.exited()
    assert daemon.proc.wait(20) == 0, daemon.stderr()
    assert f"service: pid {puppet.pid} ended (killed by SIGKILL)" in daemon.stderr()
    assert not os.path.exists(control_path(runtime_dir))


# -- a real LISTEN_FDS server ---------------------------------------------------------------

class Requests(threading.Thread):
    """An HTTP client that keeps requesting, one connection per request."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.served_by: list[int] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.start()

    def run(self):
        while not self.stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
                conn.close()
                assert response.status == 200, response.status
                pid = int(body.split()[-1])
            except Exception as exc:  # counted: the test asserts there is none
                with self.progress:
                    self.failures.append(repr(exc))
                    self.progress.notify_all()
                continue
            with self.progress:
                self.served_by.append(pid)
                self.progress.notify_all()

    def seen(self) -> set:
        with self.progress:
            return set(self.served_by)

    def wait_served_by_other_than(self, pids: set, timeout: float = 30.0) -> int:
        with self.progress:
            self.progress.wait_for(lambda: self.failures or set(self.served_by) - pids, timeout)
            assert not self.failures, self.failures
            new = set(self.served_by) - pids
            assert new, f"no request served by a new worker within {timeout} s"
            return new.pop()


@pytest.mark.timeout(120)
def test_gunicorn_serves_every_request_through_restarts_on_the_listener_fdmig_holds(daemons, runtime_dir):
    gunicorn_config = pytest.importorskip("gunicorn.config")
    port = free_port()
    # gunicorn/systemd.py reads LISTEN_FDS/LISTEN_PID itself; with them no --bind is used.
    command = [sys.executable, "-m", "gunicorn", "--workers", "2", "--graceful-timeout", "10"]
    if hasattr(gunicorn_config, "ControlSocketDisable"):  # gunicorn >= 25 would bind ~/.gunicorn/gunicorn.ctl
        command.append("--no-control-socket")
    start_run(daemons, "--notify", "--chardev", f"id=http,host=127.0.0.1,port={port},server=on",
              command=command + ["tests.services.wsgi_app:app"])
    client = Requests(port)
    try:
        workers = {client.wait_served_by_other_than(set())}
        for _ in range(2):
            before = client.seen()
            result = restart()
            assert result.returncode == 0, result.stderr
            workers.add(client.wait_served_by_other_than(before))  # a worker of the new gunicorn
    finally:
        client.stop.set()
        client.join(30)
    assert not client.failures, client.failures
    assert len(workers) == 3 and len(client.served_by) > 3


# ----- live migration of a `run` instance ---------------------------------------------


@pytest.mark.timeout(90)
def test_a_run_instance_migrates_live_with_its_store_and_the_new_holder_supervises_and_restarts_the_service(
        daemons, runtime_dir, short_dir, last_instance):
    path = os.path.join(short_dir, "app.sock")
    start_run(daemons, "--notify", "--restart", "on-failure", "--capability", "local-char-socket",
              "--chardev", f"id=app,path={path},server=on", command=STORE_ECHO)
    streams = [Stream(connect_unix(path)), Stream(connect_unix(path))]
    for stream in streams:
        stream.wait_echoed(1)
    before = wait_status(runtime_dir, lambda s: len(s["stored"]) == 2, "both connections stored")
    service_pid = before["service"]["pid"]

    moved = run("migrate-out", "--name", "web", "--spawn", "--json", timeout=60)
    assert moved.returncode == 0, moved.stderr
    after = status_of(control_path(runtime_dir))
    assert after["pid"] != before["pid"]  # a new holder ...
    assert after["service"]["pid"] == service_pid and after["service"]["ready"]  # ... of the same running service
    assert sorted(e["name"] for e in after["stored"]) == ["conn-1", "conn-2"]
    assert [c["state"] for c in after["chardevs"]] == ["listening"]
    for stream in streams:
        stream.wait_echoed(stream.sent + 1)
    late = Stream(connect_unix(path))  # the moved listener: the service still accepts on it
    late.wait_echoed(1)
    wait_status(runtime_dir, lambda s: len(s["stored"]) == 3, "the new connection stored on the new holder")

    restarted = restart()  # on the new holder, with the store that moved
    assert restarted.returncode == 0, restarted.stderr
    for stream in streams + [late]:
        stream.wait_echoed(stream.sent + 1)
    assert all(stream.finish() > 0 for stream in streams + [late])  # every record once, in order

    # And its crash is seen there too. Nothing in flight (a crash loses what the
    # service had read and not yet answered): one peer in lockstep.
    quiet = connect_unix(path)
    lockstep(quiet, b"before the crash")
    wait_status(runtime_dir, lambda s: "conn-4" in [e["name"] for e in s["stored"]], "the quiet peer stored")
    os.kill(service_of(runtime_dir)["pid"], signal.SIGKILL)
    wait_status(runtime_dir, lambda s: s["service"]["restarts"] == 2 and s["service"]["ready"],
                "the service started again by the new holder")
    lockstep(quiet, b"after the crash")
    quiet.close()


def test_a_run_instance_is_not_migrated_with_the_capability_off(daemons, runtime_dir, short_dir):
    path = os.path.join(short_dir, "app.sock")
    start_run(daemons, "--notify", "--chardev", f"id=app,path={path},server=on", command=STORE_ECHO)
    refused = run("migrate-out", "--name", "web", "--timeout", "5")
    assert refused.returncode == 1
    assert "service, its notify socket and its fd store can only move live" in refused.stderr
    assert service_of(runtime_dir)["state"] == "running"
