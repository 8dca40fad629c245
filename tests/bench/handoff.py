"""Handoff downtime with N connected chardevs, each with a live echo peer, as the
instance reports it and as the peers see it; and the reconnect baseline (a plain
restart, the alternative users have today)."""

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time

from tests.helpers import FDMIG, Notify

RECORD = 16
PROBES = 8  # peers that stream ping-pong and time their longest pause


def _raise_fd_limit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Probes:
    """A few peers doing back-to-back ping-pong through the echo chardevs; each
    records the longest gap between two answers while `measuring` is set."""

    def __init__(self, socks):
        self.socks = socks
        self.longest = 0.0
        self.measuring = threading.Event()
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()

    def _run(self):
        poller = select.epoll()
        last = {}
        seq = {}
        for sock in self.socks:
            sock.setblocking(False)
            poller.register(sock.fileno(), select.EPOLLIN)
            seq[sock.fileno()] = 0
            last[sock.fileno()] = time.monotonic()
            sock.send(b"%015d\n" % 0)
        by_fd = {s.fileno(): s for s in self.socks}
        pending = {fd: b"" for fd in by_fd}
        while not self.stop.is_set():
            for fd, _ in poller.poll(0.05):
                data = by_fd[fd].recv(4096)
                if not data:
                    self.error = "a peer saw EOF"
                    return
                pending[fd] += data
                while len(pending[fd]) >= RECORD:
                    record, pending[fd] = pending[fd][:RECORD], pending[fd][RECORD:]
                    if record != b"%015d\n" % seq[fd]:
                        self.error = f"record {seq[fd]} came back as {record!r}"
                        return
                    now = time.monotonic()
                    if self.measuring.is_set():
                        self.longest = max(self.longest, now - last[fd])
                    last[fd] = now
                    seq[fd] += 1
                    by_fd[fd].send(b"%015d\n" % seq[fd])

    def window(self):
        """Reset, then measure until the returned callable is called."""
        self.longest = 0.0
        self.measuring.set()
        def done():
            self.measuring.clear()
            return self.longest
        return done


def start_instance(args, workdir, env):
    notify = Notify(workdir)
    proc = subprocess.Popen(FDMIG + args, env=dict(env, NOTIFY_SOCKET=notify.path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    notify.wait_for("READY", "1", timeout=120)
    notify.close()
    return proc


def measure_handoff(n: int, repeats: int, workdir: str) -> dict:
    """Median-ready samples: instance downtime, peer pause, migrate-out wall (seconds),
    and the RSS of the instance holding the N chardevs."""
    _raise_fd_limit()
    env = dict(os.environ, FDMIG_RUNTIME_DIR=os.path.join(workdir, "rt"))
    env.pop("FDMIG_FAULT", None)
    path = os.path.join(workdir, f"peers-{n}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4096)
    peers = []
    accepting = threading.Thread(target=lambda: peers.extend(listener.accept()[0] for _ in range(n)), daemon=True)
    accepting.start()
    # Client chardevs: one fd each in the instance (a server would hold two).
    args = ["serve", "--name", "bench", "--capability", "local-char-socket"]
    for i in range(n):
        args += ["--chardev", f"id=c{i},path={path},frontend=echo,support-local-migration=on"]
    procs = [start_instance(args, workdir, env)]
    accepting.join(60)
    assert len(peers) == n, f"only {len(peers)} of {n} chardevs connected"
    probes = Probes(peers[:: max(1, n // PROBES)][:PROBES])
    probes.start()
    result = {"n": n, "downtime": [], "pause": [], "wall": [], "rss": None}
    try:
        for _ in range(repeats):
            time.sleep(0.05)  # the stream runs between handoffs, as in life
            target = subprocess.Popen(FDMIG + ["migrate-in", "--name", "bench"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(target)
            done = probes.window()
            started = time.monotonic()
            out = subprocess.run(FDMIG + ["migrate-out", "--name", "bench", "--json", "--timeout", "60"],
                                 env=env, capture_output=True, text=True, timeout=120)
            wall = time.monotonic() - started
            time.sleep(0.02)  # let the probes see their first answers from the target
            pause = done()
            if out.returncode != 0:
                raise RuntimeError(f"migrate-out failed: {out.stderr.strip()}")
            if probes.error:
                raise RuntimeError(probes.error)
            outcome = json.loads(out.stdout)
            result["downtime"].append(outcome["downtime-ms"] / 1000)
            result["pause"].append(pause)
            result["wall"].append(wall)
        status = subprocess.run(FDMIG + ["status", "--name", "bench", "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        result["rss"] = json.loads(status.stdout)["rss-bytes"]
    finally:
        probes.stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for peer in peers:
            peer.close()
        listener.close()
    return result


def measure_reconnect(repeats: int, workdir: str) -> list[float]:
    """A restart without handoff: the peer sees EOF, reconnects until the new
    instance answers. Seconds from EOF to the first echo from the new instance."""
    env = dict(os.environ, FDMIG_RUNTIME_DIR=os.path.join(workdir, "rt-restart"))
    path = os.path.join(workdir, "restart.sock")
    args = ["serve", "--name", "restart", "--chardev", f"socket,id=app,path={path},server=on,frontend=echo"]
    samples = []
    proc = start_instance(args, workdir, env)
    try:
        for _ in range(repeats):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            sock.sendall(b"x")
            sock.recv(1)
            proc.send_signal(signal.SIGTERM)  # what `systemctl restart` does first
            assert sock.recv(1) == b""
            eof = time.monotonic()
            sock.close()
            proc.wait(20)
            proc = subprocess.Popen(FDMIG + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(path)
                    sock.sendall(b"y")
                    if sock.recv(1) == b"y":
                        break
                except OSError:
                    pass
                finally:
                    sock.close()
                time.sleep(0.001)  # a client's reconnect loop
            samples.append(time.monotonic() - eof)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    return samples
