"""One instance, with real processes and real sockets: chardevs and their peers,
frontends, status, the control socket's life cycle and the CLI's exit codes."""

import hashlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import time

import psutil
import pytest

from fdmig import qmp
from tests.helpers import (FDMIG, Pump, as_uid, connect_unix, free_port, listener, needs, read_exactly_fd, recv_exactly,
                           run, run_many, status_of, wait_state, wait_states)

# Also run against the lowest click, rich and psutil pyproject admits (.ci/floor.txt).
pytestmark = pytest.mark.cli


def control_of(runtime_dir: str, name: str = "default") -> str:
    return os.path.join(runtime_dir, f"{name}.sock")


def chardevs_of(control: str) -> dict:
    return {c["label"]: c for c in status_of(control)["chardevs"]}


def keys_of(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from keys_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from keys_of(item)


def chardevs_in(client) -> dict:
    return {c["label"]: c["state"] for c in client.execute("x-fdmig-status")["chardevs"]}


def echo_server(path: str, label: str = "app", extra: str = "") -> str:
    return f"socket,id={label},path={path},server=on,frontend=echo{extra}"


# ----- echo, peers, status ---------------------------------------------------------------


@needs("socat")
def test_echo_round_trip_with_socat_and_status_names_the_peer(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/app.sock"
    daemons("serve", "--chardev", echo_server(path, extra=",support-local-migration=on"))
    socat = subprocess.Popen(["socat", "-", f"UNIX-CONNECT:{path}"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        socat.stdin.write(b"hello socat\n")
        socat.stdin.flush()
        assert read_exactly_fd(socat.stdout.fileno(), 12) == b"hello socat\n"

        result = run("status", "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        app, = status["chardevs"]
        assert app["label"] == "app" and app["role"] == "server" and app["frontend"] == "echo"
        assert app["address"] == f"unix:{path}"
        assert app["state"] == "connected"
        assert (app["rx-bytes"], app["tx-bytes"]) == (12, 12)
        assert app["peer-pid"] == socat.pid
        assert app["peer-process"] == "socat"
        assert app["support-local-migration"] is True and app["local-incoming"] is False
        assert app["connected-since"].endswith("Z")
        assert status["state"] == "running" and status["capabilities"] == {"local-char-socket": False, "x-tcp-repair": False}
        assert status["migration"]["status"] == "none"
        assert not [key for key in keys_of(status) if "_" in key], "keys are kebab-case, as QMP's"

        result = run("status")
        assert f"  pid {socat.pid} (socat)  " in result.stdout  # the peer by pid, not its empty `unix:`

        socat.stdin.close()  # socat shuts down its side; the instance drops the peer
        assert socat.wait(10) == 0
        wait_states(control_of(runtime_dir), {"app": "listening"})
    finally:
        socat.kill()
        socat.wait()


def test_echo_round_trip_with_python_sockets_under_backpressure(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/app.sock"
    daemons("serve", "--chardev", echo_server(path))
    payload = os.urandom(3 << 20)
    with connect_unix(path) as peer:
        peer.sendall(b"x")
        assert peer.recv(1) == b"x"
        sender = Pump(peer.sendall, payload)  # more than every buffer on the way holds
        assert recv_exactly(peer, len(payload)) == payload
        sender.join()
    app = chardevs_of(control_of(runtime_dir))["app"]
    assert app["rx-bytes"] == app["tx-bytes"] == len(payload) + 1


def test_plain_status_in_a_pipe_prints_a_header_and_one_row_per_chardev(daemons, short_dir):
    daemon = daemons("serve", "--chardev", echo_server(f"{short_dir}/a.sock", "first"),
                     "--chardev", f"socket,id=second,path={short_dir}/b.sock,server=on,frontend=sink")
    result = run("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"instance default  pid {daemon.pid}  state running")
    assert "rss" in lines[0] and "open fds" in lines[0]
    assert lines[1].startswith("capabilities: none") and "last migration: none" in lines[1]
    assert lines[2].split() == ["LABEL", "ADDRESS", "ROLE", "STATE", "MARKS", "FRONTEND", "FD", "PEER",
                                "RX", "TX", "SINCE"]
    rows = [line.split() for line in lines[3:]]
    assert [row[:4] for row in rows] == [["first", f"unix:{short_dir}/a.sock", "server", "listening"],
                                         ["second", f"unix:{short_dir}/b.sock", "server", "listening"]]
    assert len(lines) == 5


def test_a_server_serves_one_peer_at_a_time_and_the_next_once_the_first_leaves(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/app.sock"
    daemons("serve", "--chardev", echo_server(path))
    first = connect_unix(path)
    first.sendall(b"one")
    assert recv_exactly(first, 3) == b"one"
    second = connect_unix(path)  # the kernel queues it; the instance does not accept it yet
    second.sendall(b"two")
    first.sendall(b"again")  # a full round trip on the loop after `two` was queued
    assert recv_exactly(first, 5) == b"again"
    second.setblocking(False)
    with pytest.raises(BlockingIOError):
        second.recv(3)
    second.settimeout(10)
    app = chardevs_of(control_of(runtime_dir))["app"]
    assert app["rx-bytes"] == 8
    first.close()
    assert recv_exactly(second, 3) == b"two"
    second.close()


# Regression: a held fd with unread bytes stopped being watched, so its peer's hangup went unseen.
def test_a_hold_server_notices_a_peer_that_sent_bytes_and_left_and_serves_the_next(daemons, short_dir,
                                                                                   runtime_dir):
    path = f"{short_dir}/app.sock"
    daemons("serve", "--chardev", f"socket,id=app,path={path},server=on")
    with qmp.connect(control_of(runtime_dir)) as client:  # events only: a status query would mask it
        def next_state():
            return client.wait_event({"X_FDMIG_CHARDEV_STATE"}, time.monotonic() + 2)["data"]["state"]
        first = connect_unix(path)
        assert next_state() == "connected"
        first.sendall(b"unread bytes")
        first.close()
        second = connect_unix(path)
        assert [next_state(), next_state()] == ["listening", "connected"]
        second.close()


def test_wait_on_holds_back_ready_until_the_first_peer(daemons, short_dir):
    path = f"{short_dir}/app.sock"
    daemon = daemons("serve", "--chardev", echo_server(path, extra=",wait=on"), ready=False)
    daemon.notify.wait_for("STATUS", "waiting for the first peer of 1 chardev(s)")
    assert not any("READY" in m for m in daemon.notify.messages)
    with connect_unix(path) as peer:
        daemon.wait_ready()
        peer.sendall(b"hi")
        assert recv_exactly(peer, 2) == b"hi"


def test_peers_and_chardevs_coming_and_going_leak_no_descriptors(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/app.sock"
    daemon = daemons("serve", "--chardev", echo_server(path))
    control = control_of(runtime_dir)
    process = psutil.Process(daemon.pid)
    with qmp.connect(control) as client:
        client.execute("x-fdmig-status")
        baseline = process.num_fds()
        for i in range(30):
            with connect_unix(path) as peer:
                peer.sendall(b"x")
                assert recv_exactly(peer, 1) == b"x"
            extra = f"{short_dir}/extra{i % 3}.sock"
            client.execute("chardev-add", {"id": f"extra{i}", "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": extra}}, "server": True}}})
            client.execute("chardev-add", {"id": f"retry{i}", "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": f"{short_dir}/nobody.sock"}}, "reconnect-ms": 1}}})
            client.execute("chardev-remove", {"id": f"retry{i}"})
            client.execute("chardev-remove", {"id": f"extra{i}"})
            assert not os.path.exists(extra)
        while chardevs_in(client)["app"] != "listening":  # the last peer's hangup
            client.wait_event({"X_FDMIG_CHARDEV_STATE"}, time.monotonic() + 10)
        assert process.num_fds() == baseline
        assert list(chardevs_in(client)) == ["app"]


# ----- client chardevs ---------------------------------------------------------------------


def test_attach_connects_a_client_and_detach_gives_its_peer_eof(daemons, short_dir, runtime_dir):
    daemons("serve")
    path = f"{short_dir}/up.sock"
    with listener(path) as server:
        result = run("attach", f"socket,id=up,path={path}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"attached up: client unix:{path} (connected)"
        conn, _ = server.accept()
        conn.settimeout(10)
        up = chardevs_of(control_of(runtime_dir))["up"]
        assert (up["role"], up["state"], up["peer-pid"]) == ("client", "connected", os.getpid())
        assert up["peer"] == f"unix:{path}"
        result = run("detach", "up")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "detached up"
        assert conn.recv(1) == b""
        conn.close()
    assert chardevs_of(control_of(runtime_dir)) == {}


def test_a_client_with_reconnect_ms_reconnects_after_its_peer_drops_it(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/up.sock"
    with listener(path) as server:
        daemons("serve", "--chardev", f"socket,id=up,path={path},reconnect-ms=20,frontend=echo")
        first, _ = server.accept()
        with qmp.connect(control_of(runtime_dir)) as client:
            first.close()
            states = []
            while states[-1:] != ["connected"]:
                event = client.wait_event({"X_FDMIG_CHARDEV_STATE"}, None)
                if event["data"]["label"] == "up":
                    states.append(event["data"]["state"])
        assert states == ["connecting", "connected"]
        second, _ = server.accept()  # a new connection, not the old one
        second.settimeout(10)
        second.sendall(b"back")
        assert recv_exactly(second, 4) == b"back"
        second.close()


def test_a_client_with_reconnect_ms_waits_for_a_server_that_is_not_there_yet(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/up.sock"
    daemons("serve", "--chardev", f"socket,id=up,path={path},reconnect-ms=20")
    assert chardevs_of(control_of(runtime_dir))["up"]["state"] == "connecting"
    with listener(path) as server:
        conn, _ = server.accept()
        wait_states(control_of(runtime_dir), {"up": "connected"})
        conn.close()


def test_a_client_without_reconnect_ms_goes_disconnected(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/up.sock"
    with listener(path) as server:
        daemons("serve", "--chardev", f"socket,id=up,path={path}")
        conn, _ = server.accept()
        conn.close()
        wait_state("up", "disconnected", timeout=10)
        up = chardevs_of(control_of(runtime_dir))["up"]
        assert (up["fd"], up["peer"]) == (None, None)


# ----- TCP ----------------------------------------------------------------------------------


def test_tcp_servers_echo_on_ipv4_and_ipv6(daemons, runtime_dir):
    port4, port6 = free_port("127.0.0.1"), free_port("::1")
    daemons("serve", "--chardev", f"socket,id=v4,host=127.0.0.1,port={port4},server=on,frontend=echo",
            "--chardev", f"socket,id=v6,host=::1,port={port6},server=on,frontend=echo,nodelay=on")
    for host, port in (("127.0.0.1", port4), ("::1", port6)):
        with socket.create_connection((host, port), timeout=10) as peer:
            peer.sendall(b"tcp " + host.encode())
            assert recv_exactly(peer, 4 + len(host)) == b"tcp " + host.encode()
            mine = peer.getsockname()[1]
            chardevs = chardevs_of(control_of(runtime_dir))
            label = "v6" if ":" in host else "v4"
            expected_peer = f"tcp:[{host}]:{mine}" if ":" in host else f"tcp:{host}:{mine}"
            assert chardevs[label]["peer"] == expected_peer
            assert chardevs[label]["state"] == "connected"
    assert chardevs["v6"]["address"] == f"tcp:[::1]:{port6}"


def test_tcp_clients_connect_on_ipv4_and_ipv6(daemons, runtime_dir):
    servers = {host: socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
               for host in ("127.0.0.1", "::1")}
    try:
        ports = {host: server.getsockname()[1] for host, server in servers.items()}
        daemons("serve", "--chardev", f"socket,id=v4,host=127.0.0.1,port={ports['127.0.0.1']},frontend=echo",
                "--chardev", f"socket,id=v6,host=[::1],port={ports['::1']},frontend=echo")
        conns = []
        for host, server in servers.items():
            server.settimeout(10)
            conn, _ = server.accept()
            conns.append(conn)
            conn.settimeout(10)
            conn.sendall(b"ping")
            assert recv_exactly(conn, 4) == b"ping"
        chardevs = chardevs_of(control_of(runtime_dir))
        assert {c["state"] for c in chardevs.values()} == {"connected"}
        assert chardevs["v6"]["address"] == f"tcp:[::1]:{ports['::1']}"
        assert chardevs["v4"]["peer"] == f"tcp:127.0.0.1:{ports['127.0.0.1']}"
        for conn in conns:
            conn.close()
    finally:
        for server in servers.values():
            server.close()


# ----- frontends ----------------------------------------------------------------------------


def test_sink_counts_bytes_and_sends_nothing(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/sink.sock"
    daemons("serve", "--chardev", f"socket,id=sink,path={path},server=on,frontend=sink")
    with connect_unix(path) as peer:
        peer.sendall(os.urandom(300_000))
        peer.shutdown(socket.SHUT_WR)
        assert peer.recv(1) == b""  # the instance read to EOF, sent nothing, hung up
    wait_states(control_of(runtime_dir), {"sink": "listening"})
    sink = chardevs_of(control_of(runtime_dir))["sink"]
    assert (sink["rx-bytes"], sink["tx-bytes"]) == (300_000, 0)


def bridge_pair(daemons, short_dir, runtime_dir):
    a_path, b_path = f"{short_dir}/a.sock", f"{short_dir}/b.sock"
    daemon = daemons("serve", "--chardev", f"socket,id=a,path={a_path},server=on,bridge=b",
                     "--chardev", f"socket,id=b,path={b_path},server=on")
    a, b = connect_unix(a_path), connect_unix(b_path)
    wait_states(control_of(runtime_dir), {"a": "connected", "b": "connected"})
    return daemon, a, b


def test_bridge_relays_megabytes_both_ways_at_once(daemons, short_dir, runtime_dir):
    _, a, b = bridge_pair(daemons, short_dir, runtime_dir)
    a_data, b_data = os.urandom(4 << 20), os.urandom(3 << 20)
    pumps = [Pump(a.sendall, a_data), Pump(b.sendall, b_data),
             Pump(recv_exactly, a, len(b_data)), Pump(recv_exactly, b, len(a_data))]
    _, _, a_got, b_got = [p.join() for p in pumps]
    assert hashlib.sha256(a_got).digest() == hashlib.sha256(b_data).digest()
    assert hashlib.sha256(b_got).digest() == hashlib.sha256(a_data).digest()
    chardevs = chardevs_of(control_of(runtime_dir))
    assert chardevs["a"]["frontend"] == "bridge=b" and chardevs["b"]["frontend"] == "bridge=a"
    assert (chardevs["a"]["rx-bytes"], chardevs["a"]["tx-bytes"]) == (len(a_data), len(b_data))
    assert (chardevs["b"]["rx-bytes"], chardevs["b"]["tx-bytes"]) == (len(b_data), len(a_data))
    a.close()
    b.close()


def test_bridge_backpressure_stalls_the_writer_and_bounds_the_instances_memory(daemons, short_dir, runtime_dir):
    daemon, a, b = bridge_pair(daemons, short_dir, runtime_dir)
    total = 20 << 20
    data = os.urandom(total)
    process = psutil.Process(daemon.pid)
    rss_before = process.memory_info().rss
    b.setblocking(False)
    sent = 0
    view = memoryview(data)
    while sent < total:  # `a` never reads: b's writes must stall well before 20 MiB
        try:
            sent += b.send(view[sent:sent + 65536])
        except BlockingIOError:
            _, writable, _ = select.select([], [b], [], 1.0)
            if not writable:
                break  # stalled: nothing drained for a second
    assert sent < 4 << 20, f"the writer was never held back: {sent} bytes went in"
    growth = process.memory_info().rss - rss_before
    assert growth < 6 << 20, f"instance RSS grew {growth} bytes while holding a stalled bridge"

    reader = Pump(recv_exactly, a, total)
    b.setblocking(True)
    b.settimeout(20)
    b.sendall(view[sent:])
    assert reader.join() == data
    a.close()
    b.close()


def test_logfile_tees_received_bytes_and_logappend_appends(daemons, short_dir):
    fresh, appended = f"{short_dir}/fresh.log", f"{short_dir}/appended.log"
    for log in (fresh, appended):
        with open(log, "wb") as f:
            f.write(b"old|")
    daemons("serve", "--chardev", echo_server(f"{short_dir}/f.sock", "fresh", f",logfile={fresh}"),
            "--chardev", echo_server(f"{short_dir}/a.sock", "appended", f",logfile={appended},logappend=on"))
    for path in (f"{short_dir}/f.sock", f"{short_dir}/a.sock"):
        with connect_unix(path) as peer:
            for piece in (b"first ", b"second"):
                peer.sendall(piece)
                assert recv_exactly(peer, len(piece)) == piece  # logged before it is echoed
    with open(fresh, "rb") as f:
        assert f.read() == b"first second"
    with open(appended, "rb") as f:
        assert f.read() == b"old|first second"


# ----- the control socket and the life cycle ------------------------------------------------------


def test_runtime_dir_follows_fdmig_runtime_dir_then_xdg_runtime_dir(monkeypatch):
    from fdmig import paths
    monkeypatch.setenv("FDMIG_RUNTIME_DIR", "/x/explicit")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert paths.control_path("web") == "/x/explicit/web.sock"
    assert paths.channel_beside(paths.control_path("web")) == "/x/explicit/web.migrate.sock"
    monkeypatch.delenv("FDMIG_RUNTIME_DIR")
    assert paths.runtime_dir() == "/run/user/7/fdmig"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert paths.runtime_dir() == ("/run/fdmig" if os.geteuid() == 0 else f"/tmp/fdmig-{os.geteuid()}")


def test_serve_with_name_uses_that_control_socket(daemons, runtime_dir):
    daemon = daemons("serve", "--name", "web")
    assert status_of(control_of(runtime_dir, "web"))["name"] == "web"
    result = run("status", "--name", "web", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["pid"] == daemon.pid
    assert run("status", "--name", "other").returncode == 3


def test_runtime_dir_is_0700_and_control_socket_0600(daemons, runtime_dir):
    assert not os.path.exists(runtime_dir)
    daemons("serve")
    assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o700
    control = os.stat(control_of(runtime_dir))
    assert stat.S_ISSOCK(control.st_mode) and stat.S_IMODE(control.st_mode) == 0o600


def test_a_second_serve_on_the_same_name_exits_1_naming_the_pid(daemons, short_dir, runtime_dir):
    daemon = daemons("serve", "--chardev", echo_server(f"{short_dir}/app.sock"))
    result = run("serve", "--chardev", echo_server(f"{short_dir}/other.sock"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"fdmig: an instance already answers at {control_of(runtime_dir)} (pid {daemon.pid}); "
        "stop it, or choose another --name or --control"]
    assert not os.path.exists(f"{short_dir}/other.sock")
    assert status_of(control_of(runtime_dir))["pid"] == daemon.pid  # the first still answers


def test_a_stale_control_socket_is_replaced(daemons, runtime_dir):
    os.makedirs(runtime_dir, mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(control_of(runtime_dir))
    stale.close()
    daemon = daemons("serve")
    assert status_of(control_of(runtime_dir))["pid"] == daemon.pid


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_exits_0_and_removes_the_control_socket_and_chardev_sockets(daemons, short_dir, runtime_dir,
                                                                             signum):
    path = f"{short_dir}/app.sock"
    daemon = daemons("serve", "--chardev", echo_server(path))
    peer = connect_unix(path)
    peer.sendall(b"x")
    assert recv_exactly(peer, 1) == b"x"
    daemon.proc.send_signal(signum)
    assert daemon.proc.wait(10) == 0
    assert peer.recv(1) == b""
    peer.close()
    assert not os.path.exists(control_of(runtime_dir))
    assert not os.path.exists(path)
    assert "STOPPING" in daemon.notify.wait_for("STOPPING", "1")


def test_quit_over_qmp_stops_the_instance(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/app.sock"
    daemon = daemons("serve", "--chardev", echo_server(path))
    with qmp.connect(control_of(runtime_dir)) as client:
        assert client.execute("quit") == {}
    assert daemon.proc.wait(10) == 0
    assert not os.path.exists(control_of(runtime_dir))
    assert not os.path.exists(path)


def _connect_as(uid: int, path: str) -> bytes:
    """As `uid`: connect to `path` and return what the server says before it hangs
    up (or b"connect failed: ...")."""
    def work() -> bytes:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(path)
            received = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if b"QMP" in received and received.endswith(b"\n"):
                    received += b"<still open>"
                    break
        except OSError as exc:
            received = f"connect failed: {exc}".encode()
        return received
    return as_uid(uid, work)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_a_control_client_of_another_uid_is_refused_whatever_the_modes(daemons, short_dir, runtime_dir):
    daemon = daemons("serve", "--chardev", echo_server(f"{short_dir}/app.sock"))
    control = control_of(runtime_dir)
    os.chmod(short_dir, 0o755)
    os.chmod(runtime_dir, 0o755)
    os.chmod(control, 0o666)
    answer = _connect_as(65534, control)
    assert not answer.startswith(b"connect failed"), answer
    assert b'"QMP"' not in answer and b"<still open>" not in answer
    assert b"permission denied: uid 65534" in answer
    assert b'"QMP"' in _connect_as(0, control)  # root is served
    assert status_of(control)["pid"] == daemon.pid


# ----- CLI exit codes ------------------------------------------------------------------------------


def test_commands_with_no_instance_exit_3(runtime_dir):
    results = run_many([["status"], ["status", "--json"], ["detach", "x"], ["attach", "socket,id=x,path=/tmp/x"]])
    for result in results:
        assert result.returncode == 3, (result.args, result.stderr)
        assert "no instance answers at" in result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_status_wait_exits_0_when_reached_and_4_on_timeout(daemons, short_dir, runtime_dir):
    path = f"{short_dir}/app.sock"
    daemons("serve", "--chardev", echo_server(path))
    later = subprocess.Popen(FDMIG + ["status", "--wait", "app=connected", "--timeout", "20"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reached, timed_out, bad_state, missing = run_many([
        ["status", "--wait", "app=listening", "--timeout", "1"],
        ["status", "--wait", "app=connected", "--timeout", "1"],
        ["status", "--wait", "app=sleeping", "--timeout", "1"],
        ["status", "--wait", "nobody=connected", "--timeout", "0.2"],
    ])
    assert reached.returncode == 0, reached.stderr
    assert timed_out.returncode == 4
    assert "timed out after 1 s waiting for app=connected: chardev app is listening" in timed_out.stderr
    assert bad_state.returncode == 2 and "accepted: listening, connecting, connected" in bad_state.stderr
    assert missing.returncode == 4 and "no chardev nobody" in missing.stderr
    assert later.poll() is None
    with connect_unix(path):
        out, err = later.communicate(timeout=20)  # event-driven: returns once the peer is in
        assert later.returncode == 0, err


def test_attach_and_detach_exit_codes(daemons, short_dir, runtime_dir):
    daemons("serve", "--chardev", f"socket,id=app,path={short_dir}/app.sock,server=on",
            "--chardev", f"socket,id=relay,path={short_dir}/r.sock,server=on,bridge=app")
    duplicate, unknown, bad_spec, busy, bad_fd, no_log, no_dir, refused = run_many([
        ["attach", f"socket,id=app,path={short_dir}/dup.sock,server=on"],
        ["detach", "nope"],
        ["attach", "socket,id=x,path=/tmp/x,reconnect-ms=soon"],
        ["detach", "app"],
        ["attach", "socket,id=x,fd=987"],
        ["attach", f"socket,id=l,path={short_dir}/l.sock,server=on,logfile={short_dir}/no/such/dir/log"],
        ["attach", f"socket,id=d,path={short_dir}/no/such/dir/d.sock,server=on"],
        ["attach", f"socket,id=c,path={short_dir}/nobody.sock"],
    ])
    assert no_log.returncode == 1 and "cannot open logfile" in no_log.stderr
    assert not os.path.exists(f"{short_dir}/l.sock")
    assert no_dir.returncode == 1 and "cannot listen on" in no_dir.stderr
    assert refused.returncode == 1 and "cannot connect to" in refused.stderr
    assert set(chardevs_of(control_of(runtime_dir))) == {"app", "relay"}
    assert duplicate.returncode == 2 and "duplicate label 'app'" in duplicate.stderr
    assert not os.path.exists(f"{short_dir}/dup.sock")
    assert unknown.returncode == 1 and "Chardev 'nope' not found" in unknown.stderr
    assert bad_spec.returncode == 2 and "reconnect-ms" in bad_spec.stderr
    assert busy.returncode == 1 and "bridges to it" in busy.stderr
    assert bad_fd.returncode == 2 and "987 is not an open descriptor" in bad_fd.stderr
    for result in (duplicate, unknown, bad_spec, busy, bad_fd, no_log, no_dir, refused):
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_attach_with_fd_passes_the_clis_own_descriptor(daemons, runtime_dir):
    daemons("serve")
    ours, theirs = socket.socketpair()
    with ours:
        ours.settimeout(10)
        fd = theirs.fileno()
        result = run("attach", f"socket,id=passed,fd={fd},frontend=echo", pass_fds=(fd,))
        theirs.close()
        assert result.returncode == 0, result.stderr
        assert "attached passed: client fd:attach-passed (connected)" in result.stdout
        ours.sendall(b"through the cli's fd")
        assert recv_exactly(ours, 20) == b"through the cli's fd"
        assert chardevs_of(control_of(runtime_dir))["passed"]["state"] == "connected"


# Regression: a failed attach with fd=N left the passed fd named in the instance.
def test_a_failed_attach_with_fd_leaves_no_descriptor_in_the_instance(daemons, short_dir):
    daemons("serve", "--chardev", echo_server(f"{short_dir}/app.sock"))
    ours, theirs = socket.socketpair()
    with ours:
        ours.settimeout(2)
        fd = theirs.fileno()
        result = run("attach", f"socket,id=app,fd={fd}", pass_fds=(fd,))  # duplicate label
        theirs.close()
        assert result.returncode == 2 and "duplicate label 'app'" in result.stderr
        assert ours.recv(1) == b""  # nobody holds the other end any more


def test_attach_mistakes_against_what_the_instance_holds_exit_2(daemons, short_dir):
    daemons("serve", "--chardev", f"socket,id=app,path={short_dir}/app.sock,server=on,frontend=echo")
    to_missing, to_busy, incoming = run_many([
        ["attach", f"socket,id=x,path={short_dir}/x.sock,server=on,bridge=nope"],
        ["attach", f"socket,id=y,path={short_dir}/y.sock,server=on,bridge=app"],
        ["attach", f"socket,id=z,path={short_dir}/z.sock,server=on,local-incoming=on"],
    ])
    assert to_missing.returncode == 2 and "'nope' names no chardev" in to_missing.stderr
    assert to_busy.returncode == 2 and "already has frontend echo" in to_busy.stderr
    assert incoming.returncode == 2 and "local-incoming" in incoming.stderr


def test_status_watch_in_a_pipe_prints_each_refresh_and_shows_a_new_chardev(daemons, short_dir):
    daemons("serve", "--name", "web")
    watch = subprocess.Popen(FDMIG + ["status", "--name", "web", "--watch", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    decoder = json.JSONDecoder()
    buffered = ""

    def next_status() -> dict:
        nonlocal buffered
        while True:
            text = buffered.lstrip()
            try:
                status, end = decoder.raw_decode(text)
                buffered = text[end:]
                return status
            except ValueError:
                line = watch.stdout.readline()  # the next refresh, a second later
                assert line, "status --watch stopped printing"
                buffered += line

    try:
        assert next_status()["chardevs"] == []
        assert run("attach", "--name", "web", f"socket,id=late,path={short_dir}/late.sock,server=on").returncode == 0
        for _ in range(10):
            if [c["label"] for c in next_status()["chardevs"]] == ["late"]:
                break
        else:
            pytest.fail("status --watch never showed the attached chardev")
    finally:
        watch.kill()
        watch.wait(10)
