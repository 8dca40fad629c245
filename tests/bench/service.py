"""A service restart with N stored connections: `fdmig restart` of an `fdmig run`
service that keeps its connections in fdmig's fd store, against the service's
own start-up, a plain restart (no store: every peer sees EOF and reconnects) and
s6-fdholder storing and retrieving the same N fds.

The service (SERVICE below, run as `python3 -c SERVICE web`) is written to
systemd's conventions and nothing else: it takes its listener (named by its
chardev label, "web") and any stored connections (named c<k>) from LISTEN_FDS /
LISTEN_FDNAMES, echoes on every connection with a selectors loop, stores each
newly accepted connection with FDSTORE=1 (sendmsg with SCM_RIGHTS to
$NOTIFY_SOCKET; the kernel adds the credentials) and sends READY=1 once it has
taken up everything. With --bind PATH it binds PATH itself when no listener was
passed; with --no-store it stores nothing (the plain restart). SIGTERM stops it
gracefully: it answers what it has read, then exits.

    python -m tests.bench.service [N ...]     # the measurement alone (default 1 10 100)
"""

import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from tests.bench import median_ms, raise_nofile, s6
from tests.bench.handoff import Probes, in_child
from tests.helpers import FDMIG, Notify

NAME = "benchsvc"
LABEL = "web"
PROBES = 50  # peers that stream ping-pong and time their longest pause

SERVICE = r'''
import array, os, selectors, signal, socket, sys

label = sys.argv[1]
store = "--no-store" not in sys.argv
bind = sys.argv[sys.argv.index("--bind") + 1] if "--bind" in sys.argv else None
count = int(os.environ.get("LISTEN_FDS", "0"))
if os.environ.get("LISTEN_PID", str(os.getpid())) != str(os.getpid()):
    count = 0
names = os.environ.get("LISTEN_FDNAMES", "").split(":")
selector = selectors.DefaultSelector()
listener, serial = None, 0
for i in range(count):
    fd, name = 3 + i, names[i] if i < len(names) else ""
    if name == label and listener is None:
        listener = socket.socket(fileno=fd)
    elif name[:1] == "c" and name[1:].isdigit():
        conn = socket.socket(fileno=fd)
        conn.setblocking(True)
        selector.register(conn, selectors.EVENT_READ, name)
        serial = max(serial, int(name[1:]) + 1)
    else:
        os.close(fd)
if listener is None:
    if bind is None:
        sys.exit(f"service: no listener named {label} in LISTEN_FDNAMES")
    try:
        os.unlink(bind)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(bind)
    listener.listen(socket.SOMAXCONN)
listener.setblocking(False)
selector.register(listener, selectors.EVENT_READ, None)

notify = None
if os.environ.get("NOTIFY_SOCKET"):
    address = os.environ["NOTIFY_SOCKET"]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.connect("\0" + address[1:] if address.startswith("@") else address)


def tell(message, fds=()):
    if notify is not None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        notify.sendmsg([message.encode()], ancillary)


# A graceful stop: SIGTERM ends the loop once the connections that were readable
# are served, so that no byte read from a peer dies unanswered with this process.
stopping = False


def on_term(signum, frame):
    global stopping
    stopping = True


waker, wakeup = socket.socketpair()
waker.setblocking(False)
wakeup.setblocking(False)
signal.set_wakeup_fd(wakeup.fileno())
signal.signal(signal.SIGTERM, on_term)
selector.register(waker, selectors.EVENT_READ, "waker")

tell("READY=1")
while not stopping:
    for key, _ in selector.select():
        if key.data == "waker":
            waker.recv(64)
            continue
        if key.data is None:
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setblocking(True)
                name = f"c{serial}"
                serial += 1
                if store:
                    tell(f"FDSTORE=1\nFDNAME={name}", [conn.fileno()])
                selector.register(conn, selectors.EVENT_READ, name)
            continue
        conn = key.fileobj
        try:
            data = conn.recv(65536)
            if data:
                conn.sendall(data)
                continue
        except OSError:
            pass
        selector.unregister(conn)
        if store:
            tell(f"FDSTOREREMOVE=1\nFDNAME={key.data}")
        conn.close()
'''


def service_argv(*extra: str) -> list[str]:
    return [sys.executable, "-c", SERVICE, LABEL, *extra]


def _service_env(env: dict) -> dict:
    env = dict(env)
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        env.pop(key, None)
    return env


def _connect_peers(path: str, n: int) -> list[socket.socket]:
    """n peers on `path`, each echoed once (so the service has accepted, and stored,
    every one of them)."""
    peers = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peers.append(sock)
            sock.settimeout(30)
            sock.connect(path)
        for sock in peers:
            sock.sendall(b"x")
        for sock in peers:
            if sock.recv(1) != b"x":
                raise RuntimeError("a peer was not echoed")
    except BaseException:
        for sock in peers:
            sock.close()
        raise
    return peers


def _eofs(peers: list[socket.socket]) -> int:
    """How many of the peers have seen end of file (or an error): each one would
    have to reconnect."""
    poller = select.poll()  # not select(): fds here are often above 1023
    for sock in peers:
        poller.register(sock.fileno(), select.POLLIN)
    count = 0
    by_fd = {sock.fileno(): sock for sock in peers}
    for fd, events in poller.poll(0):
        sock = by_fd[fd]
        sock.setblocking(False)
        try:
            gone = events & (select.POLLHUP | select.POLLERR) or sock.recv(1) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        count += bool(gone)
    return count


def _stored(env: dict) -> int:
    out = subprocess.run(FDMIG + ["status", "--name", NAME, "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"fdmig status failed: {out.stderr.strip()}")
    return len(json.loads(out.stdout).get("stored") or [])


def _log_tail(path: str, limit: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[-limit:]


def _stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def measure_fdmig(n: int, repeats: int, workdir: str) -> dict:
    """`fdmig restart` of a service holding n stored connections: the probes'
    longest pause and restart's wall clock (seconds), per restart; and how many of
    the n peers saw EOF (each would have had to reconnect)."""
    raise_nofile()
    env = dict(_service_env(os.environ), FDMIG_RUNTIME_DIR=os.path.join(workdir, "rt"))
    env.pop("FDMIG_FAULT", None)
    path = os.path.join(workdir, "web.sock")
    log = os.path.join(workdir, "run.log")
    notify = Notify(workdir)
    result = {"n": n, "pause": [], "wall": [], "eofs": None, "probes": 0, "stop": [], "handover": []}
    proc = probes = None
    peers = []
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                FDMIG + ["run", "--name", NAME, "--notify", "--fdstore-max", str(n + 10),
                         "--chardev", f"id={LABEL},path={path},server=on", "--", *service_argv()],
                env=dict(env, NOTIFY_SOCKET=notify.path), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            notify.wait_for("READY", "1", timeout=120, alive=lambda: proc.poll() is None)
        except TimeoutError:
            raise RuntimeError(f"fdmig run did not become ready: {_log_tail(log)}") from None
        peers = _connect_peers(path, n)
        deadline = time.monotonic() + 120
        while (stored := _stored(env)) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {stored} of {n} connections stored: {_log_tail(log)}")
            time.sleep(0.05)
        subset = peers[:: max(1, n // PROBES)][:PROBES]
        result["probes"] = len(subset)
        probes = Probes(subset)
        probes.wait_answers(2)
        for _ in range(repeats):
            time.sleep(0.05)  # the stream runs between restarts, as in life
            done = probes.window()
            started = time.monotonic()
            out = subprocess.run(FDMIG + ["restart", "--name", NAME, "--timeout", "60"], env=env,
                                 capture_output=True, text=True, timeout=120)
            result["wall"].append(time.monotonic() - started)
            if out.returncode != 0:
                raise RuntimeError(f"fdmig restart failed ({out.returncode}): {out.stderr.strip()} "
                                   f"{_log_tail(log)}")
            probes.wait_answers(2)  # served by the new service
            result["pause"].append(done())
        stored = _stored(env)
        if stored != n:
            raise RuntimeError(f"{stored} of {n} connections stored after the restarts")
        # fdmig logs each restart's two parts: the old service's own stop, and its own
        # part from that exit to the new service's start.
        with open(log, errors="replace") as f:
            for line in f:
                found = re.search(r"exited ([0-9.]+) ms after the stop signal; the new one started ([0-9.]+) ms", line)
                if found:
                    result["stop"].append(float(found[1]) / 1000)
                    result["handover"].append(float(found[2]) / 1000)
        probes.stop()
        probes = None
        result["eofs"] = _eofs(peers)
    finally:
        if probes is not None:
            probes.stop()
        _stop(proc)
        for sock in peers:
            sock.close()
        notify.close()
    return result


def measure_startup(n: int, repeats: int, workdir: str) -> list[float]:
    """The service program's own start-up with n stored connections (seconds from
    spawn to its READY=1): the listener and n connected sockets at fds 3.., named
    in LISTEN_FDNAMES as fdmig passes them, READY=1 to a socket of ours."""
    raise_nofile()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(workdir, "startup.sock"))
    listener.listen(16)
    pairs = [socket.socketpair() for _ in range(n)]
    sources = [listener.fileno()] + [a.fileno() for a, _ in pairs]
    # Above the fds 3.. they go to, so that no dup2 of one clobbers another.
    high = []
    notify = Notify(tempfile.mkdtemp(prefix="su", dir=workdir))
    env = _service_env(os.environ)
    env.update(LISTEN_FDS=str(len(sources)), LISTEN_FDNAMES=":".join([LABEL] + [f"c{i}" for i in range(n)]),
               NOTIFY_SOCKET=notify.path)
    samples = []
    try:
        floor_fd = 3 + len(sources) + 16
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor_fd) for fd in sources]
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(high)]
        argv = service_argv()
        for _ in range(repeats):
            notify.messages.clear()
            started = time.monotonic()
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            try:
                notify.wait_for("READY", "1", timeout=60)
                samples.append(time.monotonic() - started)
            finally:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
    finally:
        for fd in high:
            os.close(fd)
        for a, b in pairs:
            a.close()
            b.close()
        listener.close()
        notify.close()
    return samples


def _reconnect_loop(socks: list[socket.socket], path: str, ctl: socket.socket) -> None:
    """In a process of its own: every round, each peer waits for EOF, reconnects
    (retrying every 1 ms, as a client's reconnect loop would), sends a byte and
    waits for its echo; then a JSON line of each peer's EOF-to-echo time and the
    reconnects it took goes to ctl."""
    n = len(socks)
    poller = select.epoll()
    index = {}
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        index[sock.fileno()] = i
        poller.register(sock.fileno(), select.EPOLLIN)
    poller.register(ctl.fileno(), select.EPOLLIN)
    state = ["up"] * n  # up (waits for EOF), down (to reconnect), sent (waits for the echo), done
    eof, pauses, down = [0.0] * n, [], []
    reconnects = attempts = 0
    while True:
        for fd, _ in poller.poll(0.001 if down else 0.05):
            if fd == ctl.fileno():
                if ctl.recv(64) in (b"", b"q"):
                    return
                continue
            i = index[fd]
            try:
                data = socks[i].recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            now = time.monotonic()
            if state[i] == "sent" and data:
                state[i] = "done"
                pauses.append(now - eof[i])
                continue
            if data:
                continue  # an echo of nothing we sent this round
            if state[i] == "up":
                eof[i] = now
            poller.unregister(fd)
            del index[fd]
            socks[i].close()
            state[i] = "down"
            down.append(i)
        while down:
            i = down[0]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            attempts += 1
            try:
                sock.connect(path)
                sock.send(b"y")
            except OSError:  # not there yet, refused, or its backlog full
                sock.close()
                break  # the others would fail alike: try again in 1 ms
            down.pop(0)
            socks[i] = sock
            index[sock.fileno()] = i
            poller.register(sock.fileno(), select.EPOLLIN)
            state[i] = "sent"
            reconnects += 1
        if pauses and len(pauses) == n:
            ctl.sendall(json.dumps({"pauses": pauses, "reconnects": reconnects,
                                    "attempts": attempts}).encode() + b"\n")
            state = ["up"] * n
            pauses, reconnects, attempts = [], 0, 0


def measure_plain(n: int, repeats: int, workdir: str) -> dict:
    """The same service with no store, restarted as a plain service is (SIGTERM,
    wait, start again; it binds its socket itself): each restart's longest and
    median EOF-to-first-echo time over the n peers (seconds), and the reconnects."""
    raise_nofile()
    path = os.path.join(workdir, "plain.sock")
    notify = Notify(workdir)
    env = dict(_service_env(os.environ), NOTIFY_SOCKET=notify.path)
    argv = service_argv("--bind", path, "--no-store")
    result = {"n": n, "longest": [], "median": [], "reconnects": [], "attempts": []}
    proc = None
    peers = []
    ctl = child = None
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        notify.wait_for("READY", "1", timeout=60, alive=lambda: proc.poll() is None)
        peers = _connect_peers(path, n)
        ctl, child_end = socket.socketpair()
        child = os.fork()
        if child == 0:
            ctl.close()
            try:
                in_child(_reconnect_loop, peers, path, child_end)
            finally:
                os._exit(0)
        child_end.close()
        for sock in peers:
            sock.close()  # the child's copies are the peers now
        peers = []
        reader = ctl.makefile("rb")
        ctl.settimeout(120)
        for _ in range(repeats):
            time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)  # what `systemctl restart` does first
            proc.wait(20)
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            line = reader.readline()
            if not line:
                raise RuntimeError("the reconnecting peers' process ended")
            report = json.loads(line)
            result["longest"].append(max(report["pauses"]))
            result["median"].append(statistics.median(report["pauses"]))
            result["reconnects"].append(report["reconnects"])
            result["attempts"].append(report["attempts"])
        reader.close()
    finally:
        if ctl is not None:
            try:
                ctl.sendall(b"q")
            except OSError:
                pass
        if child:
            os.waitpid(child, 0)
        if ctl is not None:
            ctl.close()
        _stop(proc)
        for sock in peers:
            sock.close()
        notify.close()
    return result


def measure_s6(n: int, repeats: int, workdir: str) -> dict:
    """s6-fdholder storing n socket fds (s6-fdholder-setdump, in runs of at most 253
    fds) into an empty fd holder and retrieving them all (s6-fdholder-getdump, which
    execs into a program holding them): seconds per store+retrieve, with each part.
    Each repeat has a fresh daemon (untimed). ok False and error on a failure:
    Debian's s6 fails every getdump above 253 fds (see tests/bench/s6.py)."""
    result = {"n": n, "seconds": [], "store": [], "retrieve": [], "ok": False, "error": None}
    if not s6.available():
        result["error"] = "s6-fdholder tools not found on PATH (Debian package s6)"
        return result
    limit = raise_nofile()
    if 2 * n + 64 > limit:
        result["error"] = f"n={n} needs {2 * n} fds in this process, RLIMIT_NOFILE is {limit}"
        return result
    base = tempfile.mkdtemp(prefix="s6s-", dir=workdir if len(workdir) < 60 else "/tmp")
    rulesdir = os.path.join(base, "rules")
    s6.write_rules(rulesdir)
    pairs = [socket.socketpair() for _ in range(n)]
    daemon = None
    step = "start"
    try:
        for r in range(repeats):
            step = f"run {r + 1}: start the daemon"
            daemon = s6.Daemon(os.path.join(base, f"H{r}"), rulesdir, n + 16, base)
            step = f"run {r + 1}: store (s6-fdholder-setdump)"
            store = s6.populate(daemon.path, [p.fileno() for p, _ in pairs])
            step = f"run {r + 1}: retrieve (s6-fdholder-getdump)"
            started = time.perf_counter()
            out = s6._run(["s6-fdholder-getdump", "-t", str(s6.CLIENT_MS), daemon.path, "printenv", "S6_FD#"],
                          "s6-fdholder-getdump")
            retrieve = time.perf_counter() - started
            if out.stdout.strip() != str(n).encode():
                raise s6.ToolError(f"getdump handed on {out.stdout.strip()!r} fds, not {n}")
            result["store"].append(store)
            result["retrieve"].append(retrieve)
            result["seconds"].append(store + retrieve)
            daemon.stop()
            daemon = None
        result["ok"] = True
    except (s6.ToolError, RuntimeError, OSError) as e:
        log = daemon.stderr() if daemon is not None else ""
        result["error"] = f"{step}: {e}" + (f" [daemon log: {log}]" if log else "")
    finally:
        if daemon is not None:
            daemon.stop()
        for p, q in pairs:
            p.close()
            q.close()
        shutil.rmtree(base, ignore_errors=True)
    return result


def measure(n: int, repeats: int, workdir: str) -> dict:
    """One row: every figure above for n stored connections, medians in ms."""
    fd = measure_fdmig(n, repeats, tempfile.mkdtemp(prefix="f", dir=workdir))
    startup = measure_startup(n, max(repeats, 5), tempfile.mkdtemp(prefix="u", dir=workdir))
    plain = measure_plain(n, repeats, tempfile.mkdtemp(prefix="p", dir=workdir))
    pause, start = median_ms(fd["pause"]), median_ms(startup)
    row = {"n": n, "repeats": repeats, "probes": fd["probes"],
           "peer-pause-ms": pause, "startup-ms": start,
           "pause-minus-startup-ms": round(pause - start, 3) if pause is not None and start is not None else None,
           "restart-wall-ms": median_ms(fd["wall"]), "reconnects": fd["eofs"],
           "old-stop-ms": median_ms(fd["stop"]), "fdmig-part-ms": median_ms(fd["handover"]),
           "plain-pause-ms": median_ms(plain["longest"]), "plain-median-pause-ms": median_ms(plain["median"]),
           "plain-reconnects": statistics.median_low(plain["reconnects"]) if plain["reconnects"] else None}
    if s6.available():
        r = measure_s6(n, max(repeats, 5), tempfile.mkdtemp(prefix="s", dir=workdir))
        row["s6-ms"] = median_ms(r["seconds"]) if r["ok"] else None
        row["s6-store-ms"] = median_ms(r["store"]) if r["ok"] else None
        row["s6-retrieve-ms"] = median_ms(r["retrieve"]) if r["ok"] else None
        row["s6-error"] = None if r["ok"] else r["error"]
    return row


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [1, 10, 100]
    workdir = tempfile.mkdtemp(prefix="fdmig-svc-", dir="/tmp")
    try:
        for n in sizes:
            print(json.dumps(measure(n, 3, tempfile.mkdtemp(dir=workdir))), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
