"""--fdstore: a holder keeps a copy of its chardevs' fds in its own manager's fd
store and takes them up again at start, so that a holder killed outright (SIGKILL)
and started again by its manager serves every connection again. The manager here
is an outer `fdmig run`; systemd's store speaks the same protocol."""

import os
import select
import signal
import socket
import subprocess
import sys
import termios
import tty

import pytest

from tests.helpers import (connect_unix, connect_when_bound, needs, read_exactly_fd, recv_exactly, run, status_of,
                           wait_states, wait_status)

FDMIG = [sys.executable, "-m", "fdmig"]


def nested(daemons, short_dir, *chardevs, restart="on-failure"):
    """An outer `fdmig run` whose service is `fdmig serve --fdstore --name inner`."""
    args = ["serve", "--name", "inner", "--fdstore"]
    for spec in chardevs:
        args += ["--chardev", spec]
    return daemons("run", "--name", "outer", "--notify", "--restart", restart, "--", *FDMIG, *args)


def inner_pid(runtime_dir) -> int:
    return status_of(f"{runtime_dir}/inner.sock")["pid"]


def stored_names(runtime_dir) -> list[str]:
    return [entry["name"] for entry in status_of(f"{runtime_dir}/outer.sock")["stored"]]


def wait_outer(runtime_dir, predicate, what: str, timeout: float = 20.0) -> dict:
    return wait_status(f"{runtime_dir}/outer.sock", predicate, what, timeout)


@pytest.mark.timeout(60)
def test_a_holder_killed_with_sigkill_serves_every_connection_again_and_its_hold_peers_see_no_eof(
        daemons, short_dir, runtime_dir):
    held_path, echo_path = f"{short_dir}/held.sock", f"{short_dir}/echo.sock"
    outer = nested(daemons, short_dir, f"id=held,path={held_path},server=on",
                   f"id=echo,path={echo_path},server=on,frontend=echo")
    held, echo = connect_unix(held_path), connect_unix(echo_path)
    held.sendall(b"kept unread")
    assert echo.sendall(b"one") is None and recv_exactly(echo, 3) == b"one"
    wait_outer(runtime_dir, lambda s: sorted(n for n in (e["name"] for e in s["stored"])) ==
               ["echo", "echo.listener", "held", "held.listener"], "the four fds stored")
    first = inner_pid(runtime_dir)

    os.kill(first, signal.SIGKILL)
    status = wait_outer(runtime_dir, lambda s: s["service"]["restarts"] == 1 and s["service"]["ready"],
                        "the inner holder started again and ready")
    assert status["service"]["pid"] != first
    states = wait_states(f"{runtime_dir}/inner.sock", {"held": "connected", "echo": "connected"})
    assert states == {"held": "connected", "echo": "connected"}
    # The held peer never saw EOF, and its unread bytes are still there for whoever reads.
    assert select.select([held], [], [], 0)[0] == []
    assert echo.sendall(b"two") is None and recv_exactly(echo, 3) == b"two"
    row = {r["label"]: r for r in status_of(f"{runtime_dir}/inner.sock")["chardevs"]}["held"]
    assert row["peer-pid"] == os.getpid()
    assert "took up its connection" in outer.stderr()
    # And a new peer is taken by the listener it took up again.
    again = connect_unix(held_path)
    wait_states(f"{runtime_dir}/inner.sock", {"held": "connected"})
    again.close()
    for sock in (held, echo):
        sock.close()


@pytest.mark.timeout(60)
def test_a_pty_and_a_udp_socket_outlive_a_holder_killed_outright(daemons, short_dir, runtime_dir):
    """A console's program never sees its holder die: the pty's master waits in the
    manager's store, and the holder started again takes it up at the same path;
    a udp port stays bound, what waits in it read by the new holder."""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the one peer a connected udp socket hears
    peer.bind(("127.0.0.1", 0))
    outer = nested(daemons, short_dir, "pty,id=con,frontend=echo",
                   f"udp,id=dns,host=127.0.0.1,port={peer.getsockname()[1]},frontend=sink")
    wait_outer(runtime_dir, lambda s: sorted(e["name"] for e in s["stored"]) == ["con", "dns"], "both fds stored")
    rows = {r["label"]: r for r in status_of(f"{runtime_dir}/inner.sock")["chardevs"]}
    slave = rows["con"]["address"].removeprefix("pty:")
    port = int(rows["dns"]["address"].rsplit(":", 1)[1])
    far = os.open(slave, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(far, termios.TCSANOW)  # as a serial console's program makes its line
    try:
        os.write(far, b"one\n")
        assert read_exactly_fd(far, 4) == b"one\n"
        first = inner_pid(runtime_dir)
        os.kill(first, signal.SIGKILL)
        peer.sendto(b"while it was down", ("127.0.0.1", port))  # no ICMP: the port is held in the store
        wait_outer(runtime_dir, lambda s: s["service"]["restarts"] == 1 and s["service"]["ready"],
                   "the inner holder started again and ready")
        rows = {r["label"]: r for r in status_of(f"{runtime_dir}/inner.sock")["chardevs"]}
        assert rows["con"]["address"] == f"pty:{slave}" and rows["con"]["state"] == "connected"
        assert rows["dns"]["address"].endswith(f":{port}")
        wait_status(f"{runtime_dir}/inner.sock",
                    lambda s: {r["label"]: r for r in s["chardevs"]}["dns"]["rx-bytes"] == 17,
                    "the datagram sent while no holder ran, read by the new one")
        # The line never hung up: the far end reads on, and is answered by the new holder.
        assert not select.select([far], [], [], 0)[0]
        os.write(far, b"two\n")
        assert read_exactly_fd(far, 4) == b"two\n"
        assert "took up its /dev/pts/" in outer.stderr()
    finally:
        os.close(far)
        peer.close()


@pytest.mark.timeout(60)
def test_a_holder_stopped_gracefully_takes_its_fds_out_of_the_store(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/held.sock"
    nested(daemons, short_dir, f"id=held,path={path},server=on")
    peer = connect_unix(path)
    wait_outer(runtime_dir, lambda s: len(s["stored"]) == 2, "listener and connection stored")
    os.kill(inner_pid(runtime_dir), signal.SIGTERM)
    status = wait_outer(runtime_dir, lambda s: s["service"]["state"] == "exited", "the inner holder exited")
    assert status["stored"] == [] and status["service"]["restarts"] == 0  # exit 0: on-failure does not restart
    peer.settimeout(10)
    assert peer.recv(1) == b""  # its connection closed: nobody holds it any more
    peer.close()


@needs("systemd-socket-activate")
@pytest.mark.timeout(60)
def test_a_stored_fd_that_is_not_what_the_spec_says_is_refused_and_the_chardev_opens_afresh(short_dir, runtime_dir):
    # systemd's own socket activation hands a listener bound elsewhere under the label's name.
    elsewhere, path = f"{short_dir}/elsewhere.sock", f"{short_dir}/held.sock"
    proc = subprocess.Popen(["systemd-socket-activate", "-l", elsewhere, "--fdname=held.listener",
                             "-E", "FDMIG_RUNTIME_DIR", *FDMIG, "serve",
                             "--name", "inner", "--fdstore", "--chardev", f"id=held,path={path},server=on"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        connect_when_bound(elsewhere, alive=lambda: proc.poll() is None).close()  # the activation starts the holder
        waited = run("status", "--name", "inner", "--wait", "held=listening", "--timeout", "20")
        assert waited.returncode == 0, waited.stderr
        connect_unix(path).close()  # its own, fresh listener at its own path
    finally:
        proc.terminate()  # systemd-socket-activate execs the holder: the same process
        proc.wait(20)
    log = proc.stderr.read()
    assert f"is bound to '{elsewhere}', not to {path}; opened afresh instead" in log
