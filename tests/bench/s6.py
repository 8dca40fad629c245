"""s6-fdholder as a baseline: the time to move n held fds from one fd-holding
daemon to another with skarnet's own tools.

Two s6-fdholderd daemons, A and B, on Unix sockets under workdir, with a rules
directory giving this uid every right. A is filled once (untimed) with n socket
fds by s6-fdholder-setdump runs of at most 253 fds each, whose environment
describes them (S6_FD#, S6_FD_i, S6_FDID_i). Each timed run starts an empty B
(untimed), then times one tool run that retrieves all of A and stores all of it
into B:

- "transferdump":  s6-fdholder-transferdump A B
- "getdump+setdump": s6-fdholder-getdump A s6-fdholder-setdump B

and checks (untimed) with s6-fdholder-list that B holds the n identifiers.
The time includes starting the tool (fork+exec), as it would in a script.

Where Debian's s6 (2.11.3.2, libskarnet 2.13.1.1) breaks, seen here: its fd
messages hold up to 255 fds (skalibs' UNIXMESSAGE_MAXFDS) but the kernel takes at
most 253 per sendmsg (SCM_MAX_FD), so from 254 fds on
- getdump (so transferdump and getdump+setdump): s6-fdholderd's sendmsg of the
  first 254..255 fds fails EINVAL, it drops the client, and the tool exits 1 with
  "fatal: unable to get dump: Broken pipe". The daemon lives on, still holding.
- a single setdump of 254+ fds: the tool's own sendmsg fails EINVAL, exit 1,
  "s6-fdholder-setdump: fatal: unable to set dump: Invalid argument".
measure_s6 then returns ok False with that in "error"; it never hangs.

    python -m tests.bench.s6            # medians for n in 1, 10, 100, 253, 1000, 5000
    python -m tests.bench.s6 probe      # where it breaks: 1 10 100 253 254 255 256 1000 5000
"""

import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from tests.bench import raise_nofile

METHODS = {
    "transferdump": lambda a, b, ms: ["s6-fdholder-transferdump", "-t", f"{ms}:{ms}", a, b],
    "getdump+setdump": lambda a, b, ms: ["s6-fdholder-getdump", "-t", str(ms), a,
                                         "s6-fdholder-setdump", "-t", str(ms), b],
}
ID_PREFIX = "bench:"
TOOL_TIMEOUT = 20.0  # seconds for any one subprocess; never hang
CLIENT_MS = 10_000  # the tools' own -t, and the daemons' -t for idle clients
READY_TIMEOUT = 5.0
SUN_PATH_MAX = 107
# Populate in setdumps of at most this many fds: Debian's s6 2.11.3.2 on libskarnet
# 2.13.1.1 sends a whole setdump of up to 255 fds in one sendmsg, which the kernel
# (SCM_MAX_FD = 253) refuses with EINVAL from 254 fds on.
SETDUMP_CHUNK = 253


# What this baseline runs, all from Debian's package s6 (s6-fdholder-daemon execs
# into s6-fdholderd).
PROGRAMS = ("s6-fdholder-daemon", "s6-fdholderd", "s6-fdholder-setdump", "s6-fdholder-transferdump",
            "s6-fdholder-getdump", "s6-fdholder-list")


def available() -> bool:
    return all(shutil.which(p) for p in PROGRAMS)


def write_rules(rulesdir: str) -> None:
    """The rulesdir (s6 accessrules format, uid part) granting this uid everything
    s6-fdholderd can grant: connect (allow), store/delete and retrieve ids matching
    ^bench:, list, getdump, setdump."""
    uiddir = os.path.join(rulesdir, "uid", str(os.getuid()))
    os.makedirs(os.path.join(uiddir, "env"), exist_ok=True)
    os.makedirs(os.path.join(rulesdir, "gid"), exist_ok=True)
    open(os.path.join(uiddir, "allow"), "w").close()
    for name, value in (("S6_FDHOLDER_STORE_REGEX", f"^{ID_PREFIX}"),
                        ("S6_FDHOLDER_RETRIEVE_REGEX", f"^{ID_PREFIX}"),
                        ("S6_FDHOLDER_LIST", "1"),
                        ("S6_FDHOLDER_GETDUMP", "1"),
                        ("S6_FDHOLDER_SETDUMP", "1")):
        with open(os.path.join(uiddir, "env", name), "w") as f:
            f.write(value + "\n")


def _tail(text: str, limit: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class Daemon:
    """One s6-fdholder-daemon (which execs into s6-fdholderd, same pid)."""

    def __init__(self, path: str, rulesdir: str, maxfds: int, logdir: str):
        self.path = path
        self.log = os.path.join(logdir, os.path.basename(path) + ".log")
        self.proc = None
        for leftover in (path, path + ".lock"):
            if os.path.lexists(leftover):
                os.unlink(leftover)
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                ["s6-fdholder-daemon", "-1", "-v", "1", "-n", str(maxfds),
                 "-t", str(CLIENT_MS), "-T", "1000", "-i", rulesdir, path],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            poller = select.poll()  # not select(): fds here are often above 1023
            poller.register(self.proc.stdout, select.POLLIN)
            ready = poller.poll(READY_TIMEOUT * 1000)
            line = os.read(self.proc.stdout.fileno(), 1) if ready else b""
        except BaseException:
            self.stop()
            raise
        finally:
            self.proc.stdout.close()
        if line != b"\n":
            self.stop()
            raise RuntimeError(f"s6-fdholder-daemon {path} not ready "
                               f"(exit {self.proc.returncode}): {self.stderr()}")

    def stderr(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return _tail(f.read())
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for leftover in (self.path, self.path + ".lock"):
            try:
                os.unlink(leftover)
            except OSError:
                pass


class ToolError(RuntimeError):
    pass


def _run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run a tool to completion with a timeout; ToolError with exit code and stderr
    on failure."""
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=TOOL_TIMEOUT, **kw)
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"{what}: timed out after {TOOL_TIMEOUT:g}s: {' '.join(argv[:3])}...; "
                        f"stderr: {_tail((e.stderr or b'').decode(errors='replace'))}") from None
    if out.returncode != 0:
        raise ToolError(f"{what}: exit {out.returncode}: "
                        f"{_tail(out.stderr.decode(errors='replace')) or '(no stderr)'}")
    return out


def _count(path: str, what: str) -> int:
    out = _run(["s6-fdholder-list", "-t", str(CLIENT_MS), path], what)
    return sum(1 for line in out.stdout.splitlines() if line.startswith(ID_PREFIX.encode()))


def populate(path: str, fds: list[int], chunk: int = SETDUMP_CHUNK) -> float:
    """Store `fds` into the daemon on `path` with s6-fdholder-setdump runs of at most
    `chunk` fds each (a setdump adds to what the daemon holds); seconds taken.

    The tool takes its set from its fd table and environment, in the format
    s6-fdholder-getdump leaves: S6_FD#=n, S6_FD_i=fd, S6_FDID_i=id (no S6_FDLIMIT_i:
    no expiry). Ids are bench:0 .. bench:<n-1> whatever the chunking."""
    started = time.perf_counter()
    for first in range(0, len(fds), chunk):
        part = fds[first:first + chunk]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "S6_FD#": str(len(part))}
        for i, fd in enumerate(part):
            env[f"S6_FD_{i}"] = str(fd)
            env[f"S6_FDID_{i}"] = f"{ID_PREFIX}{first + i}"
        _run(["s6-fdholder-setdump", "-t", str(CLIENT_MS), path],
             f"populate (s6-fdholder-setdump of fds {first}..{first + len(part) - 1})",
             env=env, pass_fds=part)
    return time.perf_counter() - started


def measure_s6(n: int, repeats: int, workdir: str, method: str = "transferdump") -> dict:
    """Seconds per timed tool run moving n held socket fds from daemon A to an empty
    daemon B (see the module docstring for `method`).

    Returns {"n", "seconds", "method", "ok", "error", "populate_seconds"}: on any
    failure (populating, the timed tool, or B not holding n ids afterwards) ok is
    False, error says which step failed with the tool's exit code and stderr, and
    seconds holds the runs that succeeded before it. Daemons are killed on return.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}")
    result = {"n": n, "seconds": [], "method": method, "ok": False, "error": None,
              "populate_seconds": None}
    if not available():
        result["error"] = "s6-fdholder tools not found on PATH (Debian package s6)"
        return result
    limit = raise_nofile()
    if 2 * n + 64 > limit:
        result["error"] = f"n={n} needs {2 * n} fds in this process, RLIMIT_NOFILE is {limit}"
        return result

    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(os.path.abspath(workdir), f"s6-{n}")
    own_tmp = None
    if len(base) + 8 > SUN_PATH_MAX:  # sockets need short paths
        base = own_tmp = tempfile.mkdtemp(prefix="s6b-")
    os.makedirs(base, exist_ok=True)
    rulesdir = os.path.join(base, "rules")
    write_rules(rulesdir)
    maxfds = n + 16
    pairs = [socket.socketpair() for _ in range(n)]
    daemons = []
    step = "start daemon A"
    try:
        a = Daemon(os.path.join(base, "A"), rulesdir, maxfds, base)
        daemons.append(a)
        step = "populate A"
        result["populate_seconds"] = populate(a.path, [p.fileno() for p, _ in pairs])
        held = _count(a.path, "count A (s6-fdholder-list)")
        if held != n:
            raise ToolError(f"A holds {held} ids after populating, not {n}")
        for r in range(repeats):
            step = f"run {r + 1}: start daemon B"
            b = Daemon(os.path.join(base, f"B{r}"), rulesdir, maxfds, base)
            daemons.append(b)
            step = f"run {r + 1}"
            argv = METHODS[method](a.path, b.path, CLIENT_MS)
            started = time.perf_counter()
            _run(argv, method)
            elapsed = time.perf_counter() - started
            held = _count(b.path, "count B (s6-fdholder-list)")
            if held != n:
                raise ToolError(f"{method} exited 0 but B holds {held} ids, not {n}")
            result["seconds"].append(elapsed)
            b.stop()
            daemons.remove(b)
        result["ok"] = True
    except (ToolError, RuntimeError, OSError) as e:
        logs = "; ".join(f"{os.path.basename(d.path)} log: {d.stderr()}"
                         for d in daemons if d.stderr())
        result["error"] = f"{step}: {e}" + (f" [{logs}]" if logs else "")
    finally:
        for d in daemons:
            d.stop()
        for p, q in pairs:
            p.close()
            q.close()
        shutil.rmtree(own_tmp or base, ignore_errors=True)
    return result


def probe_setdump(n: int, workdir: str) -> dict:
    """One s6-fdholder-setdump of n fds into a fresh daemon (the populate step
    without chunking): {"n", "ok", "error"}."""
    result = {"n": n, "ok": False, "error": None}
    raise_nofile()
    base = tempfile.mkdtemp(prefix="s6p-", dir=workdir if len(workdir) < 80 else None)
    pairs = [socket.socketpair() for _ in range(n)]
    daemon = None
    try:
        write_rules(os.path.join(base, "rules"))
        daemon = Daemon(os.path.join(base, "A"), os.path.join(base, "rules"), n + 16, base)
        populate(daemon.path, [p.fileno() for p, _ in pairs], chunk=max(n, 1))
        held = _count(daemon.path, "count (s6-fdholder-list)")
        result["ok"] = held == n
        if held != n:
            result["error"] = f"setdump exited 0 but the daemon holds {held} ids, not {n}"
    except (ToolError, RuntimeError, OSError) as e:
        result["error"] = str(e)
    finally:
        if daemon is not None:
            daemon.stop()
        for p, q in pairs:
            p.close()
            q.close()
        shutil.rmtree(base, ignore_errors=True)
    return result


def _fmt(res: dict) -> str:
    s = res["seconds"]
    pop = res["populate_seconds"]
    pop = f"  populate {pop * 1e3:.1f} ms" if pop is not None else ""
    if res["ok"]:
        return (f"  n={res['n']:5d}  {statistics.median(s) * 1e3:9.3f} ms"
                f"  ({min(s) * 1e3:.3f}..{max(s) * 1e3:.3f}){pop}")
    return f"  n={res['n']:5d}  FAILED{pop}: {res['error']}"


def main(argv: list[str]) -> int:
    probe = bool(argv) and argv[0] == "probe"
    if probe:
        argv = argv[1:]
    repeats = int(argv[0]) if argv else (3 if probe else 10)
    sizes = (1, 10, 100, 253, 254, 255, 256, 1000, 5000) if probe else (1, 10, 100, 253, 1000, 5000)
    with tempfile.TemporaryDirectory(prefix="s6bench-") as workdir:
        if probe:
            print("s6-fdholder-setdump, all n fds in one run:")
            for n in sizes:
                res = probe_setdump(n, workdir)
                print(f"  n={n:5d}  " + ("ok" if res["ok"] else f"FAILED: {res['error']}"))
        for method in METHODS:
            print(f"s6-fdholder, {method}: A -> empty B, {repeats} repeats, median (min..max)")
            for n in sizes:
                started = time.monotonic()
                res = measure_s6(n, repeats, workdir, method)
                print(_fmt(res) + f"  [{time.monotonic() - started:.1f}s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
