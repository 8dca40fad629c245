"""The other backends (pty, udp, serial, pipe) under the faults and hostile
sources the socket chardevs are tested with (tests/test_faults.py,
tests/test_hostile.py).

1. A target killed at each of its steps of a migration: the source serves on as
   if nothing happened. A program on the pty's slave, its controlling terminal,
   never sees SIGHUP, EIO or EOF and still echoes through the console bridged to
   the pty; a peer of the udp chardev has every numbered datagram answered once,
   in order, none lost across the failed attempt; `status --json` shows each
   chardev as before. A later migration then moves them all.
2. A target handed an fd of the wrong kind for a chardev's backend refuses that
   source naming the chardev and what the fd is, closes every fd it got, and
   waits on: a later valid source still migrates to it. One target serves every
   refused source, as a waiting target does in real life."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from fdmig import qmp
from fdmig import spec as specs
from fdmig.migration import wire
from tests.helpers import (Daemon, Stream, answer_then_hangup, connect_unix, connect_when_bound, locked_file,
                           read_event, run, sees_eof, send_chunks, send_raw)
from tests.test_faults import MATRIX

# The steps at which test_faults kills a target, armed as it arms them
# (FDMIG_FAULT=POINT=kill in the target's environment); the source serves on after each.
TARGET_POINTS = [point for side, point, survivor in MATRIX if side == "target"]
assert TARGET_POINTS and all(survivor == "source" for side, _, survivor in MATRIX if side == "target")


# ----- a program on a pty's slave -----------------------------------------------------------------

# Started in a session of its own (setsid), it opens the slave and so makes it its
# controlling terminal: a hangup (the last master closed) would send it SIGHUP,
# and its reads would fail with EIO or end. It says on stdout whatever happens
# to it, and echoes each line it reads, prefixed, back to the terminal.
PTY_PROGRAM = r"""
import errno, os, signal, sys

def say(what):
    os.write(1, what.encode() + b"\n")

signal.signal(signal.SIGHUP, lambda *_: say("SIGHUP"))
signal.signal(signal.SIGTERM, lambda *_: (say("TERM"), os._exit(0)))
tty = os.open(sys.argv[1], os.O_RDWR)
__import__("tty").setraw(tty)  # raw, as a serial console's program makes its line
say("ready" if os.tcgetpgrp(tty) == os.getpgrp() else "not its controlling terminal")
pending = b""
while True:
    try:
        data = os.read(tty, 4096)
    except OSError as exc:
        say(errno.errorcode.get(exc.errno, str(exc.errno)))
        break
    if not data:
        say("EOF")
        break
    pending += data
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        os.write(tty, b"echo:" + line + b"\n")
while True:
    signal.pause()
"""


class PtyProgram:
    """PTY_PROGRAM on the slave at `path`, once it says it holds it as its terminal."""

    def __init__(self, path: str):
        self.said = b""
        self.proc = subprocess.Popen([sys.executable, "-c", PTY_PROGRAM, path], start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        first = self.proc.stdout.readline() if ready else b"(nothing within 20 s)"
        assert first == b"ready\n", f"the program on {path} said {first!r}"

    def finish(self) -> list[str]:
        """What it said after "ready", once stopped with SIGTERM (which it says last)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            self.said, _ = self.proc.communicate(timeout=10)
        return self.said.decode().splitlines()


def console_echoes(console: socket.socket, text: str) -> None:
    """A line through the console (the unix chardev bridged to the pty) comes back
    as the program on the pty echoes it."""
    console.sendall(text.encode() + b"\n")
    want = f"echo:{text}\n".encode()
    got = b""
    while not got.endswith(b"\n"):
        chunk = console.recv(4096)
        assert chunk, f"EOF on the console, after {got!r}"
        got += chunk
    assert got == want


# ----- a peer of a udp chardev --------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- 1. the target killed at each step ----------------------------------------------------------


def status_json() -> dict:
    result = run("status", "--name", "web", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def by_label(status: dict) -> dict:
    """Each chardev's row without its byte counts, which move on as peers talk."""
    return {row["label"]: {k: v for k, v in row.items() if k not in ("rx-bytes", "tx-bytes")}
            for row in status["chardevs"]}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", TARGET_POINTS)
def test_a_target_killed_at_each_step_leaves_the_pty_and_the_udp_chardev_served_as_before(
        daemons, short_dir, point):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the udp chardev's peer
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    local = free_udp_port()
    app = os.path.join(short_dir, "app.sock")
    source = daemons(
        "serve", "--name", "web", "--capability", "local-char-socket",
        "--chardev", "pty,id=con,support-local-migration=on",
        "--chardev", f"socket,id=app,path={app},server=on,support-local-migration=on,bridge=con",
        "--chardev", f"udp,id=u,host=127.0.0.1,port={port},localaddr=127.0.0.1,localport={local},"
                     "frontend=echo,support-local-migration=on")
    program = console = None
    try:
        rows = by_label(status_json())
        assert rows["con"]["address"].startswith("pty:/dev/pts/"), rows["con"]
        assert rows["u"]["address"] == f"udp:127.0.0.1:{port}@127.0.0.1:{local}", rows["u"]
        program = PtyProgram(rows["con"]["address"][len("pty:"):])
        console = connect_unix(app)
        console_echoes(console, "before")
        udp.connect(("127.0.0.1", local))
        # Numbered datagrams, at most 32 unanswered: each must come back once and in order.
        peer = Stream(udp, window=32)
        peer.more()
        before = by_label(status_json())  # the console connected now

        target = daemons("migrate-in", "--name", "web", ready=False,
                         env=dict(os.environ, FDMIG_FAULT=f"{point}=kill"))
        result = run("migrate-out", "--name", "web", "--timeout", "20", timeout=60)
        assert target.proc.wait(20) == -signal.SIGKILL, f"the fault at {point} did not fire"
        assert result.returncode == 1 and "still serves every chardev" in result.stderr, result.stderr

        after = status_json()
        assert (after["pid"], after["migration"]["status"]) == (source.pid, "failed")
        assert by_label(after) == before
        console_echoes(console, f"after {point}")
        peer.more()  # every datagram sent meanwhile answered once, in order

        # The source let nothing go: a migration now moves every chardev live.
        successor = daemons("migrate-in", "--name", "web", ready=False)
        result = run("migrate-out", "--name", "web", "--timeout", "20", timeout=60)
        assert result.returncode == 0, result.stderr
        successor.wait_ready()
        moved = status_json()
        assert moved["pid"] == successor.pid
        for label, row in by_label(moved).items():
            assert (row["address"], row["state"], row["migrations"]) == \
                   (before[label]["address"], before[label]["state"], 1), row
        console_echoes(console, "moved")
        peer.more()
        assert peer.finish() == peer.sent
        assert program.finish() == ["TERM"], "the program on the pty saw its terminal hang up"
    finally:
        udp.close()
        if console is not None:
            console.close()
        if program is not None:
            program.finish()


# ----- 2. an fd of the wrong kind ----------------------------------------------------------------


class Wrong:
    """One refused source: the chardev its table names, the fds its section hands
    over by role, the words the target must refuse with (as fdmig/backends.py
    puts them), and witnesses that each say whether every copy of a sent fd is
    closed."""

    def __init__(self, directory: str):
        self.dir = directory
        self.entry: dict = {}
        self.fds: dict = {}
        self.names = ""
        self.witnesses = []
        self.ours = []  # our copies of the fds sent, closed once sent
        self.kept = []  # what the witnesses use, closed at the end

    def table(self, text: str, fds: int) -> None:
        """The table entry of `text` (a SPEC) as a source sends it (ChardevSpec.to_dict)."""
        fields = dict(item.split("=", 1) for item in text.split(",")[1:])
        fields["backend"] = text.split(",")[0]
        spec = specs.build_spec(fields)  # as a table's: a pty may name its path
        self.label = spec.id
        self.entry = {**spec.to_dict(), "x-fds": fds}

    def send(self, role: str, fd: int) -> None:
        self.fds[role] = fd
        self.ours.append(fd)

    def close(self) -> None:
        for thing in self.ours + self.kept:
            thing.close() if hasattr(thing, "close") else os.close(thing)
        self.ours = self.kept = []


def hung_up(fd: int) -> bool:
    """A pty end sees POLLHUP once every fd of its other end is closed."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    events = poll.poll(10_000)
    return bool(events and events[0][1] & select.POLLHUP)


def named_pty(wrong: Wrong) -> str:
    """A pty opened here for the table to name (/dev/pts/N). Its slave goes with
    the section as the "slave" fd, which passes the check; our master sees a
    hangup once every copy of that slave is closed."""
    master, slave = os.openpty()
    wrong.kept.append(master)
    wrong.witnesses.append(lambda: hung_up(master))
    wrong.pty = os.ttyname(slave)
    wrong.send("slave", slave)
    return wrong.pty


def a_fifo(wrong: Wrong) -> int:
    """A FIFO's write end; the read end kept sees EOF once every writer is closed."""
    path = os.path.join(wrong.dir, "fifo")
    os.mkfifo(path, 0o600)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    wrong.kept.append(reader)

    def eof():
        ready, _, _ = select.select([reader], [], [], 10)
        return bool(ready) and os.read(reader, 1) == b""
    wrong.witnesses.append(eof)
    return writer


def a_regular_file(wrong: Wrong) -> int:
    """A file held under flock, which every copy of the open file holds."""
    fd, unlocked = locked_file(os.path.join(wrong.dir, "file"), os.O_RDWR | os.O_CREAT | os.O_APPEND)
    wrong.witnesses.append(unlocked)
    return fd


def a_unix_socket(wrong: Wrong) -> int:
    ours, kept = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    wrong.kept.append(kept)
    wrong.witnesses.append(lambda: sees_eof(kept))
    return ours.detach()


def another_ptys_master(wrong: Wrong) -> int:
    master, slave = os.openpty()
    wrong.kept.append(slave)
    wrong.witnesses.append(lambda: hung_up(slave))
    wrong.other = os.ttyname(slave)
    return master


def a_tcp_socket(wrong: Wrong) -> int:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    wrong.kept.append(accepted)
    wrong.witnesses.append(lambda: sees_eof(accepted))
    return client.detach()


def a_udp_socket(wrong: Wrong, port: int | None = None) -> int:
    """A udp socket, sending to `port` if given; its own port is free again once
    every copy is closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    if port is not None:
        sock.connect(("127.0.0.1", port))
    mine = sock.getsockname()

    def unbound():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(mine)
                return True
            except OSError:
                return False
    wrong.witnesses.append(unbound)
    return sock.detach()


NOT_A_TERMINAL = "is not a terminal; accepted: a pty's master and slave"


def pty_chardev(wrong: Wrong, conn) -> str:
    """A pty chardev: the table names a pty of ours, its valid slave goes first,
    then `conn(wrong)` as its master."""
    path = named_pty(wrong)
    wrong.table(f"pty,id=con,path={path},support-local-migration=on", fds=2)
    wrong.send("conn", conn(wrong))
    return path


def pty_given_a_fifo(wrong: Wrong):
    pty_chardev(wrong, a_fifo)
    wrong.names = f"chardev con: the conn fd {NOT_A_TERMINAL}"


def pty_given_a_regular_file(wrong: Wrong):
    pty_chardev(wrong, a_regular_file)
    wrong.names = f"chardev con: the conn fd {NOT_A_TERMINAL}"


def pty_given_a_unix_socket(wrong: Wrong):
    pty_chardev(wrong, a_unix_socket)
    wrong.names = f"chardev con: the conn fd {NOT_A_TERMINAL}"


def pty_given_another_ptys_master(wrong: Wrong):
    path = pty_chardev(wrong, another_ptys_master)
    wrong.names = f"chardev con: the conn fd is the master of {wrong.other}, not of {path}"


def pty_given_its_own_slave_as_master(wrong: Wrong):
    # A second copy of the slave: our master's hangup witnesses both.
    pty_chardev(wrong, lambda w: os.open(w.pty, os.O_RDWR | os.O_NOCTTY))
    wrong.names = "chardev con: the conn fd is not a pty master"


def udp_chardev(wrong: Wrong, conn) -> int:
    """A udp chardev sending to a free port, and `conn(wrong, port)` as its socket."""
    port = free_udp_port()
    wrong.table(f"udp,id=u,host=127.0.0.1,port={port},support-local-migration=on", fds=1)
    wrong.send("conn", conn(wrong, port))
    return port


def udp_given_a_tcp_socket(wrong: Wrong):
    udp_chardev(wrong, lambda w, port: a_tcp_socket(w))
    wrong.names = "chardev u: the conn fd is not a udp socket"


def udp_given_a_udp_socket_sending_to_another_port(wrong: Wrong):
    other = {}

    def wrong_port(w, port):
        other["port"] = port + 1 if port < 65535 else port - 1
        return a_udp_socket(w, other["port"])
    port = udp_chardev(wrong, wrong_port)
    wrong.names = f"chardev u: the conn fd sends to port {other['port']}, not {port}"


def udp_given_an_unconnected_udp_socket(wrong: Wrong):
    udp_chardev(wrong, lambda w, port: a_udp_socket(w))
    wrong.names = ("chardev u: the conn fd is not connected; accepted: a udp socket connected to the SPEC's "
                   "host and port")


def serial_given_a_fifo(wrong: Wrong):
    master, slave = os.openpty()  # a tty device for the table to name
    wrong.kept += [master, slave]
    wrong.table(f"serial,id=tty,path={os.ttyname(slave)},support-local-migration=on", fds=1)
    wrong.send("conn", a_fifo(wrong))
    wrong.names = "chardev tty: the conn fd is not a terminal; accepted: a tty device"


def pipe_given_a_regular_file(wrong: Wrong):
    path = os.path.join(wrong.dir, "p")
    os.mkfifo(path, 0o600)
    wrong.table(f"pipe,id=p,path={path},support-local-migration=on", fds=1)
    wrong.send("conn", a_regular_file(wrong))
    wrong.names = "chardev p: the conn fd is not a FIFO"


CASES = [pty_given_a_fifo, pty_given_a_regular_file, pty_given_a_unix_socket, pty_given_another_ptys_master,
         pty_given_its_own_slave_as_master, udp_given_a_tcp_socket, udp_given_a_udp_socket_sending_to_another_port,
         udp_given_an_unconnected_udp_socket, serial_given_a_fifo, pipe_given_a_regular_file]


def pty_given_only_its_slave(wrong: Wrong):
    named_pty(wrong)
    wrong.table(f"pty,id=con,path={wrong.pty},support-local-migration=on", fds=2)
    wrong.names = "chardev con"


def pipe_given_only_its_out_fifo(wrong: Wrong):
    path = os.path.join(wrong.dir, "p")
    for end in ("in", "out"):
        os.mkfifo(f"{path}.{end}", 0o600)
    reader = os.open(f"{path}.out", os.O_RDONLY | os.O_NONBLOCK)
    wrong.kept.append(reader)
    wrong.send("out", os.open(f"{path}.out", os.O_WRONLY | os.O_NONBLOCK))

    def eof():
        ready, _, _ = select.select([reader], [], [], 10)
        return bool(ready) and os.read(reader, 1) == b""
    wrong.witnesses.append(eof)
    wrong.table(f"pipe,id=p,path={path},support-local-migration=on", fds=2)
    wrong.names = "chardev p"


def pty_given_no_fd(wrong: Wrong):
    master, slave = os.openpty()
    wrong.kept += [master, slave]
    wrong.table(f"pty,id=con,path={os.ttyname(slave)},support-local-migration=on", fds=2)
    wrong.names = "chardev con"


MISSING = [pty_given_only_its_slave, pipe_given_only_its_out_fifo, pty_given_no_fd]


class WaitingTarget:
    """One `migrate-in` target for every refused source of this module (refused,
    it waits on), with a QMP connection to it held open so that its own fd does
    not come and go in the counts."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fdb-", dir="/tmp")
        os.chmod(self.dir, 0o700)
        self.runtime = os.path.join(self.dir, "rt")
        self.env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "FDMIG_FAULT")}
        self.env["FDMIG_RUNTIME_DIR"] = self.runtime
        self.target = self.control = None
        self.moved = False  # a valid source has migrated to it: it waits no more

    @property
    def channel(self) -> str:
        return os.path.join(self.runtime, "web.migrate.sock")

    def waiting(self) -> Daemon:
        """The target, started anew if an earlier test migrated to it."""
        if self.target is None or self.target.proc.poll() is not None or self.moved:
            self.stop()
            self.moved = False
            self.target = Daemon(["migrate-in", "--name", "web"], self.dir, env=self.env, ready=False)
            deadline = time.monotonic() + 20
            # Renamed into place once listening; no event says so, hence a poll of the path.
            while not os.path.exists(self.channel):
                assert self.target.proc.poll() is None, self.target.stderr()
                assert time.monotonic() < deadline, "the target never bound its channel"
                time.sleep(0.01)
            self.control = qmp.connect(os.path.join(self.runtime, "web.incoming.sock"))
            self.baseline = self.fds()
        return self.target

    def fds(self) -> int:
        # A QMP round trip first: the target has then finished the step it was in
        # (a refusal logs and closes in one).
        self.control.execute("query-status")
        return psutil.Process(self.target.pid).num_fds()

    def stop(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.target is not None:
            self.target.close()
            self.target = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def waiting_target():
    instance = WaitingTarget()
    yield instance
    instance.close()


def drain(notify) -> None:
    """Whatever waits on a test's NOTIFY_SOCKET, into its messages."""
    notify.sock.setblocking(False)  # its wait_for sets the timeout it needs
    while True:
        try:
            data = notify.sock.recv(4096)
        except BlockingIOError:
            return
        notify.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__.replace("_", "-"))
def test_an_fd_of_the_wrong_kind_for_the_backend_is_refused_closed_and_the_target_waits_on(
        waiting_target, case):
    target = waiting_target.waiting()
    work = tempfile.mkdtemp(prefix="w", dir=waiting_target.dir)
    wrong = Wrong(work)
    try:
        case(wrong)
        logged, notified = len(target.stderr()), len(target.notify.messages)
        fake = connect_when_bound(waiting_target.channel)
        codec = wire.MigrationCodec(wire.Role.SOURCE)
        send_chunks(fake, codec.send(wire.Hello("web", os.getpid(), "0")))
        send_chunks(fake, codec.send(wire.Table({"local-char-socket": True}, [wrong.entry])))
        assert isinstance(read_event(fake, codec), wire.Accept)
        section = wire.Section(wrong.label, {}, b"", wrong.fds)
        try:
            for chunk in codec.send(wire.Precopy([section])):
                send_raw(fake, chunk.data, chunk.fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may refuse and hang up before the end frame
        for fd in wrong.ours:
            os.close(fd)
        wrong.ours = []
        reply = answer_then_hangup(fake, codec)
        fake.close()
        assert isinstance(reply, wire.Abort) and wrong.names in reply.reason, reply

        assert waiting_target.fds() == waiting_target.baseline, "the target kept an fd of the refused source"
        for witness in wrong.witnesses:
            assert witness(), "a copy of an fd the source sent is still open"
        line = f"refused source pid {os.getpid()}: {wrong.names}"
        assert line in target.stderr()[logged:], target.stderr()[logged:]
        error = waiting_target.control.execute("query-migrate").get("error-desc", "")
        assert error.startswith(line), error
        assert target.proc.poll() is None
        # Taken as they come, as a service manager does: the target drops what a
        # full NOTIFY_SOCKET queue (net.unix.max_dgram_qlen) will not take, and
        # READY=1 after the valid source must not be dropped so.
        target.notify.wait_for("STATUS", "migration failed", after=notified)
        drain(target.notify)
    finally:
        wrong.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(60)
def test_after_the_refused_sources_a_valid_source_moves_its_pty_udp_serial_and_pipe(waiting_target):
    """Runs after the refusals above (one target for all): it still takes a real source."""
    target = waiting_target.waiting()
    env = waiting_target.env
    work = os.path.join(waiting_target.dir, "valid")
    os.mkdir(work)
    master, slave = os.openpty()  # the serial line's far end is our master
    tty = os.ttyname(slave)
    os.close(slave)
    pipe = os.path.join(work, "p")
    for end in ("in", "out"):
        os.mkfifo(f"{pipe}.{end}", 0o600)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(10)
    local = free_udp_port()
    mark = "support-local-migration=on"
    source = Daemon(["serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", f"pty,id=con,{mark}",
                     "--chardev", f"serial,id=tty,path={tty},frontend=echo,{mark}",
                     "--chardev", f"pipe,id=p,path={pipe},frontend=echo,{mark}",
                     "--chardev", f"udp,id=u,host=127.0.0.1,port={peer.getsockname()[1]},localaddr=127.0.0.1,"
                                  f"localport={local},frontend=echo,{mark}"],
                    waiting_target.dir, env=env)
    pipe_in = os.open(f"{pipe}.in", os.O_WRONLY | os.O_NONBLOCK)
    pipe_out = os.open(f"{pipe}.out", os.O_RDONLY | os.O_NONBLOCK)
    peer.connect(("127.0.0.1", local))

    def read_from(fd: int, n: int) -> bytes:
        got = b""
        while len(got) < n:
            ready, _, _ = select.select([fd], [], [], 10)
            assert ready, f"{got!r} of {n} bytes within 10 s"
            got += os.read(fd, n - len(got))
        return got

    def every_backend_echoes(word: bytes) -> None:
        os.write(master, word)
        assert read_from(master, len(word)) == word
        os.write(pipe_in, word)
        assert read_from(pipe_out, len(word)) == word
        peer.send(word)
        assert peer.recv(65536) == word

    try:
        every_backend_echoes(b"before")
        with qmp.connect(os.path.join(waiting_target.runtime, "web.sock")) as client:
            before = {row["label"]: row["address"] for row in client.execute("x-fdmig-status")["chardevs"]}
        result = run("migrate-out", "--name", "web", "--timeout", "20", timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        waiting_target.moved = True
        target.wait_ready()
        assert source.proc.wait(10) == 0
        every_backend_echoes(b"moved")
        state = json.loads(run("status", "--name", "web", "--json", env=env).stdout)
        assert state["pid"] == target.pid
        assert {row["label"]: row["address"] for row in state["chardevs"]} == before
        assert all(row["state"] == "connected" and row["migrations"] == 1 for row in state["chardevs"]), state
    finally:
        source.close()
        peer.close()
        for fd in (master, pipe_in, pipe_out):
            os.close(fd)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", MISSING, ids=lambda case: case.__name__.replace("_", "-"))
def test_a_section_without_the_fd_the_backend_reads_is_refused_before_the_commit(daemons, runtime_dir, case):
    """A pty moves only live, its master with it; a pipe's FIFO read with its
    FIFO written. A section that brings the slave or the FIFO written alone (or
    nothing) would leave the target a chardev it cannot serve, or a new pty under
    another path: it must be refused before the ACK, every fd closed."""
    target = daemons("migrate-in", "--name", "web", ready=False)
    channel = os.path.join(runtime_dir, "web.migrate.sock")
    wrong = Wrong(tempfile.mkdtemp(prefix="w", dir=os.path.dirname(runtime_dir)))
    try:
        case(wrong)
        fake = connect_when_bound(channel)
        codec = wire.MigrationCodec(wire.Role.SOURCE)
        send_chunks(fake, codec.send(wire.Hello("web", os.getpid(), "0")))
        send_chunks(fake, codec.send(wire.Table({"local-char-socket": True}, [wrong.entry])))
        assert isinstance(read_event(fake, codec), wire.Accept)
        send_chunks(fake, codec.send(wire.Precopy([wire.Section(wrong.label, {}, b"", wrong.fds)])))
        for fd in wrong.ours:
            os.close(fd)
        wrong.ours = []
        reply = read_event(fake, codec)
        if isinstance(reply, wire.Held):  # refused at the TRANSFER, before the ACK, will do too
            send_chunks(fake, codec.send(wire.Transfer([])))
            reply = read_event(fake, codec)
        assert isinstance(reply, wire.Abort) and wrong.names in reply.reason, \
            f"the target answered {reply!r}; its log: {target.stderr()}"
        fake.close()
        for witness in wrong.witnesses:
            assert witness(), "a copy of an fd the source sent is still open"
        assert target.proc.poll() is None
    finally:
        wrong.close()
