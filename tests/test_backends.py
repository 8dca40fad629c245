"""The other backends end to end (DESIGN "Other backends: pty, serial, pipe, udp,
file"), with real far ends: a program whose controlling terminal is a pty's
slave, the test's own pty pair standing for a serial line, FIFOs, a udp peer, a
file, socat on each, and a socket-activated service under `fdmig run`.

What a user would notice, each across live migrations (`migrate-out --spawn`):
the program on a pty gets no SIGHUP, no EIO, no EOF and keeps its path; a
console server bridged to the pty keeps its console; records stream through
each backend with none lost, doubled or reordered; a serial line is never hung
up and keeps the termios its user set; what waited in a FIFO arrives once; a
udp service keeps its port through restarts. Then the commands (attach, status,
query-chardev, detach) and the refusals a user meets."""

import asyncio
import json
import os
import select
import socket
import stat
import subprocess
import sys
import termios
import threading
import time
import tty

import psutil
import pytest
from qemu.qmp import QMPClient

from tests.helpers import (FDMIG, Stream, connect_unix, needs, read_exactly_fd, recv_exactly, run, status_of,
                           wait_status)

MARK = "support-local-migration=on"
LOOPBACK = "127.0.0.1"

pytestmark = pytest.mark.timeout(30)

# ----- programs on the far ends --------------------------------------------------------------

# Started in a session of its own (setsid), it opens the pty's slave without
# O_NOCTTY, which makes the slave its controlling terminal: were the master ever
# closed, the kernel would send it SIGHUP and its reads would fail (EIO) or end.
# It notes any of that in a file, and echoes each line it reads uppercased.
PTY_PROGRAM = r"""
import errno, json, os, signal, sys

slave, notes = sys.argv[1], sys.argv[2]

def note(what):
    with open(notes, "a") as f:
        f.write(what + "\n")

signal.signal(signal.SIGHUP, lambda *_: note("SIGHUP"))
tty = os.open(slave, os.O_RDWR)
__import__("tty").setraw(tty)  # raw, as a serial console's program makes its line
print(json.dumps({"pid": os.getpid(), "controlling": os.tcgetpgrp(tty) == os.getpgrp()}), flush=True)
pending = b""
while True:
    try:
        data = os.read(tty, 4096)
    except InterruptedError:
        continue
    except OSError as exc:
        note(errno.errorcode.get(exc.errno, str(exc.errno)))
        break
    if not data:
        note("EOF")
        break
    pending += data
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        os.write(tty, line.upper() + b"\n")
signal.pause()
"""

# A socket-activated service (fd 3, LISTEN_FDS=1): a udp socket whose datagrams
# it answers, or a pty's master whose lines it answers, each prefixed with its
# pid. It serves (and says READY=1) only once the test writes a byte into the
# gate FIFO, so the test decides when a restarted service may start reading.
SERVICE_PROGRAM = r"""
import os, socket, sys

gate, kind = sys.argv[1], sys.argv[2]
assert os.environ["LISTEN_PID"] == str(os.getpid()) and os.environ["LISTEN_FDS"] == "1"
if os.read(os.open(gate, os.O_RDONLY), 1) != b"g":
    sys.exit("the gate closed")
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
me = b"%d " % os.getpid()
if kind == "udp":
    sock = socket.socket(fileno=3)
    while True:
        sock.send(me + sock.recv(65536))
pending = b""
while True:
    pending += os.read(3, 4096)
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        os.write(3, me + line + b"\n")
"""

# ----- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def serve(daemons, last_instance):
    """serve(SPEC, ...): instance `web` holding these chardevs, capability
    local-char-socket on unless capability=False; waits for READY=1."""

    def start(*specs, capability=True, name="web"):
        args = ["serve", "--name", name]
        if capability:
            args += ["--capability", "local-char-socket"]
        for spec in specs:
            args += ["--chardev", spec]
        return daemons(*args)

    return start


@pytest.fixture
def processes():
    """Factory of far-end processes (socat, the pty program), each killed and reaped at teardown."""
    started = []

    def start(argv, **popen):
        popen.setdefault("stdin", subprocess.PIPE)
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(argv, **popen)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def fds():
    """fds(FD, ...): keeps the fds the test opens (and returns them) to close them at teardown."""
    opened = []

    def keep(*numbers):
        opened.extend(numbers)
        return numbers[0] if len(numbers) == 1 else numbers

    yield keep
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


# ----- helpers -------------------------------------------------------------------------------


def control(runtime_dir: str, name: str = "web") -> str:
    return os.path.join(runtime_dir, f"{name}.sock")


def row(runtime_dir: str, label: str, name: str = "web") -> dict:
    """The chardev's row in `status --json`, read over QMP."""
    rows = {c["label"]: c for c in status_of(control(runtime_dir, name))["chardevs"]}
    return rows[label]


def migrate(times: int = 1) -> None:
    """`migrate-out --spawn` of instance web, `times` over; each must exit 0."""
    for _ in range(times):
        result = run("migrate-out", "--name", "web", "--spawn", "--timeout", "20")
        assert result.returncode == 0, result.stderr


def free_udp_ports(count: int = 1) -> list[int]:
    """`count` distinct udp ports nobody is bound to right now (each bound to port 0
    while the next is picked, then closed)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def udp_peer() -> tuple[socket.socket, int]:
    """The test's udp socket on the loopback, and a free port for the chardev's own end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    return sock, free_udp_ports()[0]  # not ours: ours is bound


def open_end(path: str, flags: int = os.O_RDWR) -> int:
    """A tty or FIFO as its far end opens it: never as a controlling terminal, and
    a terminal raw, as a serial console's program makes its line."""
    fd = os.open(path, flags | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    if os.isatty(fd):
        tty.setraw(fd, termios.TCSANOW)
    return fd


def hung_up(fd: int) -> bool:
    """Whether `fd` (a pty's master or slave) reports a hangup right now."""
    probe = select.poll()
    probe.register(fd, 0)  # POLLHUP is reported whatever is asked
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in probe.poll(0))


def says(fd_in: int, fd_out: int, line: bytes, answer: bytes | None = None, timeout: float = 10) -> None:
    """Writes `line` on one fd and reads exactly `answer` (default: the line itself) on the other."""
    answer = line if answer is None else answer
    os.write(fd_in, line)
    assert read_exactly_fd(fd_out, len(answer), timeout) == answer


def file_holds(path: str, expected: bytes, timeout: float = 10) -> bytes:
    """The file's contents once it is as long as `expected` (or at the deadline).
    A file written by another process sends no event: it is re-read until then."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) >= len(expected) or time.monotonic() > deadline:
            return data
        time.sleep(0.01)


class FdEnd:
    """A pty, tty or FIFO end (one fd read, one written) with the socket calls
    helpers.Stream makes (settimeout, sendall, recv, shutdown, close), so that
    Stream streams numbered records through it and fails on an EIO or an EOF."""

    def __init__(self, read_fd: int, write_fd: int | None = None):
        self.read_fd, self.write_fd = read_fd, read_fd if write_fd is None else write_fd
        for fd in {self.read_fd, self.write_fd}:
            os.set_blocking(fd, False)
        self._wake = os.pipe()  # shutdown() ends a recv() under way
        self.timeout = None

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout

    def _wait(self, fd: int, events: int) -> bool:
        probe = select.poll()
        probe.register(fd, events)
        probe.register(self._wake[0], select.POLLIN)
        ready = dict(probe.poll(None if self.timeout is None else self.timeout * 1000))
        if not ready:
            raise socket.timeout(f"nothing within {self.timeout} s")
        return self._wake[0] not in ready

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._wait(self.write_fd, select.POLLOUT):
                raise OSError("shut down")
            try:
                view = view[os.write(self.write_fd, view):]
            except BlockingIOError:
                continue

    def recv(self, size: int) -> bytes:
        while True:
            if not self._wait(self.read_fd, select.POLLIN):
                return b""
            try:
                return os.read(self.read_fd, size)  # EIO raises; EOF is b""
            except BlockingIOError:
                continue

    def shutdown(self, how: int) -> None:
        os.write(self._wake[1], b"x")

    def close(self) -> None:
        for fd in self._wake:
            os.close(fd)


class DatagramEnd(FdEnd):
    """A connected udp socket as Stream's peer: each record sent is a datagram
    of its own, and each datagram received must be exactly one record (two
    echoed as one, or one cut, fails the stream). ECONNREFUSED (nothing listened
    at the chardev's port for a moment) fails it too."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        super().__init__(sock.fileno())

    def sendall(self, data: bytes) -> None:
        assert len(data) == Stream.SIZE
        self.sock.send(data)

    def recv(self, size: int) -> bytes:
        while True:
            if not self._wait(self.read_fd, select.POLLIN):
                return b""
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            if len(data) != Stream.SIZE:
                raise OSError(f"a datagram of {len(data)} bytes, not one record: {data[:40]!r}")
            return data


def stream_through_migrations(stream: Stream, migrations: int = 3, between: int = 150) -> int:
    """Streams while `migrations` migrations happen, `between` more records echoed
    after each (so each holder has served the stream); every record back once, in
    order, no EOF. The count."""
    stream.wait_echoed(between)
    for _ in range(migrations):
        migrate()
        stream.wait_echoed(stream.echoed + between)
    return stream.finish()


class PtyProgram:
    """PTY_PROGRAM on `slave`, in a session of its own."""

    def __init__(self, processes, directory: str, slave: str):
        script = os.path.join(directory, "pty_program.py")
        with open(script, "w") as f:
            f.write(PTY_PROGRAM)
        self.notes = os.path.join(directory, "pty_program.notes")
        self.proc = processes([sys.executable, script, slave, self.notes], start_new_session=True,
                              stdin=subprocess.DEVNULL)
        # Its first byte within a deadline (it may fail to start), then the rest of the line.
        hello = json.loads(read_exactly_fd(self.proc.stdout.fileno(), 1, 10) + self.proc.stdout.readline())
        assert hello == {"pid": self.proc.pid, "controlling": True}, hello

    def noted(self) -> str:
        """What happened to it: SIGHUP, EIO, EOF, one a line; empty if nothing did."""
        try:
            with open(self.notes) as f:
                return f.read()
        except FileNotFoundError:
            return ""


# ----- 1. a console server: a program on a pty, a user on a socket ----------------------------


def test_a_console_user_and_the_program_on_the_pty_talk_across_migrations_without_a_hangup(
        serve, processes, short_dir, runtime_dir):
    """The program on the pty gets no SIGHUP, no EIO, no EOF and lives on; every
    line the console user types comes back once and in order; the pty keeps
    its path; and the next user gets the same console."""
    console = os.path.join(short_dir, "console.sock")
    source = serve(f"pty,id=con,{MARK}", f"socket,id=console,path={console},server=on,{MARK},bridge=con")
    slave = row(runtime_dir, "con")["address"].removeprefix("pty:")
    assert slave.startswith("/dev/pts/")
    assert f"chardev con: char device redirected to {slave}" in source.stderr()
    program = PtyProgram(processes, short_dir, slave)

    # Records are digits and a newline, which the program's upper() leaves as they are.
    stream = Stream(connect_unix(console))
    assert stream_through_migrations(stream) > 450

    assert program.noted() == "", "the program on the pty saw its terminal go"
    assert program.proc.poll() is None
    after = row(runtime_dir, "con")
    assert after["address"] == f"pty:{slave}" and after["migrations"] == 3
    assert status_of(control(runtime_dir))["pid"] != source.pid

    user = connect_unix(console)
    user.sendall(b"next user\n")
    assert recv_exactly(user, 10) == b"NEXT USER\n"
    user.close()
    assert program.noted() == ""


def test_a_console_user_who_sends_eof_then_leaves_frees_the_console_for_the_next(
        serve, processes, short_dir, runtime_dir):
    """`echo cmd | socat - UNIX-CONNECT:console.sock` half-closes, then closes:
    the next user must get the console, not wait in the backlog for ever."""
    console = os.path.join(short_dir, "console.sock")
    serve(f"pty,id=con,{MARK}", f"socket,id=console,path={console},server=on,{MARK},bridge=con")
    PtyProgram(processes, short_dir, row(runtime_dir, "con")["address"].removeprefix("pty:"))
    first = connect_unix(console)
    first.sendall(b"first\n")
    first.shutdown(socket.SHUT_WR)  # as socat does at the end of its input...
    assert recv_exactly(first, 6) == b"FIRST\n"
    first.close()  # ...then leaves once the answer is in

    second = connect_unix(console, timeout=3)
    second.sendall(b"second\n")
    assert recv_exactly(second, 7) == b"SECOND\n"  # socket.timeout while the first user holds it


# ----- 2. socat as the far end of each backend ---------------------------------------------------


@needs("socat")
def test_socat_on_a_pty_slave_is_answered_through_a_migration(serve, processes, runtime_dir):
    """socat opens the slave path that status shows and talks to the echo
    behind it, before and after a migration, without seeing an end."""
    serve(f"pty,id=p,{MARK},frontend=echo")
    slave = row(runtime_dir, "p")["address"].removeprefix("pty:")
    socat = processes(["socat", "-", f"OPEN:{slave},rawer"])
    into, out = socat.stdin.fileno(), socat.stdout.fileno()
    says(into, out, b"before the move\n")
    migrate()
    says(into, out, b"after the move\n")
    assert socat.poll() is None


@needs("socat")
def test_socat_is_the_far_end_of_a_serial_line_through_a_migration(processes, serve, short_dir, runtime_dir):
    """socat makes a virtual serial line (PTY,link=...): fdmig opens the link
    as a tty and echoes; socat never sees the line go, before or after a move."""
    link = os.path.join(short_dir, "ttyV0")
    socat = processes(["socat", "-d", "-d", f"PTY,link={link},rawer", "-"])
    line = socat.stderr.readline()
    assert b"PTY is /dev/pts/" in line, line  # the link is there once socat says so
    serve(f"serial,id=line,path={link},{MARK},frontend=echo")
    assert row(runtime_dir, "line")["address"] == f"serial:{link}"
    into, out = socat.stdin.fileno(), socat.stdout.fileno()
    says(into, out, b"AT\r\n")
    migrate()
    says(into, out, b"ATI\r\n")
    assert socat.poll() is None


@needs("socat")
def test_socat_writes_one_fifo_and_reads_the_other_through_a_migration(serve, processes, short_dir, runtime_dir):
    """pipe,path=P with P.in and P.out: what socat writes into P.in comes back
    on P.out; neither socat sees an EOF across a move."""
    base = os.path.join(short_dir, "p")
    os.mkfifo(base + ".in")
    os.mkfifo(base + ".out")
    serve(f"pipe,id=pipe,path={base},{MARK},frontend=echo")
    assert row(runtime_dir, "pipe")["address"] == f"pipe:{base}"
    writer = processes(["socat", "-u", "-", f"PIPE:{base}.in"], stdout=subprocess.DEVNULL)
    reader = processes(["socat", "-u", f"PIPE:{base}.out", "-"], stdin=subprocess.DEVNULL)
    into, out = writer.stdin.fileno(), reader.stdout.fileno()
    says(into, out, b"through the fifos\n")
    migrate()
    says(into, out, b"and again\n")
    assert writer.poll() is None and reader.poll() is None


@needs("socat")
def test_socat_exchanges_datagrams_with_a_udp_chardev_through_a_migration(serve, processes, runtime_dir):
    """socat's UDP address bound to the chardev's host:port, sending to its
    localport: each datagram comes back, before and after a move."""
    port, localport = free_udp_ports(2)
    serve(f"udp,id=u,host={LOOPBACK},port={port},localaddr={LOOPBACK},localport={localport},{MARK},frontend=echo")
    assert row(runtime_dir, "u")["address"] == f"udp:{LOOPBACK}:{port}@{LOOPBACK}:{localport}"
    socat = processes(["socat", "-", f"UDP:{LOOPBACK}:{localport},bind={LOOPBACK}:{port}"])
    into, out = socat.stdin.fileno(), socat.stdout.fileno()
    says(into, out, b"datagram one\n")
    migrate()
    says(into, out, b"datagram two\n")
    assert row(runtime_dir, "u")["rx-bytes"] == 26  # the target counted on: one of each, none read twice


@needs("socat")
def test_a_file_chardev_keeps_what_socat_sent_through_a_bridge_across_a_migration(
        serve, processes, short_dir, runtime_dir):
    """socat writes to a socket bridged to file,append=on: the file keeps what
    it held, gets every line in order, and the target appends, never truncates."""
    path, console = os.path.join(short_dir, "out.log"), os.path.join(short_dir, "in.sock")
    with open(path, "wb") as f:
        f.write(b"kept from before\n")
    serve(f"file,id=log,path={path},append=on,{MARK}", f"socket,id=in,path={console},server=on,{MARK},bridge=log")
    assert row(runtime_dir, "log")["address"] == f"file:{path}"
    socat = processes(["socat", "-", f"UNIX-CONNECT:{console}"], stdout=subprocess.DEVNULL)
    socat.stdin.write(b"line one\n")
    socat.stdin.flush()
    assert file_holds(path, b"kept from before\nline one\n") == b"kept from before\nline one\n"
    migrate()
    socat.stdin.write(b"line two\n")
    socat.stdin.flush()
    expected = b"kept from before\nline one\nline two\n"
    assert file_holds(path, expected) == expected


# ----- 3. records streamed through each backend across migrations -----------------------------


@pytest.mark.parametrize("backend", ["pty", "pipe", "serial", "udp"])
def test_records_stream_through_each_backend_across_three_migrations(backend, serve, fds, short_dir, runtime_dir):
    """Numbered records through an echo chardev of each backend, while it moves
    three times: each comes back once, in order, with no EOF, no EIO (and for
    udp, each datagram on its own and none refused: the port was never closed)."""
    if backend == "pty":
        serve(f"pty,id=b,{MARK},frontend=echo")
        end = FdEnd(fds(open_end(row(runtime_dir, "b")["address"].removeprefix("pty:"))))
    elif backend == "pipe":
        base = os.path.join(short_dir, "p")
        os.mkfifo(base + ".in")
        os.mkfifo(base + ".out")
        serve(f"pipe,id=b,path={base},{MARK},frontend=echo")
        end = FdEnd(fds(open_end(base + ".out", os.O_RDONLY)), fds(open_end(base + ".in", os.O_WRONLY)))
    elif backend == "serial":
        master, slave = os.openpty()
        fds(master)
        serve(f"serial,id=b,path={os.ttyname(slave)},{MARK},frontend=echo")
        os.close(slave)  # fdmig holds the line's only open slave: a close of it would hang it up
        end = FdEnd(master)
    else:
        sock, localport = udp_peer()
        serve(f"udp,id=b,host={LOOPBACK},port={sock.getsockname()[1]},localaddr={LOOPBACK},"
              f"localport={localport},{MARK},frontend=echo")
        sock.connect((LOOPBACK, localport))
        end = DatagramEnd(sock)
    # A window of 64 records: for udp, what the chardev's socket buffer holds
    # while it moves, well inside the kernel's default buffer, so nothing the
    # kernel drops on its own can pass for a loss.
    count = stream_through_migrations(Stream(end, window=64))
    moved = row(runtime_dir, "b")
    assert moved["migrations"] == 3 and moved["state"] == "connected"
    assert moved["rx-bytes"] == moved["tx-bytes"] == count * Stream.SIZE  # counted on by each holder
    if backend == "udp":
        end.sock.close()


# ----- 4. a serial line is never hung up -----------------------------------------------------


class HangupWatch(threading.Thread):
    """Watches a pty master for a hangup (its slave closed by everyone) the whole time."""

    def __init__(self, master: int):
        super().__init__(daemon=True)
        self.master, self.seen, self._done = master, [], threading.Event()
        self.start()

    def run(self):
        probe = select.poll()
        probe.register(self.master, 0)
        while not self._done.is_set():
            for _, events in probe.poll(50):
                if events & (select.POLLHUP | select.POLLERR):
                    self.seen.append(events)
                    return

    def stop(self) -> list:
        self._done.set()
        self.join(5)
        return self.seen


def test_a_serial_line_is_never_hung_up_and_keeps_the_termios_its_user_set(serve, fds, runtime_dir):
    """The test's pty pair is the line (fdmig holds the only open slave). Its
    user sets 19200 baud, two stop bits, HUPCL and IXON after fdmig opened it;
    three moves later the master has never seen a hangup, every read answered,
    and the termios is the one the user set (no target opened it afresh)."""
    master, slave = os.openpty()
    fds(master)
    serve(f"serial,id=line,path={os.ttyname(slave)},{MARK},frontend=echo")
    os.close(slave)
    raw = termios.tcgetattr(master)  # termios calls on a pty's master act on its slave
    wanted = list(raw)
    wanted[0] |= termios.IXON
    wanted[2] |= termios.CSTOPB | termios.HUPCL
    wanted[4] = wanted[5] = termios.B19200
    termios.tcsetattr(master, termios.TCSANOW, wanted)
    settings = termios.tcgetattr(master)
    assert settings != raw and settings[4] == termios.B19200 and settings[2] & termios.CSTOPB

    watch = HangupWatch(master)
    for n in range(3):
        says(master, master, b"line %d\n" % n)
        assert not hung_up(master)
        migrate()
    says(master, master, b"after the last move\n")
    assert not hung_up(master)
    assert watch.stop() == [], "the line was hung up"
    assert termios.tcgetattr(master) == settings
    assert row(runtime_dir, "line")["migrations"] == 3


@needs("socat")
def test_a_serial_line_whose_far_end_hangs_up_does_not_make_the_instance_spin(
        processes, serve, short_dir, runtime_dir):
    """A virtual serial line (socat PTY) whose far end exits: the instance goes
    on answering and does not burn a CPU on the hung-up line."""
    link = os.path.join(short_dir, "ttyV0")
    socat = processes(["socat", "-d", "-d", f"PTY,link={link},rawer", "-"])
    assert b"PTY is /dev/pts/" in socat.stderr.readline()
    source = serve(f"serial,id=line,path={link},frontend=echo")
    says(socat.stdin.fileno(), socat.stdout.fileno(), b"hello\n")
    socat.kill()  # the line's far end goes away
    socat.wait(10)
    holder = psutil.Process(source.pid)
    before = holder.cpu_times()
    time.sleep(1.0)  # a measure over a second of wall time, not a synchronisation
    after = holder.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used < 0.3, f"the instance used {used:.2f} s of CPU in 1 s after the line hung up"
    assert status_of(control(runtime_dir))["pid"] == source.pid


# ----- 5. what waits in a FIFO --------------------------------------------------------------


def test_bytes_queued_in_a_fifo_before_anyone_reads_them_arrive_once_after_two_moves(
        serve, fds, short_dir, runtime_dir):
    """A writer fills P.in while no console user is connected to the socket
    bridged to the pipe; two moves later the first user gets those bytes once,
    then what the writer (which never saw EPIPE) writes next; and what the user
    sends comes out of P.out."""
    base, console = os.path.join(short_dir, "p"), os.path.join(short_dir, "console.sock")
    os.mkfifo(base + ".in")
    os.mkfifo(base + ".out")
    serve(f"pipe,id=pipe,path={base},{MARK}", f"socket,id=console,path={console},server=on,{MARK},bridge=pipe")
    writer = fds(open_end(base + ".in", os.O_WRONLY))
    reader = fds(open_end(base + ".out", os.O_RDONLY))
    queued = b"".join(b"queued record %03d\n" % n for n in range(50))
    os.write(writer, queued)
    migrate(2)
    user = connect_unix(console)
    assert recv_exactly(user, len(queued)) == queued
    os.write(writer, b"written after the moves\n")  # no EPIPE: the FIFO never lost its reader
    assert recv_exactly(user, 24) == b"written after the moves\n"
    user.sendall(b"from the user\n")
    assert read_exactly_fd(reader, 14) == b"from the user\n"
    user.settimeout(0.2)
    with pytest.raises(socket.timeout):
        user.recv(1)  # nothing more: no queued byte came twice
    assert row(runtime_dir, "pipe")["rx-bytes"] == len(queued) + 24


# ----- 6. a service's udp socket and pty under `fdmig run` ---------------------------------


@pytest.mark.parametrize("backend", ["udp", "pty"])
def test_a_services_udp_port_or_pty_stays_through_a_restart(backend, daemons, fds, short_dir, runtime_dir,
                                                            last_instance):
    """`fdmig run --chardev udp,...` (or pty): the service gets the fd as fd 3
    and answers; a datagram (a line) sent while no service runs, during
    `fdmig restart`, is answered by the new service once it is ready: no ICMP
    port unreachable, no hangup, the same port or pty path."""
    script = os.path.join(short_dir, "service.py")
    with open(script, "w") as f:
        f.write(SERVICE_PROGRAM)
    gate = os.path.join(short_dir, "gate")
    os.mkfifo(gate)
    opener = fds(os.open(gate, os.O_RDWR))  # held by the test: the service's open never waits
    os.write(opener, b"g")  # the first service may serve at once
    if backend == "udp":
        sock, localport = udp_peer()
        spec = f"udp,id=dns,host={LOOPBACK},port={sock.getsockname()[1]},localport={localport}"
    else:
        spec = "pty,id=con"
    daemons("run", "--name", "web", "--notify", "--chardev", spec, "--", sys.executable, script, gate, backend)
    address = row(runtime_dir, "dns" if backend == "udp" else "con")["address"]
    if backend == "udp":
        sock.connect((LOOPBACK, localport))
        sock.settimeout(10)

        def ask(text: bytes) -> bytes:
            sock.send(text)
            return sock.recv(65536)  # ConnectionRefusedError had the port been closed

        def answer() -> bytes:
            return sock.recv(65536)
    else:
        slave = fds(open_end(address.removeprefix("pty:")))

        def ask(text: bytes) -> bytes:
            os.write(slave, text + b"\n")
            return answer()

        def answer() -> bytes:
            data = b""
            while not data.endswith(b"\n"):
                data += read_exactly_fd(slave, 1)  # EIO had the pty been hung up
            return data.removesuffix(b"\n")

    old = status_of(control(runtime_dir))["service"]["pid"]
    assert ask(b"first") == b"%d first" % old
    old_gone = select.poll()
    old_gone.register(os.pidfd_open(old), select.POLLIN)
    restarting = subprocess.Popen(FDMIG + ["restart", "--name", "web", "--timeout", "20"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert old_gone.poll(20_000), "the old service did not stop"
        # No service reads now: the new one waits at the gate. This waits for it in the kernel.
        (sock.send(b"during") if backend == "udp" else os.write(slave, b"during\n"))
        assert restarting.poll() is None, restarting.communicate()
        os.write(opener, b"g")
        out, err = restarting.communicate(timeout=20)
    finally:
        if restarting.poll() is None:
            restarting.kill()
            restarting.wait()
    assert restarting.returncode == 0, err
    new = status_of(control(runtime_dir))["service"]["pid"]
    assert new != old
    assert answer() == b"%d during" % new
    assert ask(b"after") == b"%d after" % new
    assert row(runtime_dir, "dns" if backend == "udp" else "con")["address"] == address
    if backend == "udp":
        sock.close()


# ----- 7. attach, status, query-chardev, detach ----------------------------------------------


async def _qmp(path: str, *commands):
    """The replies to `commands` ((name, arguments) pairs) from QEMU's own QMP client."""
    client = QMPClient("test")
    await client.connect(path)
    try:
        return [await client.execute(name, arguments) for name, arguments in commands]
    finally:
        await client.disconnect()


def qmp(path: str, *commands):
    return asyncio.run(asyncio.wait_for(_qmp(path, *commands), 15))


def test_attach_status_query_chardev_and_detach_speak_each_backends_address(serve, fds, short_dir, runtime_dir):
    """`attach` prints each chardev's address, a pty's path as the kernel named
    it; `status --json` gives backend and address, and no role; QMP
    query-chardev gives QEMU's filename forms, and chardev-add of a pty returns
    its path as QEMU's does; `detach` closes each (a pty's far end sees the
    hangup, a serial line's does not: only fdmig's copy of it closes)."""
    serve()
    master, slave = os.openpty()
    fds(master, slave)
    tty = os.ttyname(slave)
    base, log = os.path.join(short_dir, "p"), os.path.join(short_dir, "out.log")
    os.mkfifo(base)
    port, localport = free_udp_ports(2)
    expected = {
        "line": ("serial", f"serial:{tty}"),
        "pipe": ("pipe", f"pipe:{base}"),
        "dns": ("udp", f"udp:{LOOPBACK}:{port}@{LOOPBACK}:{localport}"),
        "log": ("file", f"file:{log}"),
    }
    for spec in (f"tty,id=line,path={tty}", f"pipe,id=pipe,path={base}",
                 f"udp,id=dns,host={LOOPBACK},port={port},localaddr={LOOPBACK},localport={localport}",
                 f"file,id=log,path={log}"):
        label = spec.split("id=")[1].split(",")[0]
        result = run("attach", "--name", "web", spec)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"attached {label}: {expected[label][1]} (connected)\n"
    assert stat.S_ISREG(os.stat(log).st_mode)
    attached = run("attach", "--name", "web", "pty,id=term")
    assert attached.returncode == 0, attached.stderr
    pty_path = row(runtime_dir, "term")["address"].removeprefix("pty:")
    assert attached.stdout == f"attached term: pty:{pty_path} (connected)\n"
    held = fds(open_end(pty_path))  # the slave that attach named: a terminal there
    assert os.isatty(held)
    expected["term"] = ("pty", f"pty:{pty_path}")

    added, listed = qmp(control(runtime_dir),
                        ("chardev-add", {"id": "qpty", "backend": {"type": "pty", "data": {}}}),
                        ("query-chardev", None))
    assert added["pty"].startswith("/dev/pts/") and os.isatty(fds(open_end(added["pty"])))
    expected["qpty"] = ("pty", f"pty:{added['pty']}")
    assert {c["label"]: c["filename"] for c in listed} == {label: address for label, (_, address) in expected.items()}
    assert all(c["frontend-open"] for c in listed)
    shown = json.loads(run("status", "--name", "web", "--json").stdout)["chardevs"]
    assert {c["label"]: (c["backend"], c["address"]) for c in shown} == expected
    assert all(c["role"] is None and c["state"] == "connected" for c in shown)

    for label in expected:
        result = run("detach", "--name", "web", label)
        assert result.returncode == 0, result.stderr
    assert status_of(control(runtime_dir))["chardevs"] == []
    assert qmp(control(runtime_dir), ("query-chardev", None)) == [[]]
    assert hung_up(held), "the detached pty's slave did not see its master close"
    assert not hung_up(master), "the detached serial line was hung up (the test holds its slave too)"


def test_attach_works_on_an_instance_that_holds_a_pty(serve, short_dir, runtime_dir):
    """A user with a console (a pty) adds another chardev beside it."""
    serve("pty,id=term")
    result = run("attach", "--name", "web", f"socket,id=admin,path={short_dir}/admin.sock,server=on")
    assert result.returncode == 0, result.stderr
    assert [c["label"] for c in status_of(control(runtime_dir))["chardevs"]] == ["term", "admin"]


# ----- 8. refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec, field", [
    ("file,id=f,path={dir}/out,frontend=echo", "frontend"),
    ("file,id=f,path={dir}/out,frontend=sink", "frontend"),
    ("pty,id=p,path=/dev/pts/3", "path"),
    ("serial,id=s", "path"),
    ("udp,id=u,host=127.0.0.1", "port"),
], ids=["file-echo", "file-sink", "pty-path", "serial-no-path", "udp-no-port"])
def test_a_spec_that_does_not_fit_its_backend_exits_2_with_one_line_naming_the_field(
        spec, field, short_dir, runtime_dir):
    """A SPEC with a key or a frontend its backend does not take: `serve` exits 2
    at once with one line naming the field, and opens (creates) nothing."""
    result = run("serve", "--name", "web", "--chardev", spec.format(dir=short_dir), timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f": {field}: " in lines[0], result.stderr
    assert not os.path.exists(os.path.join(short_dir, "out"))  # a refused file chardev creates nothing


@pytest.mark.parametrize("spec", ["pty,id=con,frontend=echo", f"pty,id=con,{MARK},frontend=echo"],
                         ids=["unmarked", "marked"])
def test_a_pty_that_would_not_move_live_fails_the_migration_and_the_source_serves_it_on(
        spec, serve, fds, runtime_dir):
    """A pty moves only live: a migration that would reopen it (the capability
    off) exits 1 naming it and the way to move it live; the program on its
    slave is still answered by the same instance, never hung up."""
    words = "enable capability local-char-socket"
    source = serve(spec, capability=False)
    slave = fds(open_end(row(runtime_dir, "con")["address"].removeprefix("pty:")))
    says(slave, slave, b"before\n")
    result = run("migrate-out", "--name", "web", "--spawn", "--timeout", "20")
    assert result.returncode == 1, result.stderr
    assert "con" in result.stderr and "pty" in result.stderr and words in result.stderr, result.stderr
    says(slave, slave, b"still served\n")
    assert not hung_up(slave)
    status = status_of(control(runtime_dir))
    assert status["pid"] == source.pid and status["chardevs"][0]["migrations"] == 0


def test_a_udp_port_in_use_exits_2_naming_it(runtime_dir):
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind((LOOPBACK, 0))
    port = holder.getsockname()[1]
    try:
        result = run("serve", "--name", "web", "--chardev", f"udp,id=u,host={LOOPBACK},port=9,localaddr={LOOPBACK},"
                                                             f"localport={port}", timeout=20)
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr
    assert f"chardev u: cannot bind udp {LOOPBACK}:{port}: Address already in use" in result.stderr, result.stderr


def test_datagrams_nobody_listens_for_are_counted_and_the_udp_chardev_serves_on(serve, short_dir, runtime_dir):
    """Every datagram to a port nothing listens on draws an ICMP refusal, which the
    next write reports: the chardev says so and counts, and serves on, as QEMU's
    does, so that the peer that comes later gets what is sent then."""
    _, port = udp_peer()
    front = os.path.join(short_dir, "front.sock")
    instance = serve(f"udp,id=u,host={LOOPBACK},port={port}",
                     f"socket,id=front,path={front},server=on,bridge=u")
    user = connect_unix(front)
    for i in range(200):
        user.sendall(b"lost %03d\n" % i)
        time.sleep(0.001)  # one datagram each, so that refusals come between them
    wait_status(control(runtime_dir), lambda s: {r["label"]: r for r in s["chardevs"]}["front"]["rx-bytes"] == 1800,
                "the 200 lines read and sent on", timeout=10)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((LOOPBACK, port))
    peer.settimeout(5)
    try:
        user.sendall(b"found\n")
        assert peer.recv(100).endswith(b"found\n")
    finally:
        peer.close()
    assert "refused so far" in instance.stderr()
    assert row(runtime_dir, "u")["state"] == "connected"


def test_a_shell_on_a_console_answers_as_on_a_terminal(serve, processes, short_dir, runtime_dir):
    """A console runs a shell or a getty, which expect a terminal's settings (echo,
    CR-LF output), not a raw line: a user's command is echoed and answered."""
    console = os.path.join(short_dir, "console.sock")
    serve(f"pty,id=con,{MARK}", f"socket,id=console,path={console},server=on,{MARK},bridge=con")
    slave = row(runtime_dir, "con")["address"].removeprefix("pty:")
    processes(["setsid", "sh", "-c", f"exec sh -i <{slave} >{slave} 2>&1"])  # the slave its terminal
    user = connect_unix(console)
    user.settimeout(10)
    user.sendall(b"echo $((6*7))\n")
    seen = b""
    while b"42\r\n" not in seen:
        chunk = user.recv(4096)
        assert chunk, seen
        seen += chunk
    assert b"echo $((6*7))\r\n" in seen, seen  # the terminal echoed what the user typed
    migrate()
    user.sendall(b"echo moved\n")
    while b"moved\r\nmoved\r\n" not in seen.replace(b"$ ", b"").replace(b"# ", b""):
        chunk = user.recv(4096)
        assert chunk, seen
        seen += chunk


def test_an_unmarked_pty_moves_live_with_the_capability_on(serve, fds, runtime_dir):
    """No target can open a pty again, and a running chardev cannot be marked:
    with the capability on, a pty moves live, marked or not."""
    serve("pty,id=con,frontend=echo")
    address = row(runtime_dir, "con")["address"]
    slave = fds(open_end(address.removeprefix("pty:")))
    says(slave, slave, b"before\n")
    migrate()
    says(slave, slave, b"after\n")
    assert not hung_up(slave) and row(runtime_dir, "con")["address"] == address


@pytest.mark.parametrize("backend, given", [("pipe", "fifo"), ("pipe", "fifo.in"), ("serial", None),
                                            ("file", "log")], ids=["pipe", "pipe-in-of-a-pair", "serial", "file"])
def test_one_fifo_or_tty_is_never_opened_twice(backend, given, serve, fds, short_dir, runtime_dir):
    """Two readers of one FIFO or tty would split its bytes, and a second file
    chardev would truncate the first one's file: a second chardev on the path
    (or on a FIFO of the pair that a pipe's path stands for), in the same
    instance or another, exits 2 naming the holder."""
    if backend == "pipe":
        path = os.path.join(short_dir, "fifo")
        if given == "fifo.in":
            os.mkfifo(path + ".in")
            os.mkfifo(path + ".out")
        else:
            os.mkfifo(path)
    elif backend == "file":
        path = os.path.join(short_dir, "log")
    else:
        master, slave = os.openpty()
        fds(master, slave)
        path = os.ttyname(slave)
    serve(f"{backend},id=first,path={path}")
    if given == "fifo.in":
        path += ".in"  # the first holds fifo.in and fifo.out
    other = run("serve", "--name", "other", "--chardev", f"{backend},id=second,path={path}", timeout=20)
    assert other.returncode == 2, other.stderr
    assert "'web'" in other.stderr and "first" in other.stderr, other.stderr
    again = run("attach", "--name", "web", f"{backend},id=second,path={path}")
    assert again.returncode == 2, again.stderr
    assert "first" in again.stderr, again.stderr
    twice = run("serve", "--name", "other", "--chardev", f"{backend},id=a,path={path}",
                "--chardev", f"{backend},id=b,path={path}", timeout=20)
    assert twice.returncode == 2 and "a's already" in twice.stderr, twice.stderr
    assert [c["label"] for c in status_of(control(runtime_dir))["chardevs"]] == ["first"]
