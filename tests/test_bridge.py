"""Bridges are proxies (DESIGN "Bridges are proxies"): one backend session per
client, half-close forwarded both ways after every byte before it, loss of one
side ends the other after what can be delivered, with a log line that counts what
could not be; all of it through live migrations too. The backend is the test
itself (a listener it accepts on), socat, or a process it kills."""

import hashlib
import os
import select
import socket
import subprocess
import sys

import pytest

from tests.helpers import Pump, connect_unix, needs, recv_exactly, run, status_of, wait_states

MARK = "support-local-migration=on"


def recv_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError as exc:
            print("RESET", exc, len(chunks))
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def proxy(daemons, short_dir, runtime_dir, last_instance):
    """A bridge from a server chardev (`front`, for clients) to a client chardev
    (`back`), and the test's own listener as the backend; both sides marked."""
    front, back = f"{short_dir}/front.sock", f"{short_dir}/back.sock"
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.bind(back)
    backend.listen(8)
    backend.settimeout(10)
    daemon = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", f"socket,id=front,path={front},server=on,{MARK},bridge=back",
                     "--chardev", f"socket,id=back,path={back},{MARK}")
    yield daemon, front, backend
    backend.close()


def accept(backend: socket.socket) -> socket.socket:
    conn, _ = backend.accept()
    conn.settimeout(10)
    return conn


def migrate() -> None:
    result = run("migrate-out", "--name", "web", "--spawn", "--timeout", "20")
    assert result.returncode == 0, result.stderr


def test_the_backend_side_connects_only_for_a_client_and_each_client_gets_its_own_session(proxy, runtime_dir):
    _, front, backend = proxy
    states = {c["label"]: c["state"] for c in status_of(f"{runtime_dir}/web.sock")["chardevs"]}
    assert states == {"front": "listening", "back": "disconnected"}
    backend.settimeout(0.2)
    with pytest.raises(socket.timeout):
        backend.accept()  # no client yet: no backend session either
    backend.settimeout(10)
    seen = []
    for n in range(3):
        client = connect_unix(front)
        client.sendall(b"request %d" % n)
        client.shutdown(socket.SHUT_WR)
        session = accept(backend)
        assert recv_to_eof(session) == b"request %d" % n  # this client's bytes, then its EOF
        session.sendall(b"reply %d" % n)
        session.close()
        assert recv_to_eof(client) == b"reply %d" % n
        client.close()
        seen.append(session)
    assert len(seen) == 3


@pytest.mark.parametrize("migrating", [False, True], ids=["", "through-a-migration"])
def test_successive_clients_with_replies_in_flight_never_share_a_session(proxy, migrating):
    _, front, backend = proxy
    first = connect_unix(front)
    first.sendall(b"first request")
    first.shutdown(socket.SHUT_WR)
    session_one = accept(backend)
    assert recv_to_eof(session_one) == b"first request"
    second = connect_unix(front)  # waits in the backlog: the first session is not over
    second.sendall(b"second request")
    second.shutdown(socket.SHUT_WR)
    backend.settimeout(0.3)
    with pytest.raises(socket.timeout):
        backend.accept()  # no second backend session while the first one's reply is due
    backend.settimeout(10)
    if migrating:
        migrate()  # the first session half-closed, the second client in the backlog
    reply = os.urandom(3 << 20)
    writer = Pump(session_one.sendall, reply)
    assert sha(recv_exactly(first, len(reply))) == sha(reply)
    writer.join()
    session_one.close()
    assert first.recv(1) == b""
    session_two = accept(backend)
    assert recv_to_eof(session_two) == b"second request"  # not one byte of the first session
    session_two.sendall(b"second reply")
    session_two.close()
    assert recv_to_eof(second) == b"second reply"


@pytest.mark.parametrize("migrating", [False, True], ids=["", "through-a-migration"])
def test_a_clients_half_close_reaches_the_backend_after_every_byte_and_the_reply_still_comes_back(
        proxy, migrating):
    _, front, backend = proxy
    client = connect_unix(front)
    request = os.urandom(16 << 20)
    sender = Pump(lambda: (client.sendall(request), client.shutdown(socket.SHUT_WR)))
    session = accept(backend)
    assert sha(recv_to_eof(session)) == sha(request)
    sender.join()
    if migrating:
        migrate()  # the half-closed session moves as it is
    reply = os.urandom(16 << 20)
    writer = Pump(lambda: (session.sendall(reply), session.shutdown(socket.SHUT_WR)))
    assert sha(recv_to_eof(client)) == sha(reply)
    writer.join()
    assert session.recv(1) == b"", "the session was not closed once both directions were done"


@pytest.mark.parametrize("migrating", [False, True], ids=["", "through-a-migration"])
def test_a_backends_half_close_reaches_the_client_and_the_client_goes_on_sending(proxy, migrating):
    _, front, backend = proxy
    client = connect_unix(front)
    client.sendall(b"hello")
    session = accept(backend)
    assert recv_exactly(session, 5) == b"hello"
    banner = os.urandom(4 << 20)
    writer = Pump(lambda: (session.sendall(banner), session.shutdown(socket.SHUT_WR)))
    assert sha(recv_to_eof(client)) == sha(banner)
    writer.join()
    if migrating:
        migrate()
    upload = os.urandom(8 << 20)
    sender = Pump(lambda: (client.sendall(upload), client.shutdown(socket.SHUT_WR)))
    assert sha(recv_to_eof(session)) == sha(upload)
    sender.join()
    assert client.recv(1) == b""


@pytest.fixture
def socat_echo(short_dir):
    """socat as a real echo backend, one cat per connection."""
    path = f"{short_dir}/echo.sock"
    proc = subprocess.Popen(["socat", f"UNIX-LISTEN:{path},fork", "EXEC:cat"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tests.helpers import connect_when_bound
    connect_when_bound(path).close()  # socat forks a cat for this probe and drops it
    yield path
    proc.kill()
    proc.wait()


@needs("socat")
@pytest.mark.parametrize("migrating", [False, True], ids=["", "through-a-migration"])
def test_64_mib_through_a_bridge_to_socat_echo_and_half_closed_come_back_whole(
        daemons, short_dir, socat_echo, last_instance, migrating):
    front = f"{short_dir}/front.sock"
    daemons("serve", "--name", "web", "--capability", "local-char-socket",
            "--chardev", f"socket,id=front,path={front},server=on,{MARK},bridge=back",
            "--chardev", f"socket,id=back,path={socat_echo},{MARK}")
    client = connect_unix(front, timeout=60)
    data = os.urandom(64 << 20)
    half = len(data) // 2

    def send():
        client.sendall(data[:half])
        if migrating:
            migrate()
        client.sendall(data[half:])
        client.shutdown(socket.SHUT_WR)

    sender = Pump(send)
    got = recv_to_eof(client)
    sender.join(timeout=60)
    assert len(got) == len(data) and sha(got) == sha(data)


@pytest.mark.parametrize("migrating", [False, True], ids=["", "after-a-migration"])
def test_a_backend_killed_mid_stream_ends_the_client_after_what_it_could_deliver_and_says_how_much_was_lost(
        daemons, short_dir, runtime_dir, last_instance, migrating):
    from tests.helpers import free_port
    port = free_port()
    backend_code = (
        "import socket, sys, threading\n"
        "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
        "print('ready', flush=True)\n"
        "def echo(c):\n"
        "    while (d := c.recv(65536)):\n"
        "        c.sendall(d)\n"
        "while True:\n"
        "    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()\n")

    def start_backend():
        proc = subprocess.Popen([sys.executable, "-c", backend_code, str(port)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        return proc

    backend = start_backend()
    front = f"{short_dir}/front.sock"
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", f"socket,id=front,path={front},server=on,{MARK},bridge=back",
                     "--chardev", f"socket,id=back,host=127.0.0.1,port={port},{MARK}")
    holder = source
    if migrating:
        holder = daemons("migrate-in", "--name", "web", ready=False)
        assert run("migrate-out", "--name", "web").returncode == 0
        holder.wait_ready()
    client = connect_unix(front)
    assert client.sendall(b"before") is None and recv_exactly(client, 6) == b"before"
    # The client sends and does not read: the echoes back up until the proxy holds
    # bytes both ways, those for the backend among them, when the backend dies.
    # 32 MiB of numbered records: more than every buffer on the way can hold. (At 16 MiB
    # the test was flaky: loopback TCP autotuning can buffer some 20 MiB on this path.)
    data = b"".join(b"%015d\n" % n for n in range(2 << 20))
    view, sent = memoryview(data), 0
    client.setblocking(False)
    while sent < len(data):
        try:
            sent += client.send(view[sent:sent + 65536])
        except BlockingIOError:
            if not select.select([], [client], [], 1.0)[1]:
                break  # nothing drained for a second: every buffer on the way is full
    assert sent < len(data), "the proxy never held the client back"
    client.setblocking(True)
    client.settimeout(10)
    backend.kill()
    backend.wait()
    got = recv_to_eof(client)
    # What came back is a prefix of what was sent, whole records in order: no splice, no gap.
    assert 0 < len(got) < sent and got == data[: len(got)]
    log = holder.stderr()
    assert "bridge back-front: back lost" in log and "could not be delivered" in log, log[-3000:]
    wait_states(f"{runtime_dir}/web.sock", {"front": "listening", "back": "disconnected"})

    backend = start_backend()  # back again: the next client gets a session of its own
    try:
        again = connect_unix(front)
        assert again.sendall(b"fresh") is None and recv_exactly(again, 5) == b"fresh"
        again.close()
    finally:
        backend.kill()
        backend.wait()


def test_two_listening_sides_pair_one_peer_each_and_a_lost_side_ends_the_other(daemons, short_dir, runtime_dir):
    a_path, b_path = f"{short_dir}/a.sock", f"{short_dir}/b.sock"
    daemon = daemons("serve", "--chardev", f"socket,id=a,path={a_path},server=on,bridge=b",
                     "--chardev", f"socket,id=b,path={b_path},server=on")
    a, b = connect_unix(a_path), connect_unix(b_path)
    wait_states(f"{runtime_dir}/default.sock", {"a": "connected", "b": "connected"})
    a.sendall(b"to b")
    assert recv_exactly(b, 4) == b"to b"
    b.close()  # b's peer vanishes: a's peer is closed too, never handed another b peer
    assert recv_to_eof(a) == b""
    wait_states(f"{runtime_dir}/default.sock", {"a": "listening", "b": "listening"})
    a2, b2 = connect_unix(a_path), connect_unix(b_path)
    b2.sendall(b"new")
    assert recv_exactly(a2, 3) == b"new"
    assert daemon.proc.poll() is None


def _pipes_of(pid: int) -> int:
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:") for fd in os.listdir(f"/proc/{pid}/fd"))


def test_a_bridge_moves_bytes_through_a_kernel_pipe_and_a_migration_carries_what_the_pipe_held(
        proxy, runtime_dir):
    """splice(2): a bridge's bytes go from one socket to the other through a pipe,
    never through the instance. A backend that stops reading leaves them in that
    pipe; a migration then carries them, and they arrive once, in order."""
    daemon, front, backend = proxy
    pipes_before = _pipes_of(daemon.pid)
    client = connect_unix(front)
    session = accept(backend)
    client.sendall(b"first")
    assert recv_exactly(session, 5) == b"first"
    assert _pipes_of(daemon.pid) == pipes_before + 2  # the back side's pipe, both ends
    # The backend reads nothing now: its socket fills, then the pipe behind it, then
    # the client's socket (the instance stops reading at its high-water mark).
    data = os.urandom(3 << 20)
    client.setblocking(False)
    sent = 0
    while True:
        ready = select.select([], [client], [], 0.5)[1]
        if not ready:
            break
        try:
            sent += client.send(data[sent:sent + 65536])
        except BlockingIOError:
            continue
        if sent == len(data):
            break
    before = status_of(f"{runtime_dir}/web.sock")
    front_rx = next(c["rx-bytes"] for c in before["chardevs"] if c["label"] == "front")
    back_tx = next(c["tx-bytes"] for c in before["chardevs"] if c["label"] == "back")
    assert front_rx - back_tx > 64 * 1024, "no bytes were waiting in the instance's pipe"
    migrate()
    client.setblocking(True)

    def send_the_rest():
        client.sendall(data[sent:])
        client.shutdown(socket.SHUT_WR)
    import threading
    writer = threading.Thread(target=send_the_rest, daemon=True)
    writer.start()
    assert sha(recv_exactly(session, len(data))) == sha(data)
    writer.join(10)
