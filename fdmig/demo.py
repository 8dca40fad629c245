"""`fdmig demo`: a live handoff you can watch. An instance with an echo chardev, a
peer streaming numbered records through it, and several live migrations to fresh
processes; then a summary. Exit 1 if a single record was lost, doubled or reordered.

The peer runs in a process of its own (PeerProcess): in the demo's, the live view
and the migrations' own work would add their pauses to what it measures, and a
peer elsewhere sees none of those."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

RECORD = 16  # b"%015d\n"
WINDOW = 256  # records in flight: the peer keeps the pipe busy without flooding it


class Peer:
    """Streams numbered records to the echo chardev and checks what comes back."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.pid = os.getpid()
        self.sent = 0  # records handed to sendall(): counted before, so echoed <= sent always
        self.echoed = 0
        self.bad: str | None = None
        self.longest_pause = 0.0  # of the whole run
        self._window_pause = 0.0  # since the last take_pause()
        self.eof = False
        self._room = threading.Semaphore(WINDOW)
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._closing = False
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def start(self):
        for thread in self._threads:
            thread.start()

    def _send(self):
        while not self._stop.is_set():
            if not self._room.acquire(timeout=0.1):
                continue
            record = self.sent
            self.sent = record + 1  # before sendall: the echo may be back before it returns
            try:
                self.sock.sendall(b"%015d\n" % record)
            except OSError as exc:
                self.bad = self.bad or f"send failed: {exc}"
                return

    def _receive(self):
        buf = b""
        last = time.monotonic()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                self._ended(bad=f"receive failed: {exc}")
                return
            now = time.monotonic()
            if not data:
                self._ended(eof=True)
                return
            if not self._stop.is_set() or self.echoed < self.sent:
                with self._progress:
                    self._window_pause = max(self._window_pause, now - last)
                    self.longest_pause = max(self.longest_pause, now - last)
            last = now
            buf += data
            while len(buf) >= RECORD:
                record, buf = buf[:RECORD], buf[RECORD:]
                if record != b"%015d\n" % self.echoed:
                    self._ended(bad=f"expected record {self.echoed}, got {record!r}")
                    return
                self.echoed += 1
                self._room.release()
            with self._progress:
                self._progress.notify_all()

    def counts(self) -> tuple[int, int]:
        """(sent, echoed) as one moment's view: echoed read first, since it never
        passes sent and sent only grows."""
        echoed = self.echoed
        return self.sent, echoed

    def reset_pauses(self) -> None:
        with self._progress:
            self.longest_pause = self._window_pause = 0.0

    def take_pause(self) -> float:
        """The longest pause since the last call (or reset_pauses), in seconds."""
        with self._progress:
            pause, self._window_pause = self._window_pause, 0.0
            return pause

    def wait_echo(self, beyond: int, timeout: float) -> None:
        """Until a record after the first `beyond` has come back (the stream runs
        again), the stream has broken, or `timeout`."""
        with self._progress:
            self._progress.wait_for(lambda: self.echoed > beyond or self.bad is not None or self.eof, timeout)

    def _ended(self, bad: str | None = None, eof: bool = False) -> None:
        with self._progress:
            # Our own shutdown in finish() ends recv() too; that is not the peer's EOF or error.
            if not self._closing:
                self.bad = self.bad or bad
                self.eof = self.eof or eof
            self._progress.notify_all()

    def finish(self, timeout: float = 10.0) -> None:
        """Stops sending, waits until every record sent has come back (or the stream broke), closes."""
        self._stop.set()
        self._threads[0].join(timeout)
        with self._progress:
            self._progress.wait_for(lambda: self.echoed >= self.sent or self.bad is not None or self.eof,
                                    timeout)
            self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone: the receiver has ended on its own
        self._threads[1].join(timeout)
        self.sock.close()


class PeerProcess:
    """A Peer in a child process, asked over its stdin and stdout, one JSON line
    each way; the same questions the demo asks a Peer."""

    def __init__(self, path: str):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import sys; sys.path.insert(0, {root!r}); from fdmig.demo import serve_peer; serve_peer(sys.argv[1])"
        self._proc = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.pid = self._proc.pid
        self._last = self._ask("state")  # connected, and streaming

    def _ask(self, *command) -> dict:
        self._proc.stdin.write(" ".join(map(str, command)) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the demo's peer (pid {self.pid}) exited with status {self._proc.wait()}")
        self._last = json.loads(line)
        return self._last

    sent = property(lambda self: self._last["sent"])
    echoed = property(lambda self: self._last["echoed"])
    bad = property(lambda self: self._last["bad"])
    eof = property(lambda self: self._last["eof"])
    longest_pause = property(lambda self: self._last["longest"])

    def counts(self) -> tuple[int, int]:
        state = self._ask("state")
        return state["sent"], state["echoed"]

    def reset_pauses(self) -> None:
        self._ask("reset")

    def take_pause(self) -> float:
        return self._ask("take")["pause"]

    def wait_echo(self, beyond: int, timeout: float) -> None:
        self._ask("wait", beyond, timeout)

    def finish(self) -> None:
        self._ask("finish")
        self._proc.stdin.close()
        self._proc.wait(10)

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def serve_peer(path: str) -> None:
    """The child of PeerProcess: a Peer on `path`, answering on stdout what stdin asks."""
    peer = Peer(path)
    peer.start()
    for line in sys.stdin:
        command, *args = line.split()
        reply = {}
        if command == "reset":
            peer.reset_pauses()
        elif command == "take":
            reply["pause"] = peer.take_pause()
        elif command == "wait":
            peer.wait_echo(int(args[0]), float(args[1]))
        elif command == "finish":
            peer.finish()
        sent, echoed = peer.counts()
        reply.update(sent=sent, echoed=echoed, bad=peer.bad, eof=peer.eof, longest=peer.longest_pause)
        print(json.dumps(reply), flush=True)
        if command == "finish":
            return


def run(migrations: int) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    instances = _Instances()
    peer = None
    try:
        peer, pid = _start_stream(instances)
        view = _View(instances.app, peer)
        view.add_start(pid)
        downtimes = []
        with Live(view.frame(), console=console, auto_refresh=False, transient=False) as live:
            for n in range(1, migrations + 1):
                for _ in range(3):  # let the stream run between handoffs, so pauses show
                    time.sleep(0.1)
                    live.update(view.frame(), refresh=True)
                outcome = _migrate_once(instances, peer)
                downtimes.append(outcome["downtime-ms"])
                view.add_migration(n, outcome)
                live.update(view.frame(), refresh=True)
                if peer.bad or peer.eof:
                    break
        peer.finish()
        return _print_summary(console, peer, downtimes)
    except Exception as exc:
        console.print(f"[red]demo failed: {exc}[/red] (instance logs: {instances.log.name})")
        return 1
    finally:
        if peer is not None:
            peer.kill()
        instances.close()


class _Instances:
    """A private working directory and the fdmig processes the demo starts in it.
    close() ends them and removes the directory."""

    def __init__(self):
        from fdmig import migrate_client

        self.workdir = tempfile.mkdtemp(prefix="fdmig-demo-")
        os.chmod(self.workdir, 0o700)
        self.env = dict(os.environ, FDMIG_RUNTIME_DIR=os.path.join(self.workdir, "run"))
        # The instances are ours, not a service manager's: they must not notify it.
        self.env.pop("NOTIFY_SOCKET", None)
        self.control = os.path.join(self.workdir, "run", "demo.sock")
        self.channel = os.path.join(self.workdir, "run", "demo.migrate.sock")
        self.app = os.path.join(self.workdir, "app.sock")
        self.log = open(os.path.join(self.workdir, "instances.log"), "w")
        self._fdmig = migrate_client.fdmig_command()
        self._procs = []

    def start(self, *args) -> subprocess.Popen:
        # A session of their own: a ^C at the terminal reaches only the demo,
        # whose close() then ends them.
        proc = subprocess.Popen(self._fdmig + list(args), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=self.log, stderr=self.log, start_new_session=True)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _start_stream(instances: _Instances) -> tuple[PeerProcess, int]:
    """Starts the first instance and a peer streaming through it, in a process of
    its own: (peer, the instance's pid)."""
    from fdmig import qmp

    instances.start("serve", "--name", "demo", "--capability", "local-char-socket", "--chardev",
                    f"socket,id=app,path={instances.app},server=on,frontend=echo,support-local-migration=on")
    _wait_for(lambda: os.path.exists(instances.app) and _answers(instances.control), 10)
    peer = PeerProcess(instances.app)
    with qmp.connect(instances.control) as client:
        pid = client.execute("x-fdmig-status")["pid"]
    time.sleep(0.2)  # warm up, then count pauses only from a running stream
    peer.reset_pauses()
    return peer, pid


def _migrate_once(instances: _Instances, peer: PeerProcess) -> dict:
    """Hands the chardev to a fresh instance; migrate-out's outcome."""
    from fdmig import migrate_client, paths

    instances.start("migrate-in", "--name", "demo")
    peer.take_pause()  # this row's pause is this migration's, not the run's so far
    channel = paths.ChannelAddress(path=instances.channel)
    outcome = migrate_client.migrate_out(instances.control, channel, (), 30.0, False, ["--name", "demo"])
    # The pause ends with the first echo from the target, which may
    # come after migrate-out has returned.
    peer.wait_echo(peer.counts()[1], 5.0)
    return outcome


class _View:
    """The live view: a row per handoff, under it the stream as it is now."""

    def __init__(self, app: str, peer: PeerProcess):
        self._app = app
        self._peer = peer
        self._rows = []
        self._serving_pid = None

    def add_start(self, pid: int) -> None:
        self._serving_pid = pid
        self._rows.append(("0", "-", str(pid), "-", *map(str, self._peer.counts()), "-"))

    def add_migration(self, n: int, outcome: dict) -> None:
        self._serving_pid = outcome["target-pid"]
        self._rows.append((str(n), str(outcome["source-pid"]), str(outcome["target-pid"]),
                           f"{outcome['downtime-ms']:.2f}", *map(str, self._peer.counts()),
                           f"{self._peer.take_pause() * 1000:.2f}"))

    def frame(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"fdmig demo: live handoff of chardev app (server unix:{self._app}, echo, "
                            "support-local-migration)", title_justify="left")
        for column in ("#", "from pid", "to pid", "downtime ms", "records sent", "echoed", "longest pause ms"):
            table.add_column(column, justify="right")
        for row in self._rows:
            table.add_row(*row)
        sent, echoed = self._peer.counts()
        now = Text(f"peer pid {self._peer.pid} streaming to pid {self._serving_pid}: {sent} records sent, "
                   f"{echoed} echoed, longest pause so far {self._peer.longest_pause * 1000:.2f} ms", style="dim")
        return Group(table, now)


def _print_summary(console, peer: PeerProcess, downtimes: list) -> int:
    """Prints the verdict; the exit code: 1 if a record was lost or the stream broke."""
    console.print()
    lost = peer.sent - peer.echoed
    ok = peer.bad is None and not peer.eof and lost == 0
    console.print(
        f"[bold]{'OK' if ok else 'FAILED'}[/bold]: {len(downtimes)} live migration(s); "
        f"records sent {peer.sent}, echoed {peer.echoed}, lost {lost}; "
        f"longest pause the peer saw {peer.longest_pause * 1000:.2f} ms; downtime per migration "
        f"(ms): {', '.join(f'{d:.2f}' for d in downtimes)}")
    if peer.bad:
        console.print(f"[red]{peer.bad}[/red]")
    if peer.eof:
        console.print("[red]the peer saw EOF: its connection was dropped[/red]")
    return 0 if ok else 1


def _answers(path: str) -> bool:
    from fdmig import paths
    return paths.socket_owner_pid(path) is not None


def _wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo instance did not start")
        time.sleep(0.02)
