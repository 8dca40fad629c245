"""Live TCP connections moved to another host (capability x-tcp-repair): N echo
chardevs on host A, each with a peer in the client's network namespace, moved to
host B and back over a mutual-TLS channel, the service address moving with them
(--release-cmd, --claim-cmd). Against the same peers reconnecting to a new host:
the capability off, every chardev opened afresh at the target, each peer finding
its connection gone (a reset from the new host) and connecting again.

The hosts are network namespaces (tests/netns.py, 198.18.0.0/15 only); root only.

    python -m tests.bench.crosshost [N ...]     # the measurement alone (default 1 100 1000)
"""

import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time

from tests import netns
from tests.bench import median_ms, raise_nofile
from tests.bench.handoff import STREAM_INTERVAL, ProbeControl, Probes, Streaming, in_child
from tests.helpers import FDMIG, Notify, missing
from tests.netns import HOST_A, HOST_B, SERVICE

PROBES = 50
# The claim's gratuitous ARP, given 10 ms to go out and then killed: what a user
# tunes once the hosts are known (the tests give it 50 ms, for a loaded machine).
CLAIM = netns.claim(0.01, "KILL")
# How long the address commands take, run as an instance runs them (repair.hook),
# in a host's namespace: their part of the downtime is the user's, not fdmig's.
HOOK_TIMER = """
import asyncio, json, sys, time
from fdmig.migration import repair
async def main(release, claim, repeats):
    samples = {"release": [], "claim": []}
    for _ in range(repeats):
        for name, command in (("release", release), ("claim", claim)):
            started = time.monotonic()
            await repair.hook(name, command)
            samples[name].append(time.monotonic() - started)
    print(json.dumps(samples))
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""
BASE_PORT = 10000
RECORD = 16


def available() -> str | None:
    """Why the cross-host handoff cannot be measured here (make_creds runs openssl), or None."""
    return netns.unavailable() or missing("openssl")


def _start(hosts, host, args, workdir, env, ready=True):
    notify = Notify(tempfile.mkdtemp(dir=workdir))
    proc = subprocess.Popen(hosts.wrap(host, FDMIG + args), env=dict(env, NOTIFY_SOCKET=notify.path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    if ready:
        notify.wait_for("READY", "1", timeout=120, alive=lambda: proc.poll() is None)
    notify.close()
    return proc


def _connect_all(ports):
    return [socket.create_connection((SERVICE, port), timeout=10) for port in ports]


def _serve_args(n: int, live: bool) -> list[str]:
    args = ["serve", "--name", "x"] + (["--capability", "x-tcp-repair"] if live else [])
    mark = ",support-local-migration=on" if live else ""
    for i in range(n):
        args += ["--chardev", f"socket,id=c{i},host={SERVICE},port={BASE_PORT + i},server=on,frontend=echo{mark}"]
    return args


def _envs(workdir) -> dict:
    envs = {}
    for host in ("a", "b"):
        runtime = os.path.join(workdir, f"rt-{host}")
        os.makedirs(runtime, mode=0o700, exist_ok=True)
        envs[host] = dict(os.environ, FDMIG_RUNTIME_DIR=runtime)
        envs[host].pop("FDMIG_FAULT", None)
    return envs


def _stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(n: int, repeats: int, workdir: str, creds: str) -> dict:
    """Samples (seconds): the instance's downtime, the longest pause of the peers
    doing ping-pong and of those streaming (half the watched peers each, when
    there are two or more), and the migrate-out wall time, moving back and forth
    between the hosts."""
    raise_nofile()
    result = {"n": n, "downtime": [], "pause": [], "stream-pause": [], "wall": []}
    with netns.Hosts() as hosts:
        envs = _envs(workdir)
        procs = [_start(hosts, "a", _serve_args(n, live=True), workdir, envs["a"])]
        peers = netns.in_netns(hosts.ns("client"), _connect_all, range(BASE_PORT, BASE_PORT + n))
        watched = peers[:: max(1, n // PROBES)][:PROBES]
        probes = Probes(watched[0::2])
        streams = Streaming(watched[1::2]) if len(watched) > 1 else None
        try:
            for i in range(repeats):
                src, dst = ("a", "b") if i % 2 == 0 else ("b", "a")
                channel = f"tcp:{HOST_B if dst == 'b' else HOST_A}:{4444 + i}"
                procs.append(_start(hosts, dst, ["migrate-in", "--name", "x", "--channel", channel, "--tls-creds", creds,
                                                 "--claim-cmd", CLAIM,
                                                 "--release-cmd", netns.RELEASE],
                                    workdir, envs[dst], ready=False))
                time.sleep(0.1)  # the stream runs between handoffs, as in life
                done = probes.window()
                stream_done = streams.window() if streams else None
                started = time.monotonic()
                out = subprocess.run(FDMIG + ["migrate-out", "--name", "x", "--channel", channel, "--tls-creds", creds,
                                              "--release-cmd", netns.RELEASE,
                                              "--reclaim-cmd", CLAIM, "--json", "--timeout", "60"],
                                     env=envs[src], capture_output=True, text=True, timeout=120)
                result["wall"].append(time.monotonic() - started)
                if out.returncode != 0:
                    raise RuntimeError(f"migrate-out failed: {out.stderr.strip()}")
                outcome = json.loads(out.stdout)
                if outcome["tcp-state"]["connections"] != n:
                    raise RuntimeError(f"only {outcome['tcp-state']['connections']} of {n} connections moved live")
                probes.wait_answers(2)
                result["pause"].append(done())
                if streams:
                    streams.wait_answers(2)
                    result["stream-pause"].append(stream_done())
                result["downtime"].append(outcome["downtime-ms"] / 1000)
        finally:
            probes.stop()
            if streams:
                streams.stop()
            _stop(procs)
            for peer in peers:
                peer.close()
    return result


def measure_reconnect(n: int, repeats: int, workdir: str) -> list[float]:
    """The same move without a live handoff: the instance on the old host stops
    (its peers see EOF), the address moves, an instance starts on the new host,
    and the peers connect again. Samples (seconds): the probes' longest pause,
    EOF to the first answer from the new host."""
    raise_nofile()
    samples = []
    with netns.Hosts() as hosts:
        envs = _envs(workdir)
        procs = [_start(hosts, "a", _serve_args(n, live=False), workdir, envs["a"])]
        ports = list(range(BASE_PORT, BASE_PORT + n))
        watched = ports[:: max(1, n // PROBES)][:PROBES]
        others = [port for port in ports if port not in watched]
        peers = netns.in_netns(hosts.ns("client"), _connect_all, others)
        probes = Reconnecting(hosts, watched)
        try:
            for i in range(repeats):
                src, dst = ("a", "b") if i % 2 == 0 else ("b", "a")
                time.sleep(0.1)  # the stream runs between moves, as in life
                done = probes.window()
                procs[-1].terminate()
                procs[-1].wait(20)
                hosts.run_on(src, netns.RELEASE)
                hosts.run_on(dst, CLAIM)
                procs.append(_start(hosts, dst, _serve_args(n, live=False), workdir, envs[dst]))
                probes.wait_answers(2)
                samples.append(done())
                for peer in peers:  # the rest reconnect too, untimed
                    peer.close()
                peers = netns.in_netns(hosts.ns("client"), _connect_all, others)
        finally:
            probes.stop()
            _stop(procs)
            for peer in peers:
                peer.close()
    return samples


class Reconnecting(Probes):
    """Probes that reconnect: each does ping-pong on a connection of its own to
    one of the ports, and when the connection fails (reset, EOF) connects again
    until the new host answers. The longest gap between two answers is the pause
    such a peer sees. In a process of their own, made in the client's namespace."""

    def __init__(self, hosts, ports):  # Probes' control protocol, a loop of its own
        self._ctl, child_end = socket.socketpair()

        def fork():
            # In the namespace's thread: the child, that thread alone, stays there.
            pid = os.fork()
            if pid == 0:
                self._ctl.close()
                try:
                    in_child(_reconnect_loop, ports, child_end)
                finally:
                    os._exit(0)
            return pid
        self.pid = netns.in_netns(hosts.ns("client"), fork)
        child_end.close()


def _reconnect_loop(ports, ctl) -> None:
    conns = {}  # port -> socket
    pending = dict.fromkeys(ports, b"")
    control = ProbeControl(ctl, ports)

    def connect(port):
        while True:
            try:
                sock = socket.create_connection((SERVICE, port), timeout=1)
                sock.setblocking(False)
                sock.send(b"%015d\n" % 0)
                conns[port], pending[port] = sock, b""
                return
            except OSError:
                time.sleep(0.001)  # a client's reconnect loop

    for port in ports:
        connect(port)
    while True:
        by_fd = {sock.fileno(): port for port, sock in conns.items()}
        ready, _, _ = select.select([ctl, *conns.values()], [], [], 0.05)
        for sock in ready:
            if sock is ctl:
                if not control.command():
                    return
                continue
            port = by_fd[sock.fileno()]
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                sock.close()
                connect(port)
                continue
            pending[port] += data
            while len(pending[port]) >= RECORD:
                pending[port] = pending[port][RECORD:]
                seq = control.answered(port)
                try:
                    sock.send(b"%015d\n" % seq)
                except OSError:
                    pass  # the next recv says what happened
        control.settle()


def measure_hooks(repeats: int = 9) -> dict:
    """Median seconds of --release-cmd and --claim-cmd, each run as an instance runs it."""
    with netns.Hosts() as hosts:
        out = subprocess.run(hosts.wrap("a", [sys.executable, "-c", HOOK_TIMER, netns.RELEASE, CLAIM, str(repeats)]),
                             capture_output=True, text=True, timeout=120, check=True)
    return {name: median_ms(samples) for name, samples in json.loads(out.stdout).items()}


def measure_all(sizes, repeats, workdir, creds) -> list[dict]:
    hooks = measure_hooks()
    rows = []
    for n in sizes:
        print(f"cross-host n={n} ...", file=sys.stderr, flush=True)
        reps = repeats  # each move is a second or so: every size takes them all, for steadier medians
        live = measure(n, reps, tempfile.mkdtemp(dir=workdir), creds)
        fresh = measure_reconnect(n, max(2, reps // 2), tempfile.mkdtemp(dir=workdir))
        downtime = median_ms(live["downtime"])
        beyond = [pause - down for pause, down in zip(live["stream-pause"], live["downtime"])]
        rows.append({"n": n, "downtime-ms": downtime, "peer-pause-ms": median_ms(live["pause"]),
                     "stream-pause-ms": median_ms(live["stream-pause"]),
                     "stream-beyond-downtime-ms": median_ms(beyond) if beyond else None,
                     "migrate-out-ms": median_ms(live["wall"]), "reconnect-pause-ms": median_ms(fresh),
                     "release-cmd-ms": hooks["release"], "claim-cmd-ms": hooks["claim"],
                     "fdmig-part-ms": round(downtime - hooks["release"] - hooks["claim"], 3), "repeats": reps})
    return rows


def markdown(rows) -> list[str]:
    lines = ["### Across hosts", "",
             "x-tcp-repair between network namespaces on one bridge (tests/bench/crosshost.py): N TCP echo "
             "connections, each with a peer, moved from host A to host B and back over a mutual-TLS channel "
             "with their TCP state, the service address moving with them; up to 50 peers time their longest "
             f"pause, half doing ping-pong, half streaming (a record every {STREAM_INTERVAL * 1000:g} ms each, "
             "whatever comes back, the peers' writes spread evenly over that interval; its pause is the "
             "longest any record waited for its echo). What "
             "streaming peers send while the address is on neither host, the source forwards to the target "
             "once the target has it. The downtime holds the "
             "user's two address commands (`ip addr del`; "
             "`ip addr replace` and a gratuitous ARP), timed apart as the instance runs them; fdmig's part is "
             "the rest. Both hosts share this machine's cores. Against it: the same move without a live "
             "handoff (the old instance stops, its peers see EOF, the address moves, a new instance starts on "
             "host B and the peers connect again).", "",
             "| connections | downtime (instance) | longest peer pause | streaming peers' longest pause "
             "| streaming: pause - downtime, each move "
             "| release + claim commands | fdmig's part | migrate-out wall | peers reconnecting instead: longest "
             "pause | reconnect / pause |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        hooks = round(row["release-cmd-ms"] + row["claim-cmd-ms"], 1)
        ratio = f"{row['reconnect-pause-ms'] / row['peer-pause-ms']:.0f}x" if row["peer-pause-ms"] else "-"
        streaming = f"{row['stream-pause-ms']} ms" if row.get("stream-pause-ms") is not None else "-"
        beyond = f"{row['stream-beyond-downtime-ms']} ms" if row.get("stream-beyond-downtime-ms") is not None else "-"
        lines.append(f"| {row['n']} | {row['downtime-ms']} ms | {row['peer-pause-ms']} ms | {streaming} | {beyond} | "
                     f"{hooks} ms | "
                     f"{row['fdmig-part-ms']} ms | {row['migrate-out-ms']} ms | {row['reconnect-pause-ms']} ms | "
                     f"{ratio} |")
    return lines


def make_creds(workdir: str) -> str:
    """A tls-creds DIR holding both ends' files, made with openssl (as the tests do)."""
    from tests.test_tls_channel import _OPENSSL_CNF, make_ca, make_creds_dir, make_leaf
    work = os.path.join(workdir, "ca")
    os.makedirs(work)
    with open(os.path.join(work, "openssl.cnf"), "w") as f:
        f.write(_OPENSSL_CNF)
    make_ca(work, "ca", "bench CA")
    make_leaf(work, "ca", "server", "server", "bench target", 1)
    make_leaf(work, "ca", "client", "client", "bench source", 2)
    w = lambda name: os.path.join(work, name)  # noqa: E731
    return make_creds_dir(os.path.join(workdir, "creds"), ca_cert=w("ca-cert.pem"), server_cert=w("server-cert.pem"),
                          server_key=w("server-key.pem"), client_cert=w("client-cert.pem"),
                          client_key=w("client-key.pem"))


if __name__ == "__main__":
    why = available()
    if why:
        sys.exit(f"cannot run: {why}")
    sizes = [int(a) for a in sys.argv[1:]] or [1, 100, 1000]
    with tempfile.TemporaryDirectory(prefix="fdm-x", dir="/tmp") as tmp:
        rows = measure_all(sizes, 6, tmp, make_creds(tmp))
    print("\n".join(markdown(rows)))
