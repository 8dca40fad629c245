"""systemd's protocols for real: readiness through a NOTIFY_SOCKET, socket
activation in (systemd-socket-activate in front of fdmig) and out (migrate-in
--exec hands live connections to a program that speaks LISTEN_FDS)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from fdmig.demo import Peer
from tests.helpers import FDMIG, Notify, connect_unix, connect_when_bound, needs, recv_exactly, run

ECHO = "socket,id=app,path={path},server=on,frontend=echo,support-local-migration=on"


def as_fd3(sock: socket.socket) -> dict:
    """Popen arguments that give the child `sock` as its fd 3, as a service manager
    would. (pass_fds keeps an fd at its own number; close_fds would close fd 3.)"""
    return {"close_fds": False, "preexec_fn": lambda: os.dup2(sock.fileno(), 3)}


def test_wait_on_reports_ready_only_once_the_first_peer_is_connected(daemons, short_dir):
    path = os.path.join(short_dir, "w.sock")
    daemon = daemons("serve", "--chardev", f"socket,id=app,path={path},server=on,wait=on,frontend=echo",
                     ready=False)
    daemon.notify.wait_for("STATUS", "waiting for the first peer of 1 chardev(s)")
    assert not any("READY" in m for m in daemon.notify.messages)
    sock = connect_unix(path)
    daemon.wait_ready()
    sock.sendall(b"ok")
    assert recv_exactly(sock, 2) == b"ok"


def test_status_and_stopping_are_notified(daemons, short_dir):
    path = os.path.join(short_dir, "s.sock")
    daemon = daemons("serve", "--chardev", f"socket,id=app,path={path},server=on")
    connect_unix(path)
    daemon.notify.wait_for("STATUS", "running: 1 connected")
    assert daemon.stop() == 0
    daemon.notify.wait_for("STOPPING", "1")


@needs("systemd-socket-activate")
def test_systemd_socket_activation_hands_a_listener_to_serve(runtime_dir, short_dir):
    path = os.path.join(short_dir, "act.sock")
    notify = Notify(short_dir)
    activator = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "--fdname=web", "-E", "FDMIG_RUNTIME_DIR",
         "-E", f"NOTIFY_SOCKET={notify.path}", *FDMIG, "serve",
         "--chardev", "socket,id=app,fdname=web,server=on,frontend=echo"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sock = connect_when_bound(path, alive=lambda: activator.poll() is None)
        sock.sendall(b"activated")  # this first connection starts fdmig
        assert recv_exactly(sock, 9) == b"activated"
        notify.wait_for("READY", "1")
        state = json.loads(run("status", "--json").stdout)
        app = state["chardevs"][0]
        assert app["address"] == "fdname:web" and app["state"] == "connected"
    finally:
        activator.terminate()
        activator.wait(10)
        notify.close()


def test_listen_pid_of_another_process_is_not_adopted(runtime_dir, short_dir):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(short_dir, "l.sock"))
    listener.listen()
    result = subprocess.run(
        FDMIG + ["serve", "--chardev", "socket,id=app,fdname=web,server=on"],
        env=dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="web"),
        capture_output=True, text=True, timeout=20, **as_fd3(listener))
    assert result.returncode == 1
    assert "no socket-activation fd named 'web'" in result.stderr


def test_inherited_fd_of_the_wrong_type_is_refused(runtime_dir):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    result = subprocess.run(FDMIG + ["serve", "--chardev", "socket,id=app,fd=3,server=on"],
                            capture_output=True, text=True, timeout=20, **as_fd3(udp))
    assert result.returncode == 1
    assert result.stderr == "fdmig: chardev app: fd 3 is not a stream socket; accepted: SOCK_STREAM\n"


def test_inherited_connected_fd_is_adopted_as_a_client(runtime_dir):
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(FDMIG + ["serve", "--chardev", "socket,id=app,fd=3,frontend=echo"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_fd3(theirs))
    theirs.close()
    try:
        ours.settimeout(20)
        ours.sendall(b"adopted")
        assert recv_exactly(ours, 7) == b"adopted"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


ACTIVATED_PROGRAM = textwrap.dedent("""
    import os, socket, sys
    assert int(os.environ["LISTEN_PID"]) == os.getpid()
    names = os.environ["LISTEN_FDNAMES"].split(":")
    assert int(os.environ["LISTEN_FDS"]) == len(names)
    with open(sys.argv[1], "w") as report:
        report.write(" ".join(names))
    conn = socket.socket(fileno=3 + names.index("app"))
    assert conn.getblocking()
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
""")


def test_migrate_in_exec_hands_a_live_connection_to_a_program(daemons, short_dir):
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", ECHO.format(path=path))
    peer = Peer(path)
    peer.start()
    program = os.path.join(short_dir, "prog.py")
    report = os.path.join(short_dir, "report")
    with open(program, "w") as f:
        f.write(ACTIVATED_PROGRAM)
    target = daemons("migrate-in", "--name", "web", "--exec", "--", sys.executable, program, report,
                     ready=False)
    result = run("migrate-out", "--name", "web", "--json")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["target-pid"] == target.pid
    target.notify.wait_for("MAINPID", str(target.pid))
    assert source.proc.wait(10) == 0
    peer.finish()
    assert peer.bad is None and not peer.eof and peer.echoed == peer.sent > 0
    with open(report) as f:
        assert f.read() == "app app.listener"
    target.proc.terminate()


def test_spawned_target_notifies_mainpid_and_ready(daemons, short_dir):
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", ECHO.format(path=path))
    sock = connect_unix(path)
    result = run("migrate-out", "--name", "web", "--spawn", "--json",
                 env=dict(os.environ, NOTIFY_SOCKET=source.notify.path))
    assert result.returncode == 0, result.stderr
    target_pid = json.loads(result.stdout)["target-pid"]
    # The source names its successor at the commit; the target then says it is ready.
    handover = source.notify.messages.index(source.notify.wait_for("MAINPID", str(target_pid)))
    source.notify.wait_for("READY", "1", after=handover + 1)
    sock.sendall(b"same peer")
    assert recv_exactly(sock, 9) == b"same peer"
    os.kill(target_pid, 15)
