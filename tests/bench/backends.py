"""Handoff of QEMU's other chardev backends: N chardevs of one backend (pty,
serial, pipe, udp, each with a live far end; file, which has none), moved
live; the instance's downtime and the far ends' longest pause, against the
kernel's floor for the same fds (the same kinds, as many, passed with
SCM_RIGHTS and nothing else).

    python -m tests.bench.backends [N ...]     # every backend at each N (1, 100, 1000)

The far ends: for a pty, the test opens the slave fdmig names; for serial, a
pty pair the test makes, fdmig holding the slave as its tty and the test the
master; for pipe, two FIFOs per chardev, the test writing one and reading the
other; for udp, a socket of the test's own connected to each chardev's. A few
of them (every one of a small N) stream ping-pong records through the echo
frontend from a process of their own (handoff.Probes) and time their longest
pause.
"""

import json
import os
import socket
import subprocess
import sys
import threading

from tests.bench import floor, handoff, median_ms, raise_nofile
from tests.helpers import FDMIG

BACKENDS = ("pty", "serial", "pipe", "udp", "file")
UDP_PORTS = 21000 + os.getpid() % 4000  # the chardevs' ports: UDP_PORTS + i


class FarEnd:
    """A far end with a socket's calls, for handoff.Probes: read one fd, write
    another (a FIFO pair's two, or one fd both ways)."""

    def __init__(self, read_fd: int, write_fd: int | None = None):
        self.read_fd, self.write_fd = read_fd, read_fd if write_fd is None else write_fd

    def fileno(self) -> int:
        return self.read_fd

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self.read_fd, flag)
        os.set_blocking(self.write_fd, flag)

    def recv(self, size: int) -> bytes:
        return os.read(self.read_fd, size)

    def send(self, data: bytes) -> int:
        return os.write(self.write_fd, data)

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd}:
            os.close(fd)


def _raw(fd: int) -> None:
    import termios
    import tty
    tty.setraw(fd, termios.TCSANOW)


def _setup(backend: str, n: int, workdir: str):
    """The chardevs' SPECs and their far ends (made now where the test makes
    them; a pty's once fdmig has named its slaves)."""
    specs, ends, keep = [], [], []
    marks = "frontend=echo,support-local-migration=on"
    for i in range(n):
        if backend == "pty":
            specs.append(f"pty,id=c{i},{marks}")
        elif backend == "serial":
            master, slave = os.openpty()
            _raw(slave)
            specs.append(f"serial,id=c{i},path={os.ttyname(slave)},{marks}")
            os.close(slave)  # fdmig holds it from its first open on
            ends.append(FarEnd(master))
        elif backend == "file":
            # Written, never read: no far end to answer, so no pause; the downtime only.
            specs.append(f"file,id=c{i},path={os.path.join(workdir, f'f{i}')},support-local-migration=on")
        elif backend == "pipe":
            base = os.path.join(workdir, f"p{i}")
            os.mkfifo(base + ".in")
            os.mkfifo(base + ".out")
            # Opened read-write: neither open waits for fdmig's.
            ends.append(FarEnd(os.open(base + ".out", os.O_RDWR), os.open(base + ".in", os.O_RDWR)))
            specs.append(f"pipe,id=c{i},path={base},{marks}")
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            # Below the kernel's ephemeral range, where no socket bound to port 0
            # (the far ends') can take it first.
            local = UDP_PORTS + i
            sock.connect(("127.0.0.1", local))
            keep.append(sock)
            specs.append(f"udp,id=c{i},host=127.0.0.1,port={sock.getsockname()[1]},localport={local},{marks}")
            ends.append(FarEnd(os.dup(sock.fileno())))
    return specs, ends, keep


def _pty_ends(control: str, n: int) -> list[FarEnd]:
    from fdmig import qmp
    with qmp.connect(control) as client:
        rows = {c["label"]: c["address"] for c in client.execute("x-fdmig-status")["chardevs"]}
    ends = []
    for i in range(n):
        fd = os.open(rows[f"c{i}"][len("pty:"):], os.O_RDWR | os.O_NOCTTY)
        _raw(fd)
        ends.append(FarEnd(fd))
    return ends


def floor_fds(backend: str, n: int) -> tuple[list[int], list[int]]:
    """As many fds of the same kinds as fdmig moves for N chardevs of `backend`
    (a pty: its master and slave; a pipe: two FIFOs), and what else to close."""
    fds, others = [], []
    for _ in range(n):
        if backend in ("pty", "serial"):
            master, slave = os.openpty()
            fds += [master, slave] if backend == "pty" else [slave]
            if backend == "serial":
                others.append(master)
        elif backend == "pipe":
            r, w = os.pipe()
            fds += [r, w]
        elif backend == "file":
            fds.append(os.open(os.devnull, os.O_WRONLY | os.O_APPEND))
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.connect(("127.0.0.1", 9))
            fds.append(sock.detach())
    return fds, others


def measure(backend: str, n: int, repeats: int, workdir: str) -> dict:
    """Downtime and the probes' longest pause (seconds) of `repeats` live
    migrations of N `backend` chardevs, and the kernel floor for their fds."""
    raise_nofile()
    env = dict(os.environ, FDMIG_RUNTIME_DIR=os.path.join(workdir, "rt"))
    env.pop("FDMIG_FAULT", None)
    specs, ends, keep = _setup(backend, n, workdir)
    args = ["serve", "--name", "bench", "--capability", "local-char-socket"]
    for spec in specs:
        args += ["--chardev", spec]
    procs = [handoff.start_instance(args, workdir, env)]
    control = os.path.join(env["FDMIG_RUNTIME_DIR"], "bench.sock")
    channel = os.path.join(env["FDMIG_RUNTIME_DIR"], "bench.migrate.sock")
    if backend == "pty":
        ends = _pty_ends(control, n)
    probes = handoff.Probes(ends[:: max(1, n // handoff.PROBES)][:handoff.PROBES])
    result = {"backend": backend, "n": n, "downtime": [], "pause": [], "quiet-pause": []}
    try:
        for _ in range(repeats):
            target = subprocess.Popen(FDMIG + ["migrate-in", "--name", "bench"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(target)
            handoff._wait_path(channel)
            downtime, pause, took = handoff._migrate_over_qmp(control, channel, target.pid, probes)
            result["downtime"].append(downtime)
            result["pause"].append(pause)
            done = probes.window()
            threading.Event().wait(took)  # as long a window with no handoff
            result["quiet-pause"].append(done())
    finally:
        probes.stop()
        handoff.stop_all(procs)
        for end in ends:
            end.close()
        for sock in keep:
            sock.close()
    fds, others = floor_fds(backend, n)
    try:
        result["floor"] = floor.measure_fds(fds, max(repeats, 10))
    finally:
        for fd in fds + others:
            os.close(fd)
    return result


def row(result: dict) -> dict:
    far_ends = result["backend"] != "file"  # a file has none to time a pause
    return {"backend": result["backend"], "n": result["n"], "downtime-ms": median_ms(result["downtime"]),
            "peer-pause-ms": median_ms(result["pause"]) if far_ends else None,
            "quiet-pause-ms": median_ms(result["quiet-pause"]) if far_ends else None,
            "floor-ms": median_ms(result["floor"]), "repeats": len(result["downtime"])}


def measure_all(sizes, repeats: int, workdir: str) -> list[dict]:
    import tempfile
    rows = []
    for backend in BACKENDS:
        for n in sizes:
            print(f"{backend} handoff n={n} ...", file=sys.stderr, flush=True)
            reps = repeats if n < 1000 else max(3, repeats // 2)
            rows.append(row(measure(backend, n, reps, tempfile.mkdtemp(dir=workdir))))
    return rows


def markdown(rows: list[dict]) -> list[str]:
    def ratio(a, b):
        return f"{a / b:.1f}x" if a is not None and b else "-"
    lines = ["### Other backends", "",
             "N chardevs of one backend (frontend echo, marked, capability on), each with a live far end, "
             "migrated over QMP; a few far ends stream ping-pong and time their longest pause. The kernel "
             "floor passes as many fds of the same kinds (a pty's master and slave, a pipe's two FIFOs) with "
             "SCM_RIGHTS and nothing else.", "",
             "| backend | chardevs | downtime | longest far-end pause | the same with no handoff "
             "| pause / (no-handoff pause + downtime) | kernel floor | downtime / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    def ms(value):
        return "-" if value is None else f"{value} ms"
    for r in rows:
        base = (r["quiet-pause-ms"] or 0) + r["downtime-ms"]
        lines.append(f"| {r['backend']} | {r['n']} | {ms(r['downtime-ms'])} | {ms(r['peer-pause-ms'])} | "
                     f"{ms(r['quiet-pause-ms'])} | {ratio(r['peer-pause-ms'], base)} | {ms(r['floor-ms'])} | "
                     f"{ratio(r['downtime-ms'], r['floor-ms'])} |")
    return lines


def main(argv: list[str]) -> int:
    import shutil
    import tempfile
    raise_nofile()
    sizes = [int(n) for n in argv] or [1, 100, 1000]
    workdir = tempfile.mkdtemp(prefix="fdmig-bench-", dir="/tmp")
    try:
        rows = measure_all(sizes, 7, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(markdown(rows)))
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
