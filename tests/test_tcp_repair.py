"""Live TCP connections moved to another host (capability x-tcp-repair over a
mutual-TLS TCP channel), with hosts that are network namespaces this test makes
(tests/netns.py: a client, host A and host B on one bridge, 198.18.0.0/15 only).
The service address moves with the connections through --release-cmd,
--claim-cmd and --reclaim-cmd; the peers, in the client's namespace, stream
numbered records and check that every echo comes back once, in order, with no
reset, through each migration and each failure."""

import ctypes
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
import types

import pytest

from fdmig import qmp, tcpforward, tcprepair
from tests import netns
from tests.helpers import Daemon, Pump, needs, recv_exactly, run, status_of, wait_states
from tests.netns import HOST_A, HOST_B, SERVICE
from tests.test_migration import stopped
from tests.test_tls_channel import creds  # noqa: F401  (the certificates, made once per module)

PIDFD_GETFD = 438  # the same number on every architecture

_why = netns.unavailable(check_programs=False)
pytestmark = [needs(*netns.PROGRAMS, "openssl"),
              pytest.mark.skipif(_why is not None, reason=f"cross-host tests: {_why}")]

PORT = 7000
CHANNEL_PORT = 4444
ECHO = "socket,id={label},host=" + SERVICE + ",port={port},server=on,support-local-migration=on,frontend=echo"


class Streamers(threading.Thread):
    """Peers that each stream numbered records to an echo chardev, a few at a
    time, and check every echo against what they sent: once, in order. A reset,
    an EOF or a wrong byte is a failure, kept for the test to assert on."""

    BATCH = 8  # records per peer per turn
    PACE = 0.002  # seconds between turns
    WINDOW = 64 * 1024  # bytes a peer may have sent and not yet had back

    def __init__(self, socks: list):
        super().__init__(daemon=True)
        self.socks = socks
        self.sent = [0] * len(socks)  # records sent, per peer
        self.outq = [bytearray() for _ in socks]  # made, not yet sent
        self.pending = [bytearray() for _ in socks]  # sent, not yet echoed
        self.echoed = [0] * len(socks)  # bytes echoed
        self.failures: list[str] = []
        self.sending = True
        self.done = threading.Event()
        self.longest_gap = 0.0

    RECORD = 15  # bytes

    def record(self, peer: int, n: int) -> bytes:
        return b"%04d %09d\n" % (peer, n)

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        for index, sock in enumerate(self.socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        last = batch_at = time.monotonic()
        try:
            while not self.done.is_set():
                # A batch per peer every PACE at most: a stream, not a flood.
                fresh = self.sending and time.monotonic() - batch_at >= self.PACE
                if fresh:
                    batch_at = time.monotonic()
                if fresh or any(self.outq):
                    for index, sock in enumerate(self.socks):
                        if len(self.pending[index]) >= self.WINDOW:
                            continue
                        if not self.outq[index]:
                            if not fresh:
                                continue
                            first = self.sent[index]
                            self.outq[index] += b"".join(self.record(index, first + i) for i in range(self.BATCH))
                            self.sent[index] += self.BATCH
                        try:
                            n = sock.send(self.outq[index])
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            self.failures.append(f"peer {index}: send: {exc!r}")
                            return
                        self.pending[index] += self.outq[index][:n]
                        del self.outq[index][:n]
                if not self.sending and not any(self.pending) and not any(self.outq):
                    return
                for key, _ in selector.select(0.002):
                    index = key.data
                    try:
                        data = key.fileobj.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self.failures.append(f"peer {index}: recv: {exc!r}")
                        return
                    if not data:
                        self.failures.append(f"peer {index}: EOF after {self.echoed[index]} bytes")
                        return
                    now = time.monotonic()
                    self.longest_gap, last = max(self.longest_gap, now - last), now
                    expected = self.pending[index][: len(data)]
                    if data != expected:
                        self.failures.append(f"peer {index}: at byte {self.echoed[index]}: got {data[:40]!r}, "
                                             f"expected {bytes(expected[:40])!r}")
                        return
                    del self.pending[index][: len(data)]
                    self.echoed[index] += len(data)
        finally:
            selector.close()
            self.done.set()

    def finish(self, timeout: float = 20.0) -> None:
        """Stop sending; every echo owed must come back."""
        self.sending = False
        if not self.done.wait(timeout):
            self.done.set()
            self.failures.append(f"echoes still owed after {timeout:g} s: {[len(p) for p in self.pending]}")
        self.join(5)

    def echoed_records(self) -> list[int]:
        return [n // self.RECORD for n in self.echoed]


@pytest.fixture
def hosts():
    with netns.Hosts() as made:
        yield made


@pytest.fixture
def world(hosts, short_dir, creds):  # noqa: F811
    """Each host's runtime directory and environment, and how to start fdmig there."""
    started = []
    dirs = {}
    for host in ("a", "b"):
        dirs[host] = os.path.join(short_dir, host)
        os.mkdir(dirs[host], 0o700)

    def env(host):
        return dict(os.environ, FDMIG_RUNTIME_DIR=dirs[host])

    def start(host, *args, ready=True, extra_env=None):
        daemon = Daemon(args, short_dir, env={**env(host), **(extra_env or {})}, ready=ready,
                        wrap=hosts.wrap(host, []))
        started.append(daemon)
        return daemon

    def serve(host, *chardevs, extra_env=None):
        specs = [arg for spec in chardevs for arg in ("--chardev", spec)]
        return start(host, "serve", "--name", "web", "--capability", "x-tcp-repair", *specs, extra_env=extra_env)

    def target(host, channel_host, port=CHANNEL_PORT, claim=True, extra_env=None, creds_dir=None):
        hooks = ["--claim-cmd", netns.CLAIM, "--release-cmd", netns.RELEASE] if claim else []
        return start(host, "migrate-in", "--name", "web", "--channel", f"tcp:{channel_host}:{port}",
                     "--tls-creds", creds_dir or creds.both, *hooks, ready=False, extra_env=extra_env)

    def migrate(host, channel_host, port=CHANNEL_PORT, creds_dir=None, release=None, reclaim=None, timeout=30):
        return run("migrate-out", "--name", "web", "--channel", f"tcp:{channel_host}:{port}",
                   "--tls-creds", creds_dir or creds.both, "--timeout", str(timeout),
                   "--release-cmd", release or netns.RELEASE,
                   "--reclaim-cmd", reclaim or netns.CLAIM, "--json", env=env(host), timeout=timeout + 30)

    yield types.SimpleNamespace(dirs=dirs, env=env, start=start, serve=serve, target=target, migrate=migrate, creds=creds,
                                control=lambda host: os.path.join(dirs[host], "web.sock"))
    for daemon in started:
        daemon.close()


def transparent_tcp_sockets(pid: int) -> tuple[int, int]:
    """(how many of process `pid`'s IPv4 TCP sockets are IP_TRANSPARENT, of how
    many), each read through a copy of its fd (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    transparent = total = 0
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = libc.syscall(PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue  # closed meanwhile
            with socket.socket(fileno=fd) as sock:
                if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
                    total += 1
                    transparent += sock.getsockopt(socket.SOL_IP, tcprepair.IP_TRANSPARENT)
    finally:
        os.close(pidfd)
    return transparent, total


def peers(hosts, ports) -> list[socket.socket]:
    return [hosts.connect("client", SERVICE, port) for port in ports]


def echo_once(sock: socket.socket, data: bytes = b"ping\n") -> bytes:
    sock.settimeout(10)
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def outcome(result) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


# ----- moves -------------------------------------------------------------------

def test_streaming_peers_move_to_another_host_and_back_every_record_once_in_order(hosts, world):
    labels = [f"e{i}" for i in range(8)]
    world.serve("a", *(ECHO.format(label=label, port=PORT + i) for i, label in enumerate(labels)),
                ECHO.format(label="spare", port=PORT + 100),
                f"socket,id=plain,host={SERVICE},port={PORT + 200},server=on,frontend=echo")
    streams = Streamers(peers(hosts, range(PORT, PORT + 8)))
    wait_states(world.control("a"), {label: "connected" for label in labels})
    streams.start()

    world.target("b", HOST_B)
    moved = outcome(world.migrate("a", HOST_B))
    assert moved["moved-live"] == labels and sorted(moved["reconnected"]) == ["plain", "spare"]
    assert not hosts.has_service_address("a") and hosts.has_service_address("b")
    after = status_of(world.control("b"))
    assert after["migration"]["moved-live"] == labels
    assert after["migration"]["tcp-state"]["connections"] == 8
    with qmp.connect(world.control("b")) as client:
        migration = client.execute("query-migrate")
    assert migration["status"] == "completed" and migration["x-fdmig"]["moved-live"] == labels
    assert sorted(migration["x-fdmig"]["reconnected"]) == ["plain", "spare"]
    # Restored transparent (a route from an address not yet held), made opaque
    # behind the downtime: complete, none is left so.
    assert transparent_tcp_sockets(after["pid"]) == (0, 8 + 10)
    assert {c["label"]: c["state"] for c in after["chardevs"]} == {
        **{label: "connected" for label in labels}, "spare": "listening", "plain": "listening"}

    halfway = sum(streams.echoed)
    world.target("a", HOST_A, port=CHANNEL_PORT + 1)
    back = outcome(world.migrate("b", HOST_A, port=CHANNEL_PORT + 1))
    assert back["moved-live"] == labels
    assert hosts.has_service_address("a") and not hosts.has_service_address("b")
    streams.finish()
    assert streams.failures == []
    assert sum(streams.echoed) > halfway > 0  # they streamed before, between and after
    assert min(streams.echoed_records()) > 0

    # New clients reach the moved listeners: one that never had a peer, and one
    # whose peer leaves.
    assert echo_once(hosts.connect("client", SERVICE, PORT + 100)) == b"ping\n"
    streams.socks[0].close()
    assert echo_once(hosts.connect("client", SERVICE, PORT)) == b"ping\n"


def test_connections_that_close_or_change_after_the_precopy_move_as_they_are_at_the_dump(hosts, world):
    """The target stages each connected chardev from the precopy; inside the
    downtime an unchanged one comes as its TCP state alone. Those whose peer has
    gone since are opened afresh, as if never staged; one whose peer was
    replaced moves with the new connection."""
    world.serve("a", *(ECHO.format(label=f"e{i}", port=PORT + i) for i in range(4)))
    first = peers(hosts, range(PORT, PORT + 4))
    for sock in first:
        assert echo_once(sock) == b"ping\n"
    target = world.target("b", HOST_B, extra_env={"FDMIG_FAULT": "target-after-precopy=stop"})
    migration = Pump(world.migrate, "a", HOST_B)
    stopped(target)  # all four staged there; the source serves on
    for gone in (1, 2, 3):
        first[gone].close()
    wait_states(world.control("a"), {"e0": "connected", "e1": "listening", "e2": "listening", "e3": "listening"})
    replaced = hosts.connect("client", SERVICE, PORT + 2)
    assert echo_once(replaced, b"new\n") == b"new\n"  # served here, before the downtime
    os.kill(target.pid, signal.SIGCONT)
    moved = outcome(migration.join(60))
    assert moved["moved-live"] == ["e0", "e2"] and moved["reconnected"] == ["e1", "e3"]
    assert moved["tcp-state"]["connections"] == 2 and moved["tcp-state"]["precopied"] == 1  # e0's state alone
    assert echo_once(first[0]) == b"ping\n"
    assert echo_once(replaced) == b"ping\n"
    fresh = [hosts.connect("client", SERVICE, PORT + i) for i in (1, 3)]
    for sock in fresh:  # they listen again, on host B
        assert echo_once(sock) == b"ping\n"
    states = wait_states(world.control("b"), {f"e{i}": "connected" for i in range(4)})
    rows = {c["label"]: c for c in status_of(world.control("b"))["chardevs"]}
    assert [rows[f"e{i}"]["migrations"] for i in range(4)] == [1, 0, 1, 0], states
    assert rows["e1"]["rx-bytes"] == rows["e3"]["rx-bytes"] == 5  # the new peer's ping alone
    assert status_of(world.control("b"))["migration"]["chardevs"] == 2
    assert "connection lost" not in target.stderr()


def test_bytes_in_flight_both_ways_at_the_dump_arrive_once(hosts, world):
    """A peer that writes megabytes and reads nothing: the echo's send queue is
    full (unacknowledged and unsent bytes), and so is its receive queue."""
    world.serve("a", ECHO.format(label="big", port=PORT))
    sock = hosts.connect("client", SERVICE, PORT)
    sock.setblocking(False)
    sent = bytearray()
    block = bytes(range(256)) * 256
    stalled_since = None
    # Write until the kernel takes no more for a while: every queue on the way is full.
    while stalled_since is None or time.monotonic() - stalled_since < 0.5:
        try:
            n = sock.send(block[len(sent) % 256:] + block[: len(sent) % 256])
            sent += (block[len(sent) % 256:] + block[: len(sent) % 256])[:n]
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            time.sleep(0.01)
    world.target("b", HOST_B)
    moved = outcome(world.migrate("a", HOST_B))
    state = moved["tcp-state"]
    assert state["connections"] == 1
    assert state["send-queue-bytes"] > 0 and state["recv-queue-bytes"] > 0, state
    sock.setblocking(True)
    sock.settimeout(20)
    got = bytearray()
    while len(got) < len(sent):
        chunk = sock.recv(1 << 20)
        assert chunk, f"EOF after {len(got)} of {len(sent)} bytes"
        got += chunk
    assert got == sent


# struct tcp_info's u32 fields these tests read, by offset
TCPI_TOTAL_RETRANS = 100
TCPI_DATA_SEGS_OUT = 156


def tcp_info(sock: socket.socket, offset: int) -> int:
    """The u32 field of the connection's struct tcp_info at `offset`."""
    return struct.unpack_from("=I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, offset + 4), offset)[0]


def retransmissions(sock: socket.socket) -> int:
    """How many segments the connection has sent again, by any timer or signal."""
    return tcp_info(sock, TCPI_TOTAL_RETRANS)


@pytest.mark.parametrize("claim", ["moves", "fails"])
def test_what_a_peer_sends_while_the_address_is_on_neither_host_needs_no_retransmission(hosts, world, claim):
    # The peer's timers (retransmission, and tail-loss probe once one segment is
    # out) are made 5 s, which no move here comes near: its record is answered
    # with nothing sent again, or only once a timer has fired.
    hosts.run_on("client", f"ip route replace {netns.SUBNET} dev eth0 rto_min 5s")
    serving = world.serve("a", ECHO.format(label="e", port=PORT), extra_env={"FDMIG_FAULT": "source-after-release=stop"})
    sock = hosts.connect("client", SERVICE, PORT)
    assert echo_once(sock) == b"ping\n"
    if claim == "moves":
        target = world.target("b", HOST_B)
    else:
        target = world.start("b", "migrate-in", "--name", "web", "--channel", f"tcp:{HOST_B}:{CHANNEL_PORT}",
                             "--tls-creds", world.creds.both, "--claim-cmd", "exit 3", ready=False)
    migration = Pump(world.migrate, "a", HOST_B)
    stopped(serving)  # the address released, nothing dumped yet
    assert not hosts.has_service_address("a") and not hosts.has_service_address("b")
    late = b"sent while no host had the address\n"
    sock.sendall(late)
    os.kill(serving.pid, signal.SIGCONT)
    result = migration.join(60)
    sock.settimeout(20)
    assert recv_exactly(sock, len(late)) == late
    assert retransmissions(sock) == 0
    assert echo_once(sock) == b"ping\n"
    if claim == "moves":
        assert outcome(result)["tcp-state"]["forwarded-segments"] >= 1
        assert target.proc.poll() is None and hosts.has_service_address("b")
    else:
        assert result.returncode == 1 and "--claim-cmd failed" in result.stderr
        assert hosts.has_service_address("a")  # reclaimed: what the peer sent came back here


def test_an_ipv6_segment_sent_while_the_address_moved_is_forwarded_to_the_restored_connection(hosts):
    # fdmig.tcpforward and fdmig.tcprepair by hand, in IPv6 (RFC 5180's benchmarking
    # prefix, inside these namespaces only): what the migration does, step by step.
    service6 = "2001:2::10"
    for host, address in (("client", "2001:2::1"), ("a", "2001:2::2"), ("b", "2001:2::3")):
        hosts.run_on(host, f"ip addr add {address}/64 dev eth0 nodad")
    hosts.run_on("a", f"ip addr add {service6}/64 dev eth0 nodad")
    hosts.run_on("client", "ip -6 route replace 2001:2::/64 dev eth0 metric 256 rto_min 5s")  # as in the test above

    listener = netns.in_netns(hosts.ns("a"), lambda: socket.create_server((service6, PORT), family=socket.AF_INET6))
    peer = netns.in_netns(hosts.ns("client"), socket.create_connection, (service6, PORT), 10)
    conn, _ = listener.accept()
    peer.sendall(b"before\n")
    assert recv_exactly(conn, 7) == b"before\n"
    forwarder = netns.in_netns(hosts.ns("a"), tcpforward.Forwarder, [service6])
    try:
        tcprepair.enter(conn)
        state = tcprepair.dump(conn)
        forwarder.track(state.local, state.peer, state.recv_seq, state.mss)
        hosts.run_on("a", f"ip addr del {service6}/64 dev eth0")
        peer.sendall(b"while no host had the address\n")
        restored = netns.in_netns(hosts.ns("b"), tcprepair.restore, state)
        hosts.run_on("b", f"ip addr add {service6}/64 dev eth0 nodad")
        assert select.select(forwarder.filenos(), [], [], 10)[0], "the peer's segment never reached host A"
        assert forwarder.forward() == 1
        tcprepair.leave(restored)
        restored.settimeout(10)
        assert recv_exactly(restored, 30) == b"while no host had the address\n"
        assert retransmissions(peer) == 0
    finally:
        forwarder.close()
        conn.close()
        listener.close()


def _moved_by_hand(hosts):
    """A connection from the client to host A's service address, moved to host B
    by hand as a migration does (dump, release, restore, claim, leave, then the
    bytes left to write afresh): (the peer's socket, host B's)."""
    listener = netns.in_netns(hosts.ns("a"), socket.create_server, (SERVICE, PORT))
    peer = hosts.connect("client", SERVICE, PORT)
    conn, _ = listener.accept()
    listener.close()
    tcprepair.enter(conn)
    state = tcprepair.dump(conn)
    hosts.run_on("a", netns.RELEASE)
    restored = netns.in_netns(hosts.ns("b"), tcprepair.restore, state)
    conn.close()
    hosts.run_on("b", netns.CLAIM)
    tcprepair.leave(restored, not tcprepair.quiet(state))
    restored.sendall(state.unsent_bytes)
    return peer, restored


def test_a_restored_connection_sends_only_from_an_address_its_host_holds(hosts):
    # Regression: restored sockets stayed transparent, so that a host that had
    # restored a connection went on sending for it (its retransmission timers)
    # once its --release-cmd had taken the address away on the next move.
    peer, restored = _moved_by_hand(hosts)
    restored.sendall(b"from b\n")
    assert recv_exactly(peer, 7) == b"from b\n"
    hosts.run_on("b", netns.RELEASE)
    tried = tcp_info(restored, TCPI_DATA_SEGS_OUT)
    restored.sendall(b"after the release\n")
    assert tcp_info(restored, TCPI_DATA_SEGS_OUT) > tried  # its kernel tried to send it
    assert select.select([peer], [], [], 0.5)[0] == []  # and nothing reached the peer


def test_unix_and_unmarked_chardevs_are_opened_afresh_at_the_target(hosts, world, short_dir):
    path = os.path.join(short_dir, "app.sock")
    world.serve("a", ECHO.format(label="live", port=PORT),
                f"socket,id=app,path={path},server=on,support-local-migration=on,frontend=echo")
    sock = hosts.connect("client", SERVICE, PORT)
    world.target("b", HOST_B)
    moved = outcome(world.migrate("a", HOST_B))
    assert moved["moved-live"] == ["live"] and moved["reconnected"] == ["app"]
    assert "1 marked chardev(s) (app) will reconnect at the target" in "\n".join(moved["notes"])
    assert echo_once(sock) == b"ping\n"


# ----- faults --------------------------------------------------------------------

def _serving_as_before(hosts, world, streams, host="a"):
    assert hosts.has_service_address(host)
    states = {c["label"]: c["state"] for c in status_of(world.control(host))["chardevs"]}
    assert set(states.values()) == {"connected"}, states
    before = sum(streams.echoed)
    deadline = time.monotonic() + 10
    while sum(streams.echoed) <= before and time.monotonic() < deadline and not streams.failures:
        time.sleep(0.01)  # the streams go on: awaiting progress, not a fixed time
    streams.finish()
    assert streams.failures == []
    assert sum(streams.echoed) > before


def start_streaming(hosts, world, n: int = 4, extra_env=None) -> Streamers:
    world.serve("a", *(ECHO.format(label=f"e{i}", port=PORT + i) for i in range(n)), extra_env=extra_env)
    streams = Streamers(peers(hosts, range(PORT, PORT + n)))
    wait_states(world.control("a"), {f"e{i}": "connected" for i in range(n)})
    streams.start()
    return streams


@pytest.fixture
def streaming(hosts, world):
    streams = start_streaming(hosts, world)
    yield streams
    streams.done.set()


def test_target_killed_before_the_commit_leaves_every_connection_on_the_source(hosts, world, streaming):
    # Killed with every connection restored (in repair mode) but before it
    # claims the address: its sockets close silently, the source rolls back.
    target = world.target("b", HOST_B, extra_env={"FDMIG_FAULT": "target-after-batch=kill"})
    result = world.migrate("a", HOST_B)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the source still serves every chardev" in result.stderr
    target.proc.wait(10)
    assert not hosts.has_service_address("b")
    _serving_as_before(hosts, world, streaming)


def test_source_killed_after_the_commit_the_target_takes_over(hosts, world):
    streams = start_streaming(hosts, world, extra_env={"FDMIG_FAULT": "source-after-ack=kill"})
    try:
        world.target("b", HOST_B)
        result = world.migrate("a", HOST_B)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "died during the migration; whether the target took over, fdmig status on its host says" \
            in result.stderr
        wait_states(world.control("b"), {f"e{i}": "connected" for i in range(4)})
        after = status_of(world.control("b"))
        assert after["migration"]["moved-live"] == [f"e{i}" for i in range(4)]
        _serving_as_before(hosts, world, streams, host="b")
    finally:
        streams.done.set()


@pytest.mark.parametrize("release", [None, "echo the address is not here >&2; exit 4"])
def test_a_failing_claim_cmd_rolls_back_before_the_commit(hosts, world, streaming, release):
    # Regression (a failing --release-cmd too): the target's rollback lost the
    # reason it was rolling back for, and died with a traceback instead of
    # telling the source.
    target = world.start("b", "migrate-in", "--name", "web", "--channel", f"tcp:{HOST_B}:{CHANNEL_PORT}",
                         "--tls-creds", world.creds.both, "--claim-cmd", "echo no such address >&2; exit 3",
                         *(["--release-cmd", release] if release else []), ready=False)
    result = world.migrate("a", HOST_B)
    assert result.returncode == 1
    assert "the target refused: --claim-cmd failed (exit status 3): no such address" in result.stderr
    assert "Traceback" not in target.stderr()
    assert target.proc.poll() is None  # it goes on waiting for a source
    _serving_as_before(hosts, world, streaming)


def test_a_failing_release_cmd_rolls_back_before_anything_is_dumped(hosts, world, streaming):
    world.target("b", HOST_B)
    result = world.migrate("a", HOST_B, release="echo cannot release >&2; exit 4")
    assert result.returncode == 1
    assert "--release-cmd failed (exit status 4): cannot release" in result.stderr
    assert not hosts.has_service_address("b")
    _serving_as_before(hosts, world, streaming)


def test_a_second_migrate_cancel_during_the_rollback_s_reclaim_leaves_it_to_finish(hosts, world, streaming,
                                                                                    short_dir):
    # Regression: the second cancel cut the rollback short inside its
    # --reclaim-cmd, and every chardev stayed quiesced.
    world.target("b", HOST_B)
    releasing, reclaiming = os.path.join(short_dir, "releasing"), os.path.join(short_dir, "reclaiming")

    def wait_for(ready, what):
        deadline = time.monotonic() + 20
        while not ready():
            assert time.monotonic() < deadline, f"{what} never came"
            time.sleep(0.01)  # another process's doing: no event to await

    # Over QMP, migrate does not wait for the target to listen, as migrate-out does.
    wait_for(lambda: subprocess.run(hosts.wrap("b", ["ss", "-Hltn", f"sport = :{CHANNEL_PORT}"]),
                                    capture_output=True, text=True).stdout.strip(), "the target's channel")

    with qmp.connect(world.control("a")) as client:
        client.execute("migrate", {
            "uri": f"tcp:{HOST_B}:{CHANNEL_PORT}", "x-fdmig-tls-creds": world.creds.both,
            "x-fdmig-release-cmd": f"touch {releasing}; sleep 20",
            "x-fdmig-reclaim-cmd": f"touch {reclaiming}; sleep 0.5; {netns.CLAIM}"})
        wait_for(lambda: os.path.exists(releasing), "--release-cmd")
        client.execute("migrate_cancel")
        wait_for(lambda: os.path.exists(reclaiming), "--reclaim-cmd")
        client.execute("migrate_cancel")
        deadline = time.monotonic() + 20
        while client.execute("query-migrate")["status"] not in ("cancelled", "failed", "completed"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.execute("query-migrate")["status"] == "cancelled"
    _serving_as_before(hosts, world, streaming)


def test_a_certificate_from_another_ca_is_refused_and_nothing_moves(hosts, world, streaming):
    world.target("b", HOST_B)
    result = world.migrate("a", HOST_B, creds_dir=world.creds.foreign)
    assert result.returncode == 1
    assert "TLS" in result.stderr
    assert not hosts.has_service_address("b")
    _serving_as_before(hosts, world, streaming)


def test_a_tcp_channel_without_tls_is_a_usage_error(world, streaming):
    result = run("migrate-out", "--name", "web", "--channel", f"tcp:{HOST_B}:{CHANNEL_PORT}",
                 "--capability", "x-tcp-repair", env=world.env("a"))
    assert result.returncode == 2
    assert "a TCP channel needs --tls-creds DIR" in result.stderr
    streaming.finish()
    assert streaming.failures == []


def test_hooks_are_refused_over_a_unix_channel(world, streaming):
    result = run("migrate-out", "--name", "web", "--release-cmd", "true", env=world.env("a"))
    assert result.returncode == 2
    assert "--release-cmd moves the service address to another host: it is for a TCP channel" in result.stderr
    streaming.finish()


@needs("setpriv")
def test_without_cap_net_admin_the_source_refuses_x_tcp_repair(hosts, world):
    world.start("a", "serve", "--name", "web", "--capability", "x-tcp-repair",
                "--chardev", ECHO.format(label="e0", port=PORT))
    wrap = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    daemon = Daemon(["serve", "--name", "weak", "--capability", "x-tcp-repair", "--chardev",
                     ECHO.format(label="e0", port=PORT + 1)], world.dirs["a"],
                    env=world.env("a"), wrap=hosts.wrap("a", wrap))
    try:
        result = run("migrate-out", "--name", "weak", "--channel", f"tcp:{HOST_B}:{CHANNEL_PORT}",
                     "--tls-creds", world.creds.both, env=world.env("a"))
        assert result.returncode == 1
        assert "capability x-tcp-repair needs CAP_NET_ADMIN" in result.stderr
    finally:
        daemon.close()


def test_without_cap_net_raw_the_connections_move_and_the_peers_retransmit_on_their_own(hosts, world):
    wrap = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw"]
    daemon = Daemon(["serve", "--name", "web", "--capability", "x-tcp-repair", "--chardev",
                     ECHO.format(label="e0", port=PORT)], world.dirs["a"], env=world.env("a"),
                    wrap=hosts.wrap("a", wrap))
    try:
        streams = Streamers(peers(hosts, [PORT]))
        wait_states(world.control("a"), {"e0": "connected"})
        streams.start()
        world.target("b", HOST_B)
        moved = outcome(world.migrate("a", HOST_B))
        assert moved["moved-live"] == ["e0"] and "forwarded-segments" not in moved["tcp-state"]
        assert "cannot watch for what the peers send while their address moves" in daemon.stderr()
        _serving_as_before(hosts, world, streams, host="b")
    finally:
        daemon.close()


def test_a_connection_whose_local_address_stays_behind_is_refused_and_serves_on(hosts, world):
    """A client chardev's connection is from host A's own address, which does not
    move: restored on B, its peer's next segment would reach A and be reset. The
    target refuses it after the claim, and the source rolls back."""
    server = netns.in_netns(hosts.ns("client"), socket.create_server, (netns.CLIENT, 9000))
    world.serve("a", f"socket,id=up,host={netns.CLIENT},port=9000,support-local-migration=on,frontend=echo")
    server.settimeout(10)
    peer, _ = server.accept()
    assert echo_once(peer) == b"ping\n"
    world.target("b", HOST_B)
    result = world.migrate("a", HOST_B)
    assert result.returncode == 1
    assert f"chardev up: its connection's address {HOST_A} is not this host's after --claim-cmd" in result.stderr
    assert hosts.has_service_address("a") and not hosts.has_service_address("b")
    assert echo_once(peer, b"still here\n") == b"still here\n"
