"""The kernel's floor: n socket fds from this process to another over one Unix
socketpair with SCM_RIGHTS, and nothing else.

No protocol, no identifiers, no bookkeeping: batches of at most 253 fds (the
kernel's SCM_MAX_FD) ride one byte each; the child takes all n, closes them and
answers one byte. Timed: first sendmsg -> ack received. Whatever a real handoff
costs beyond this is the price of its protocol and its processes.

    python -m tests.bench.floor            # medians for n in 1, 10, 100, 1000, 5000
"""

import socket
import statistics
import subprocess
import sys
import time

from tests.bench import raise_nofile

MAX_FDS_PER_MSG = 253  # SCM_MAX_FD in include/net/scm.h
TIMEOUT = 30.0  # seconds for any one run; never hang

# The receiving end. It lives across repeats so that process start-up is never timed.
# argv: socket fd, n. Per run: recvmsg until n fds have come, close them, send b"k".
# Exit 0 on EOF between runs; 3 on EOF mid-run; 4 if the kernel truncated the fds.
_CHILD = r"""
import os, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sock = socket.socket(fileno=int(sys.argv[1]))
n = int(sys.argv[2])
while True:
    held = []
    while len(held) < n:
        msg, fds, flags, _ = socket.recv_fds(sock, 1, 253)
        held.extend(fds)
        if not msg:
            sys.exit(0 if not held else 3)
        if flags & socket.MSG_CTRUNC:
            sys.stderr.write(f"MSG_CTRUNC after {len(held)} of {n} fds\n")
            sys.exit(4)
    for fd in held:
        os.close(fd)
    sock.sendall(b"k")
"""


def measure_floor(n: int, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per run, `repeats` runs (after `warmup` untimed ones), to pass n
    connected socket fds to a child process and get its one-byte ack.

    The n fds are one end each of n socketpairs, made once before any timing; the
    child is started once for this n. Raises RuntimeError if the child fails.
    """
    if n < 1 or repeats < 1:
        raise ValueError("n and repeats must be >= 1")
    limit = raise_nofile()
    if 2 * n + 64 > limit:
        raise ValueError(f"n={n} needs {2 * n} fds here, RLIMIT_NOFILE is {limit}")
    pairs = [socket.socketpair() for _ in range(n)]
    try:
        return measure_fds([a.fileno() for a, _ in pairs], repeats, warmup)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def measure_fds(fds: list[int], repeats: int, warmup: int = 1) -> list[float]:
    """As measure_floor, for the fds given (of any kind: a pty's, a FIFO's), which
    stay the caller's to close."""
    n = len(fds)
    batches = [fds[i:i + MAX_FDS_PER_MSG] for i in range(0, n, MAX_FDS_PER_MSG)]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = None
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD, str(theirs.fileno()), str(n)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        ours.settimeout(TIMEOUT)
        send_fds, perf = socket.send_fds, time.perf_counter
        samples = []
        for run in range(warmup + repeats):
            started = perf()
            for batch in batches:
                send_fds(ours, [b"F"], batch)
            ack = ours.recv(1)
            elapsed = perf() - started
            if ack != b"k":
                raise RuntimeError(f"child gave {ack!r} instead of an ack")
            if run >= warmup:
                samples.append(elapsed)
        return samples
    except (OSError, RuntimeError) as e:
        err = b""
        if child is not None:
            child.kill()
            err = child.communicate(timeout=5)[1]
        raise RuntimeError(f"floor of {n} fds: {e}; child: {err.decode(errors='replace').strip()}") from e
    finally:
        ours.close()
        theirs.close()
        if child is not None and child.poll() is None:
            try:
                child.wait(TIMEOUT)  # EOF on its socket: it exits 0
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if child is not None and child.stderr:
            child.stderr.close()


def main(argv: list[str]) -> int:
    repeats = int(argv[0]) if argv else 20
    print(f"kernel floor: SCM_RIGHTS to a live child, {repeats} repeats, median (min..max)")
    for n in (1, 10, 100, 1000, 5000):
        s = measure_floor(n, repeats)
        print(f"  n={n:5d}  {statistics.median(s) * 1e3:9.3f} ms"
              f"  ({min(s) * 1e3:.3f}..{max(s) * 1e3:.3f})"
              f"  {statistics.median(s) / n * 1e6:7.3f} us/fd")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
