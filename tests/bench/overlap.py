"""Restarting a server people run, under load: gunicorn (2 workers, --preload,
READY=1) restarted by `fdmig run --overlap`, by fdmig's stop-then-start, and by
Server::Starter (Debian's `start_server`, gunicorn bound with `--bind fd://3`),
on the same application and the same load.

Each is restarted the two ways its users do: by its command (`fdmig restart`,
`start_server --restart`), a process started for the restart, and by a process
already running (a QMP client's x-fdmig-restart; the HUP start_server's own
command sends). A row's ratio is against Server::Starter restarted the same way.
The cases take turns, one restart each, so drift on a shared machine falls on all.

The load comes from a process of its own (tests/services/load.py): a request
over a fresh connection every 10 ms, and one request of SLOW seconds in flight;
the restart comes RESTART_AT seconds into that one. gunicorn says READY=1
before its workers exist; `--ready-delay 1` has the new generation live a second
past it before the old one drains, as Server::Starter's default --interval does.
Reported for each: the longest of the fresh requests that began once the restart
was asked, and of those before it (the same server, no restart); the requests
that failed; how long the restart took (a command to its exit, a QMP request to
its answer; Server::Starter's HUP returns at once, so from the HUP to the first
request the new generation serves); and the same with a build that fails to
start (the import raises): the requests that failed then.

    python -m tests.bench.overlap [REPEATS]
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from fdmig import qmp
from tests.bench import compile_fdmig
from tests.helpers import FDMIG, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOW = 3.0  # the request in flight across the restart, seconds
RESTART_AT = 0.5  # seconds into it
AFTER = 1.5  # load goes on this long after the slow request ended
# The requests counted across a restart: those that began this long from it,
# whenever the command returned (start_server --restart waits out the drain).
WINDOW = SLOW - RESTART_AT + AFTER
INTERVAL = 0.01
# (row, server, `fdmig run` options, how the restart is asked)
CASES = (("fdmig run --overlap", "fdmig", ["--overlap"], "command"),
         ("fdmig run --overlap --ready-delay 1", "fdmig", ["--overlap", "--ready-delay", "1"], "command"),
         ("fdmig run --overlap --ready-delay 1, over QMP", "fdmig", ["--overlap", "--ready-delay", "1"], "running"),
         ("fdmig run (stop, then start)", "fdmig", [], "command"),
         ("Server::Starter, start_server --restart", "starter", None, "command"),
         ("Server::Starter, HUP", "starter", None, "running"))


def available() -> str | None:
    """Why this part cannot run here, or None."""
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        return "needs gunicorn (the test extra)"
    return None


def _gunicorn(*bind: str) -> list[str]:
    import gunicorn.config
    command = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--graceful-timeout", "30", *bind]
    if hasattr(gunicorn.config, "ControlSocketDisable"):
        command.append("--no-control-socket")
    return command + ["tests.services.drain_app:app"]


class _Load:
    """tests/services/load.py as a process of its own; its results once it ends."""

    def __init__(self, port: int, path: str = "/", interval: float = INTERVAL):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.services.load", str(port), path, str(interval)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.results: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.results.append(json.loads(line))

    def first_ok_by_other_than(self, master: str | None) -> float | None:
        """When (time.time()) a request served by another master than `master` ended first."""
        ends = [r["start"] + r["ms"] / 1000 for r in list(self.results)
                if r["ok"] and r["by"].split()[0] != master]
        return min(ends) if ends else None

    def stop(self) -> list[dict]:
        self.proc.stdin.close()
        self.proc.wait(80)
        self._reader.join(10)
        return self.results


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


class _Fdmig:
    def __init__(self, workdir: str, port: int, options: list[str], env: dict, asked: str):
        self.env = dict(env, FDMIG_RUNTIME_DIR=os.path.join(workdir, "rt"))
        self.asked = asked
        self.proc = subprocess.Popen(FDMIG + ["run", "--name", "bench", "--notify", *options, "--chardev",
                                              f"id=http,host=127.0.0.1,port={port},server=on", "--", *_gunicorn()],
                                     env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self) -> tuple[float, bool]:
        began = time.monotonic()
        if self.asked == "running":
            with qmp.connect(os.path.join(self.env["FDMIG_RUNTIME_DIR"], "bench.sock"), timeout=40) as client:
                ok = client.execute("x-fdmig-restart", {"timeout": 30})["status"] == "ready"
        else:
            ok = subprocess.run(FDMIG + ["restart", "--name", "bench", "--timeout", "30"], env=self.env,
                                capture_output=True, text=True).returncode == 0
        return time.monotonic() - began, ok

    def up(self) -> bool:
        return True  # it answered

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class _ServerStarter:
    def __init__(self, workdir: str, port: int, env: dict, asked: str):
        # start_server names the listener's fd in SERVER_STARTER_PORT (host:port=FD).
        command = _gunicorn("--bind", "fd://FD")
        shell = ('fd=${SERVER_STARTER_PORT##*=}; for a; do shift; set -- "$@" "${a/FD/$fd}"; done; exec "$@"')
        self.asked, self.env = asked, env
        self.status = os.path.join(workdir, "status")
        self.files = [f"--pid-file={os.path.join(workdir, 'pid')}", f"--status-file={self.status}"]
        self.proc = subprocess.Popen(["start_server", f"--port=127.0.0.1:{port}", *self.files, "--", "bash", "-c",
                                      shell, "gunicorn", *command], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def up(self) -> bool:
        # start_server writes its status file once a generation has lived --interval
        # (1 s); before that, `start_server --restart` fails without restarting.
        return os.path.exists(self.status)

    def restart(self) -> tuple[float | None, bool]:
        if self.asked == "running":
            self.proc.send_signal(signal.SIGHUP)
            return None, True
        # start_server --restart sends the HUP and returns once the status file names
        # the new generation alone: once the old one has drained and exited. A build
        # that never starts is retried for ever, so that wait is bounded here.
        began = time.monotonic()
        try:
            done = subprocess.run(["start_server", "--restart", *self.files], env=self.env, capture_output=True,
                                  timeout=SLOW + 5)
        except subprocess.TimeoutExpired:
            return time.monotonic() - began, False
        return time.monotonic() - began, done.returncode == 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def measure_once(case: tuple, workdir: str, broken: bool = False) -> dict:
    """One restart of `case` (a row of CASES) under load; with `broken`, of a build that fails."""
    port = free_port()
    begun = os.path.join(workdir, "begun")
    os.makedirs(begun, exist_ok=True)
    flag = os.path.join(workdir, "broken")
    env = dict(os.environ, DRAIN_APP_BEGUN=begun, DRAIN_APP_BROKEN=flag)
    _, kind, options, asked = case
    server = _ServerStarter(workdir, port, env, asked) if kind == "starter" else \
        _Fdmig(workdir, port, options, env, asked)
    try:
        probe = _Load(port, interval=0.05)
        _wait(lambda: any(r["ok"] for r in probe.results), 30, "the server to answer")
        first = next(r for r in probe.results if r["ok"])["by"].split()[0]
        probe.stop()
        _wait(server.up, 30, "the server to be up")
        load = _Load(port)
        before = set(os.listdir(begun))
        slow = _Load(port, f"/slow?{SLOW:g}", interval=3600)
        _wait(lambda: set(os.listdir(begun)) != before, 20, "the slow request to begin")
        time.sleep(RESTART_AT)  # the restart comes this far into the slow request, as a deploy would
        if broken:
            open(flag, "w").close()
        hup_at = time.time()
        took, ok = server.restart()
        if not ok and not broken:
            raise RuntimeError(f"{case[0]}: the restart failed")
        _wait(lambda: slow.results, SLOW + 30, "the slow request to end")
        time.sleep(max(0.0, hup_at + WINDOW - time.time()))
        results = load.stop()
        slow.stop()
        served = load.first_ok_by_other_than(first)
        if served is None and not broken:
            raise RuntimeError(f"{case[0]}: no new generation served a request")
        if took is None and not broken:
            took = served - hup_at
    finally:
        server.stop()
        if os.path.exists(flag):
            os.unlink(flag)
    fresh = [r for r in results if r["ok"]]
    # Across the restart: the requests that began once it was asked. Those before
    # are the same server with no restart, and they include the start of the
    # benchmark's own slow-request process (tens of ms in some runs, either server).
    across = [r["ms"] for r in fresh if hup_at <= r["start"] < hup_at + WINDOW]
    before = [r["ms"] for r in fresh if r["start"] < hup_at]
    return {"longest-ms": max(across, default=None), "before-ms": max(before, default=None),
            "failed": len(results) - len(fresh),
            "requests": len(results), "restart-ms": None if took is None else round(took * 1000, 1),
            "restart-ok": ok, "slow-ok": bool(slow.results and slow.results[0]["ok"])}


def _cases() -> list[tuple]:
    return [case for case in CASES if case[1] != "starter" or shutil.which("start_server")]


def _baseline(row: dict, rows: list[dict]) -> dict | None:
    """Server::Starter's row restarted the way `row` was."""
    return next((r for r in rows if r["server"] == "starter" and r["asked"] == row["asked"]), None)


def measure(repeats: int, workdir: str) -> list[dict]:
    cases = _cases()
    runs = {case[0]: [] for case in cases}
    broken = {case[0]: [] for case in cases}
    # Round by round, so what the shared machine does meanwhile falls on every case alike.
    for _ in range(repeats):
        for case in cases:
            runs[case[0]].append(measure_once(case, tempfile.mkdtemp(dir=workdir)))
    # A broken build is about failed requests, which are counted, not a median.
    for _ in range(min(repeats, 3)):
        for case in cases:
            broken[case[0]].append(measure_once(case, tempfile.mkdtemp(dir=workdir), broken=True))
    rows = []
    for name, server, _, asked in cases:
        done, bad = runs[name], broken[name]
        restarts = [r["restart-ms"] for r in done if r["restart-ms"] is not None]
        rows.append({"case": name, "server": server, "asked": asked, "repeats": repeats,
                     "longest-ms": statistics.median(r["longest-ms"] for r in done),
                     "before-ms": statistics.median(r["before-ms"] for r in done),
                     "failed": sum(r["failed"] for r in done), "requests": sum(r["requests"] for r in done),
                     "restart-ms": statistics.median(restarts) if restarts else None,
                     "slow-ok": all(r["slow-ok"] for r in done),
                     "broken-failed": sum(r["failed"] for r in bad),
                     "broken-requests": sum(r["requests"] for r in bad),
                     "broken-longest-ms": statistics.median(r["longest-ms"] for r in bad)})
    return rows


def markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["### Restarting gunicorn under load", "",
             f"gunicorn (2 workers, `--preload`) serving tests/services/drain_app.py; a request over a fresh "
             f"connection every {INTERVAL * 1000:g} ms from a process of its own, and one of {SLOW:g} s in flight; "
             f"the restart {RESTART_AT:g} s into it (tests/bench/overlap.py). Medians of "
             f"{rows[0]['repeats']} restarts, the cases taking turns; failures summed over them. A broken build "
             f"(the application's import raises in the new generation): {min(rows[0]['repeats'], 3)} restarts.",
             "",
             "| restarted by | longest fresh request | vs Server::Starter asked alike | before the restart | failed "
             "| restart took | slow request served | broken build: failed | broken build: longest |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        base = _baseline(row, rows)
        versus = f"{row['longest-ms'] / base['longest-ms']:.1f}x" if base and base["longest-ms"] else "-"
        took = f"{row['restart-ms']:.0f} ms" if row["restart-ms"] is not None else "-"
        lines.append(f"| {row['case']} | {row['longest-ms']:.1f} ms | {versus} | {row['before-ms']:.1f} ms | "
                     f"{row['failed']} of "
                     f"{row['requests']} | {took} | {'yes' if row['slow-ok'] else 'no'} | "
                     f"{row['broken-failed']} of {row['broken-requests']} | {row['broken-longest-ms']:.1f} ms |")
    lines += ["", f"The longest fresh request is of those that began in the {WINDOW:g} s from the moment the "
              "restart was asked (its command started, its QMP request or HUP sent), whichever way it was; "
              "before the restart, of those before it (about half a second): the same server with no restart.",
              "", "A restart by a command is timed from the command's start to its exit (`fdmig restart` "
              "returns once the new generation is ready, `start_server --restart` once the old one has "
              "exited); one over QMP from the request to its answer; Server::Starter's HUP from the signal to "
              "the first request the new generation served. Every restart is checked to have been served by a "
              "new generation; Server::Starter is restarted only once its status file exists (before it, "
              "`start_server --restart` fails and restarts nothing)."]
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    why = available()
    if why:
        print(f"skipped: {why}", file=sys.stderr)
        return 0
    compile_fdmig()
    with tempfile.TemporaryDirectory(prefix="fdm-ov-", dir="/tmp") as workdir:
        rows = measure(int(argv[0]) if argv else 3, workdir)
    print("\n".join(markdown(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
