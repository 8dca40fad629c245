"""Handoff downtime with N connected chardevs, each with a live echo peer, as the
instance reports it and as the peers see it; and the reconnect baseline (a plain
restart, the alternative users have today)."""

import collections
import gc
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time

from tests.bench import raise_nofile
from tests.helpers import FDMIG, Notify

RECORD = 16
PROBES = 8  # peers that stream ping-pong and time their longest pause
STATUS_WINDOWS = 9  # windows of three status calls, each beside one with none (a median of few moved by ms)


class Probes:
    """A few peers doing back-to-back ping-pong through the echo chardevs, each
    timing the longest gap between two answers. They run in a forked process of
    their own: in ours, the GIL would add its own pauses to what they measure."""

    def __init__(self, socks):
        self.socks = socks
        self._ctl, child_end = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            self._ctl.close()
            try:
                in_child(self.loop, socks, child_end)
            finally:
                os._exit(0)
        child_end.close()

    @staticmethod
    def loop(socks, ctl) -> None:
        _probe_loop(socks, ctl)

    def _ask(self, command: bytes, timeout: float = 60.0) -> str:
        self._ctl.settimeout(timeout)
        self._ctl.sendall(command)
        reply = self._ctl.recv(256).decode()
        if reply.startswith("error"):
            raise RuntimeError(reply)
        return reply

    def window(self):
        """Start timing; the returned callable ends it and gives the longest gap (s),
        and leaves in `gap` when it began and ended (time.monotonic(), any process's)."""
        self._ask(b"w")

        def done() -> float:
            longest, began, ended = map(float, self._ask(b"d").split())
            self.gap = (began, ended)
            return longest
        return done

    def wait_answers(self, count: int) -> None:
        """Until every probe has had `count` more answers (the target serves them)."""
        self._ask(b"a%d" % count)

    def stop(self) -> None:
        try:
            self._ctl.sendall(b"q")
        except OSError:
            pass
        os.waitpid(self.pid, 0)


def in_child(loop, *args) -> None:
    """A probes' loop, in the forked child. Its collector off: the child holds a
    copy of the whole harness's heap, and a full collection walking it would be
    a pause of the probes' own, counted as the instance's."""
    gc.disable()
    loop(*args)


class ProbeControl:
    """The probes' end of Probes' control protocol: `w` opens a window, `d` closes
    it and answers the longest gap between two answers of one probe in it, `aN`
    answers once every probe has had N more answers, `q` quits; an error is the
    answer to whatever comes next."""

    def __init__(self, ctl, keys):
        self.ctl = ctl
        self.answers = dict.fromkeys(keys, 0)
        self.last = dict.fromkeys(keys, time.monotonic())
        self.longest, self.measuring, self.waiting, self.error = 0.0, False, None, None
        self.gap = (0.0, 0.0)

    def command(self) -> bool:
        """Take one command; False to quit."""
        command = self.ctl.recv(64)
        if command in (b"", b"q"):
            return False
        if self.error:
            self.ctl.sendall(f"error: {self.error}".encode())
        elif command == b"w":
            self.longest, self.measuring, self.gap = 0.0, True, (0.0, 0.0)
            self.ctl.sendall(b"ok")
        elif command == b"d":
            self.measuring = False
            self.ctl.sendall(f"{self.longest!r} {self.gap[0]!r} {self.gap[1]!r}".encode())
        elif command.startswith(b"a"):
            self.waiting = (int(command[1:]), dict(self.answers))
        return True

    def answered(self, key, since: float | None = None) -> int:
        """A probe's answer came: counted and timed (from its last answer, or from
        `since`); its number."""
        now = time.monotonic()
        began = self.last[key] if since is None else since
        self.answers[key] += 1
        if self.measuring and now - began > self.longest:
            self.longest, self.gap = now - began, (began, now)
        self.last[key] = now
        return self.answers[key]

    def settle(self) -> None:
        """Answer an `aN` once it holds (or the error)."""
        if self.waiting is None:
            return
        count, base = self.waiting
        if self.error:
            self.ctl.sendall(f"error: {self.error}".encode())
            self.waiting = None
        elif all(self.answers[key] - base[key] >= count for key in base):
            self.ctl.sendall(b"ok")
            self.waiting = None


def _probe_loop(socks, ctl) -> None:
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    pending = dict.fromkeys(by_fd, b"")
    control = ProbeControl(ctl, by_fd)
    for fd, sock in by_fd.items():
        sock.setblocking(False)
        poller.register(fd, select.EPOLLIN)
        sock.send(b"%015d\n" % 0)
    poller.register(ctl.fileno(), select.EPOLLIN)
    while True:
        for fd, _ in poller.poll(0.05):
            if fd == ctl.fileno():
                if not control.command():
                    return
                continue
            try:
                data = by_fd[fd].recv(4096)
            except OSError as exc:
                data, control.error = b"", f"a peer's connection failed: {exc}"
            if not data:
                control.error = control.error or "a peer saw EOF"
                poller.unregister(fd)
                continue
            pending[fd] += data
            while len(pending[fd]) >= RECORD:
                record, pending[fd] = pending[fd][:RECORD], pending[fd][RECORD:]
                if record != b"%015d\n" % control.answers[fd]:
                    control.error = f"record {control.answers[fd]} came back as {record!r}"
                    break
                seq = control.answered(fd)
                try:
                    by_fd[fd].send(b"%015d\n" % seq)
                except OSError as exc:
                    control.error = f"a peer's connection failed: {exc}"
        control.settle()


class Streaming(Probes):
    """Peers that stream: each writes a record every STREAM_INTERVAL whatever comes
    back, as a client sending a feed does, and times the longest any record waited
    for its echo (from its send to the read that completed it). Unlike ping-pong,
    such a peer has bytes on the wire whenever the connection stops, and what it
    does about their loss shows: a record dropped in the move waits for the
    peer's retransmission."""

    @staticmethod
    def loop(socks, ctl) -> None:
        _stream_loop(socks, ctl)


STREAM_INTERVAL = 0.01


def _stream_loop(socks, ctl) -> None:
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    control = ProbeControl(ctl, by_fd)
    # Per peer: bytes sent and echoed, what was sent and has not come back (to
    # check the echo against), and (bytes sent by then, when) for each record
    # whose echo has not come yet.
    sent, echoed = dict.fromkeys(by_fd, 0), dict.fromkeys(by_fd, 0)
    owed = {fd: bytearray() for fd in by_fd}
    unanswered = {fd: collections.deque() for fd in by_fd}
    for fd, sock in by_fd.items():
        sock.setblocking(False)
        poller.register(fd, select.EPOLLIN)
    poller.register(ctl.fileno(), select.EPOLLIN)
    # The peers' writes spread evenly over the interval: some record is always
    # as fresh as a fraction of it, so the longest wait sees the whole stop.
    start = time.monotonic()
    next_write = {fd: start + i * STREAM_INTERVAL / len(by_fd) for i, fd in enumerate(by_fd)}
    while True:
        now = time.monotonic()
        for fd, sock in by_fd.items():
            if now < next_write[fd]:
                continue
            # No burst to catch up, and each peer keeps its place in the interval.
            next_write[fd] += STREAM_INTERVAL * (1 + (now - next_write[fd]) // STREAM_INTERVAL)
            record = b"%015d\n" % control.answers[fd]
            try:
                count = sock.send(record)
            except BlockingIOError:
                continue  # its window is full: the next interval tries again
            except OSError as exc:
                control.error = control.error or f"a peer's connection failed: {exc}"
                continue
            sent[fd] += count
            owed[fd] += record[:count]
            unanswered[fd].append((sent[fd], now))
        for fd, _ in poller.poll(max(0.0, min(next_write.values()) - time.monotonic())):
            if fd == ctl.fileno():
                if not control.command():
                    return
                continue
            try:
                data = by_fd[fd].recv(65536)
            except OSError as exc:
                data, control.error = b"", control.error or f"a peer's connection failed: {exc}"
            if not data:
                control.error = control.error or "a peer saw EOF"
                poller.unregister(fd)
                continue
            if owed[fd][:len(data)] != data:
                control.error = control.error or f"a streaming peer's echo came back as {data[:32]!r}"
            del owed[fd][:len(data)]
            echoed[fd] += len(data)
            waiting, oldest = unanswered[fd], None
            while waiting and waiting[0][0] <= echoed[fd]:
                _, when = waiting.popleft()
                oldest = when if oldest is None else oldest
            if oldest is not None:  # the oldest record it completed waited longest
                control.answered(fd, oldest)
        control.settle()


def stop_all(procs) -> None:
    """SIGTERM to every process still running, then wait for each (SIGKILL after 20 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_instance(args, workdir, env):
    """An instance, once ready; its log kept apart, and shown if it fails to start."""
    notify = Notify(workdir)
    log_path = os.path.join(workdir, f"instance-{len(os.listdir(workdir))}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(FDMIG + args, env=dict(env, NOTIFY_SOCKET=notify.path),
                                stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    try:
        notify.wait_for("READY", "1", timeout=120)
    except TimeoutError:
        with open(log_path, errors="replace") as log:
            raise RuntimeError(f"the instance did not start: {log.read()[-2000:]}") from None
    finally:
        notify.close()
    return proc


def measure_handoff(n: int, repeats: int, workdir: str, busy: bool = False, status: bool = False,
                    streams: int = PROBES, where: bool = False) -> dict:
    """Median-ready samples: instance downtime, peer pause, migrate-out wall (seconds),
    the peers' longest pause over as long a window with no handoff, and the RSS of
    the instance holding the N chardevs. `streams` of the peers stream ping-pong and
    time their pauses, the others idle; `busy`: every one does, so every chardev has
    changed since the precopy: the worst case. `status`: also the peers' longest
    pause over windows with three `x-fdmig-status` calls each. `where`: also, for
    each handoff timed over QMP, what the instances were doing during its longest
    pause (fdmig.marks; off otherwise, so that marking is not in the figures)."""
    raise_nofile()
    marks_path = os.path.join(workdir, "marks")
    env = dict(os.environ, FDMIG_RUNTIME_DIR=os.path.join(workdir, "rt"))
    env.pop("FDMIG_FAULT", None)
    env.pop("FDMIG_MARKS", None)
    if where:
        env["FDMIG_MARKS"] = marks_path
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
    probes = Probes(peers if busy else peers[:: max(1, n // streams)][:streams])
    # "qmp-downtime": the downtimes of the handoffs over QMP alone, one beside each "pause".
    result = {"n": n, "streams": len(probes.socks), "downtime": [], "qmp-downtime": [], "pause": [], "wall": [],
              "rss": None,
              "quiet-pause": [], "status-pause": [], "status-quiet-pause": [], "status-parse": [], "where": []}
    gaps = []
    channel = os.path.join(env["FDMIG_RUNTIME_DIR"], "bench.migrate.sock")
    try:
        control = os.path.join(env["FDMIG_RUNTIME_DIR"], "bench.sock")
        for _ in range(STATUS_WINDOWS if status else 0):
            # Three status calls, then a window as long with none: a status of thousands
            # spreads over many turns of the loop, and a longer window alone would show
            # a longer pause.
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(control)
                _read_lines(client, 1)  # the greeting
                client.sendall(b'{"execute": "qmp_capabilities"}\n')
                _read_lines(client, 1)
                done = probes.window()
                started = time.monotonic()
                for _ in range(3):
                    client.sendall(b'{"execute": "x-fdmig-status"}\n')
                    reply = _read_lines(client, 1)
                took = time.monotonic() - started
                result["status-pause"].append(done())
            reply = bytes(reply)
            started = time.process_time()
            json.loads(reply)
            result["status-parse"].append(time.process_time() - started)
            done = probes.window()
            time.sleep(took)  # the measuring interval itself
            result["status-quiet-pause"].append(done())
        for i in range(2 * repeats):
            time.sleep(0.05)  # the stream runs between handoffs, as in life
            target = subprocess.Popen(FDMIG + ["migrate-in", "--name", "bench"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(target)
            if i % 2:
                # The CLI as a user runs it: its wall time includes its own start-up.
                started = time.monotonic()
                out = subprocess.run(FDMIG + ["migrate-out", "--name", "bench", "--json", "--timeout", "60"],
                                     env=env, capture_output=True, text=True, timeout=120)
                result["wall"].append(time.monotonic() - started)
                if out.returncode != 0:
                    raise RuntimeError(f"migrate-out failed: {out.stderr.strip()}")
                result["downtime"].append(json.loads(out.stdout)["downtime-ms"] / 1000)
            else:
                # Over QMP from here, with the target already waiting: the window in
                # which the probes time their pause holds the handoff and nothing else.
                _wait_path(channel)
                downtime, pause, took = _migrate_over_qmp(control, channel, target.pid, probes)
                gaps.append(probes.gap)
                result["pause"].append(pause)
                result["downtime"].append(downtime)
                result["qmp-downtime"].append(downtime)
                # What the peers see with no handoff, over a window as long: the
                # longest gap of a longer window is longer, handoff or not.
                done = probes.window()
                time.sleep(took)  # the measuring interval itself
                result["quiet-pause"].append(done())
        status = subprocess.run(FDMIG + ["status", "--name", "bench", "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        result["rss"] = json.loads(status.stdout)["rss-bytes"]
    finally:
        probes.stop()
        stop_all(procs)
        for peer in peers:
            peer.close()
        listener.close()
    result["where"] = [what_ran(marks_path, gap) for gap in gaps] if where else []
    result["marked"] = sorted({name for _, _, _, name in _spans(marks_path)}) if where else []
    return result


def _spans(marks_path: str):
    """(begin, end, pid, name) of each span in a marks file (fdmig.marks)."""
    try:
        with open(marks_path) as marks:
            for line in marks:
                begin, end, pid, name = line.rstrip("\n").split(" ", 3)
                yield float(begin), float(end), int(pid), name
    except FileNotFoundError:
        return


def what_ran(marks_path: str, gap: tuple[float, float]) -> dict:
    """The longest pause of a handoff laid against the instances' spans
    (fdmig.marks): how long it was, and for each span's name, how much of it
    the span covered (ms), largest first."""
    began, ended = gap
    covered: dict[str, float] = {}
    for start, end, _, name in _spans(marks_path):
        overlap = min(end, ended) - max(start, began)
        if overlap > 0:
            covered[name] = covered.get(name, 0.0) + overlap * 1000
    return {"gap-ms": round((ended - began) * 1000, 3),
            "spans": {name: round(ms, 3) for name, ms in sorted(covered.items(), key=lambda item: -item[1])}}


def _read_lines(sock: socket.socket, count: int) -> memoryview:
    """Read `count` lines of QMP, whole but not parsed, into one buffer made once
    (fresh buffers are page faults: milliseconds of a 2 MB reply); the last line,
    a view of that buffer, good until the next call.
    The status calls are timed so: what the instance does for them, not the
    client's JSON parsing, which is timed apart (on a 2-CPU machine whose CPUs
    serve and probe, a client's CPU shows in the peers' pause too)."""
    buf = _READ_BUF
    view, filled, lines = memoryview(buf), 0, 0
    while lines < count:
        if filled == len(buf):
            raise RuntimeError(f"a reply longer than {len(buf)} bytes")
        got = sock.recv_into(view[filled:])
        if not got:
            raise EOFError("the instance closed the control connection")
        lines += buf.count(b"\n", filled, filled + got)
        filled += got
    return view[buf.rfind(b"\n", 0, filled - 1) + 1: filled]


_READ_BUF = bytearray(64 << 20)


def _wait_path(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)  # the target binds its channel as it starts


def _migrate_over_qmp(control: str, channel: str, target_pid: int, probes: Probes) -> tuple[float, float, float]:
    """Migrate, wait until the target answers on the control path. The target's
    downtime, the probes' longest pause and how long they were timed (s), around
    the migration alone: a status query of thousands of chardevs is a pause of its own."""
    from fdmig import migrate_client, qmp
    with qmp.connect(control) as client:
        source_pid = client.execute("x-fdmig-status")["pid"]
        done = probes.window()
        began = time.monotonic()
        client.execute("migrate", {"uri": f"unix:{channel}", "x-fdmig-timeout": 60})
        while True:
            status = client.wait_event({"MIGRATION"}, time.monotonic() + 60)["data"]["status"]
            if status in ("completed", "failed", "cancelled"):
                break
    if status != "completed":
        raise RuntimeError(f"migration {status}")
    probes.wait_answers(2)  # served by the target
    pause, took = done(), time.monotonic() - began
    state = migrate_client.wait_target(control, source_pid, time.monotonic() + 30)
    assert state["pid"] == target_pid
    return state["migration"]["downtime-ms"] / 1000, pause, took


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
