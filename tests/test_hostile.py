"""Hostile peers and hostile conditions, with real processes and real sockets: a
source of another uid, a source that sends the wrong descriptors or breaks the
framing, an unsafe runtime dir, names that try to leave it, an instance at its fd
limit, a crashed instance, and a control client that never reads."""

import json
import os
import resource
import select
import signal
import socket
import stat
import struct
import time

import psutil
import pytest

from fdmig import qmp
from fdmig.errors import FdmigError
from fdmig.migration import wire
from fdmig.spec import parse_spec
from tests.helpers import (answer_then_hangup, as_uid, connect_unix, connect_when_bound, echoes, locked_file,
                           read_event, run, run_many, sees_eof, send_chunks, send_raw, status_of)

ECHO = "socket,id={label},path={path},server=on,frontend=echo,support-local-migration=on"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")


def limit_fds(n: int):
    """preexec_fn: start the process with RLIMIT_NOFILE n (soft and hard, so that
    the instance cannot raise it)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def channel_of(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "web.migrate.sock")


def incoming_of(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "web.incoming.sock")


def wait_for_target(runtime_dir: str) -> None:
    """Until the target's channel is bound (it is renamed into place once listening).
    No event says so, hence a poll of the path (as connect_when_bound does), which
    unlike connecting opens no session on the channel."""
    deadline = time.monotonic() + 10
    while not os.path.exists(channel_of(runtime_dir)):
        assert time.monotonic() < deadline, "the target never bound its channel"
        time.sleep(0.01)


# ----- 1. another uid on the migration channel --------------------------------------------------


def _hello_as(uid: int, channel: str) -> dict:
    """As `uid`: connect to the channel, send a valid HELLO and TABLE with the real
    codec, and report what came back."""
    def work() -> bytes:
        report = {}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(channel)
        report["connected"] = True
        codec = wire.MigrationCodec(wire.Role.SOURCE)
        chunks = codec.send(wire.Hello("web", os.getpid(), "0"))
        chunks += codec.send(wire.Table({"local-char-socket": True}, []))
        try:
            for chunk in chunks:
                sock.sendall(chunk.data)
        except OSError as exc:
            report["send-error"] = exc.errno  # the target may have hung up already
        received = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    report["end"] = "eof"
                    break
                received += data
        except ConnectionResetError:
            report["end"] = "reset"  # it closed with our HELLO unread: same thing
        except socket.timeout:
            report["end"] = "still open"
        report["received"] = received.hex()
        return json.dumps(report).encode()
    answer = as_uid(uid, work)
    assert not answer.startswith(b"error in the child"), answer
    return json.loads(answer)


@needs_root
def test_a_source_of_another_uid_is_refused_on_the_channel_whatever_the_modes(daemons, short_dir, runtime_dir):
    path = os.path.join(short_dir, "app.sock")
    daemons("serve", "--name", "web", "--capability", "local-char-socket",
            "--chardev", ECHO.format(label="app", path=path))
    peer = connect_unix(path)
    assert echoes(peer)
    target = daemons("migrate-in", "--name", "web", ready=False)
    wait_for_target(runtime_dir)
    os.chmod(short_dir, 0o755)
    os.chmod(runtime_dir, 0o755)
    os.chmod(channel_of(runtime_dir), 0o777)

    report = _hello_as(65534, channel_of(runtime_dir))
    assert report.get("connected"), report  # the modes let it in: only SO_PEERCRED stops it
    assert report["end"] in ("eof", "reset") and report["received"] == "", report
    assert "refused a source of uid 65534" in target.stderr()
    with qmp.connect(incoming_of(runtime_dir)) as client:
        assert client.execute("query-migrate") == {}, "no session was started for it"

    result = run("migrate-out", "--name", "web", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    target.wait_ready()
    assert echoes(peer, b"after")


# ----- 2. a source that sends the wrong descriptors, or breaks the framing -----------------------


class Attempt:
    """What one hostile source sent: the problem the target must name, and
    witnesses that each tell whether some copy of a sent descriptor is still open."""

    def __init__(self, names: str):
        self.names = names
        self.witnesses = []  # callables: True once every copy of the sent fd is closed
        self.to_close = []  # our own copies, closed once sent

    def sent(self):
        for thing in self.to_close:
            thing.close() if hasattr(thing, "close") else os.close(thing)


def connected_pair(attempt: Attempt, kind=socket.SOCK_STREAM) -> int:
    """A socketpair: one end to send (closed here once sent), the other kept as a
    witness that sees EOF when the last copy of the sent end is closed."""
    ours, kept = socket.socketpair(socket.AF_UNIX, kind)
    attempt.to_close.append(ours)
    attempt.witnesses.append(lambda: sees_eof(kept))
    return ours.fileno()


def raw_frame(ftype: wire.FrameType, payload: bytes = b"{}", nfds: int = 0, length: int | None = None) -> bytes:
    # As tests/test_wire.py builds frames by hand, to say what the codec would refuse to.
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, ftype, len(payload) if length is None else length,
                            nfds) + payload


def sections_payload(manifest) -> bytes:
    body = json.dumps(manifest).encode()
    return struct.pack("!I", len(body)) + body




def send_hostile(sock: socket.socket, chunks) -> None:
    """Send what the target should refuse. It may refuse and hang up on the first
    frame, before the rest is sent: that is no error here."""
    try:
        for data, fds in chunks:
            send_raw(sock, data, fds)
    except (BrokenPipeError, ConnectionResetError):
        pass


CLIENT = {"id": "app", "server": False, "support-local-migration": True, "x-fds": 1}


def listener_as_a_client_conn(short_dir):
    attempt = Attempt("the conn fd is a listening socket")
    path = os.path.join(short_dir, "l.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(4)
    attempt.to_close.append(listening)

    def refused():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        finally:
            probe.close()
        return False
    attempt.witnesses.append(refused)
    return attempt, {**CLIENT, "path": path}, {"conn": listening.fileno()}


def pipe_as_conn(short_dir):
    attempt = Attempt("the conn fd is not a socket")
    read_end, write_end = os.pipe()
    attempt.to_close.append(write_end)

    def eof():
        ready, _, _ = select.select([read_end], [], [], 10)
        data = os.read(read_end, 1) if ready else None
        os.close(read_end)
        return data == b""
    attempt.witnesses.append(eof)
    return attempt, {**CLIENT, "path": f"{short_dir}/p.sock"}, {"conn": write_end}


def regular_file_as_conn(short_dir):
    attempt = Attempt("the conn fd is not a socket")
    fd, unlocked = locked_file(os.path.join(short_dir, "file"))  # every copy of this fd holds the lock
    attempt.to_close.append(fd)
    attempt.witnesses.append(unlocked)
    return attempt, {**CLIENT, "path": f"{short_dir}/p.sock"}, {"conn": fd}


def seqpacket_as_conn(short_dir):
    attempt = Attempt("the conn fd is not a stream socket")
    fd = connected_pair(attempt, socket.SOCK_SEQPACKET)
    return attempt, {**CLIENT, "path": f"{short_dir}/p.sock"}, {"conn": fd}


@pytest.mark.parametrize("make", [listener_as_a_client_conn, pipe_as_conn, regular_file_as_conn,
                                  seqpacket_as_conn], ids=lambda f: f.__name__.replace("_", "-"))
def test_a_wrong_kind_of_fd_is_refused_closed_and_the_target_waits_on(hostile, make):
    fake, codec = hostile.connect()
    attempt, spec, fds = make(hostile.short_dir)
    hostile.accepted(fake, codec, spec)
    send_hostile(fake, [(c.data, c.fds) for c in codec.send(wire.Precopy([wire.Section("app", {}, b"", fds)]))])
    attempt.sent()
    hostile.refused(fake, codec, attempt, aborts=True)


def test_a_table_naming_one_chardev_twice_is_refused_and_the_target_waits_on(hostile):
    fake, codec = hostile.connect()
    attempt = Attempt("names chardev app twice")
    one = {**CLIENT, "path": os.path.join(hostile.short_dir, "a.sock")}
    send_chunks(fake, codec.send(wire.Hello("web", os.getpid(), "0")))
    send_chunks(fake, codec.send(wire.Table({"local-char-socket": True},
                                            [one, {**one, "path": os.path.join(hostile.short_dir, "b.sock")}])))
    hostile.refused(fake, codec, attempt, aborts=True)


def test_two_listeners_on_one_path_far_apart_in_a_table_are_refused(hostile):
    # The target checks the set a slice at a time (target.CHECK_SLICE): a
    # conflict between the first chardev and the last spans every slice.
    from fdmig.migration import target
    fake, codec = hostile.connect()
    attempt = Attempt("do not fit together")
    listener = {"id": "l0", "server": True, "support-local-migration": True, "x-fds": 1,
                "path": os.path.join(hostile.short_dir, "l.sock")}
    clients = [{**CLIENT, "id": f"c{i}", "path": os.path.join(hostile.short_dir, f"c{i}.sock")}
               for i in range(2 * target.CHECK_SLICE)]
    send_chunks(fake, codec.send(wire.Hello("web", os.getpid(), "0")))
    table = [listener, *clients, {**listener, "id": "l1"}]
    send_chunks(fake, codec.send(wire.Table({"local-char-socket": True}, table)))
    hostile.refused(fake, codec, attempt, aborts=True)


def test_a_state_naming_a_held_fd_the_precopy_did_not_bring_is_refused_and_every_fd_closed(hostile):
    fake, codec = hostile.connect()
    path = os.path.join(hostile.short_dir, "held.sock")
    attempt = Attempt("names a held fd 'listener'")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    conn = connect_unix(path)  # what a client chardev at `path` holds: it passes every check
    accepted, _ = server.accept()
    attempt.to_close += [server, conn]
    attempt.witnesses.append(lambda: sees_eof(accepted))
    hostile.accepted(fake, codec, {**CLIENT, "path": path})
    send_chunks(fake, codec.send(wire.Precopy([wire.Section("app", {}, b"", {"conn": conn.fileno()})])))
    assert isinstance(read_event(fake, codec), wire.Held)
    attempt.sent()
    send_chunks(fake, codec.send(wire.Transfer([wire.Section("app", {"held": ["listener"]})])))
    hostile.refused(fake, codec, attempt, aborts=True)


def hand_over_one(hostile, meta: dict, released: dict):
    """As a source would, up to the target's TAKEN: one client chardev, `app`,
    with `meta` in the precopy and `released` as RELEASED's info. The chardev's
    listening end and connection, for the caller to close."""
    fake, codec = hostile.connect()
    path = os.path.join(hostile.short_dir, "one.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    conn = connect_unix(path)
    hostile.accepted(fake, codec, {**CLIENT, "path": path})
    send_chunks(fake, codec.send(wire.Precopy([wire.Section("app", meta, b"", {"conn": conn.fileno()})])))
    assert isinstance(read_event(fake, codec), wire.Held)
    send_chunks(fake, codec.send(wire.Transfer([])))
    assert isinstance(read_event(fake, codec), wire.Ack)
    send_chunks(fake, codec.send(wire.Released(released)))
    assert isinstance(read_event(fake, codec), wire.Taken)
    fake.close()
    hostile.target.wait_ready()
    return server, conn


def test_junk_in_a_sections_meta_is_dropped_on_the_way_into_the_target(hostile):
    junk = {"rx-bytes": "lots", "tx-bytes": -5, "migrations": 2.5, "peer": [[1]], "connected-since": 1e300}
    server, conn = hand_over_one(hostile, junk, {"counters": [["app", "x", 1], 7]})
    state = status_of(os.path.join(hostile.runtime_dir, "web.sock"))
    [row] = state["chardevs"]
    assert state["pid"] == hostile.target.pid and row["state"] == "connected"
    assert (row["rx-bytes"], row["tx-bytes"], row["migrations"], row["peer-pid"]) == (0, 0, 1, os.getpid())
    assert "ignored a malformed byte count" in hostile.target.stderr()
    conn.close()
    server.close()


def test_byte_counts_announced_after_released_that_never_come_leave_the_precopy_s(hostile):
    """A source whose RELEASED says its byte counts follow, and which then
    goes: the target takes over all the same, on the precopy's counts."""
    counted = wire.SectionState.meta(4, 4, 0, None, None, (), ())
    server, conn = hand_over_one(hostile, counted, {"counters": [], "counters-after": True})
    [row] = status_of(os.path.join(hostile.runtime_dir, "web.sock"))["chardevs"]
    assert row["state"] == "connected" and (row["rx-bytes"], row["tx-bytes"]) == (4, 4)
    assert "byte counts since the precopy did not come after RELEASED" in hostile.target.stderr()
    conn.close()
    server.close()


def more_fds_than_the_manifest_lists(attempt):
    manifest = [{"label": "app", "meta": {}, "outbuf": 0, "fds": ["conn"]}]
    fds = [connected_pair(attempt), connected_pair(attempt)]
    return raw_frame(wire.FrameType.PRECOPY, sections_payload(manifest), nfds=2), fds


def more_fds_than_the_header_counts(attempt):
    manifest = [{"label": "app", "meta": {}, "outbuf": 0, "fds": ["conn"]}]
    fds = [connected_pair(attempt) for _ in range(3)]
    return raw_frame(wire.FrameType.PRECOPY, sections_payload(manifest), nfds=1), fds


def fds_on_an_end_frame(attempt):
    payload = json.dumps({"sections": 0, "fds": 0}).encode()
    return raw_frame(wire.FrameType.END, payload, nfds=1), [connected_pair(attempt)]


def fds_on_a_table_end_frame(attempt):
    return raw_frame(wire.FrameType.TABLE_END, b'{"chardevs": 0}', nfds=1), [connected_pair(attempt)]


def a_frame_over_max_frame(attempt):
    # Only the header and a few bytes: the target must refuse on the header alone.
    return (raw_frame(wire.FrameType.PRECOPY, b"\0" * 64, nfds=1, length=wire.MAX_FRAME + 1),
            [connected_pair(attempt)])


def a_frame_of_4_gib(attempt):
    return raw_frame(wire.FrameType.PRECOPY, b"\0" * 64, nfds=1, length=0xFFFFFFFF), [connected_pair(attempt)]


FRAMING = {
    more_fds_than_the_manifest_lists: "PRECOPY frame header claims 2 fds but its manifest lists 1",
    more_fds_than_the_header_counts: "2 fds arrived with no manifest entry",
    fds_on_an_end_frame: "END frame claims 1 fds; only PRECOPY and SECTIONS frames carry fds",
    fds_on_a_table_end_frame: "TABLE_END frame claims 1 fds; only PRECOPY and SECTIONS frames carry fds",
    a_frame_over_max_frame: f"frame of {wire.MAX_FRAME + 1} bytes exceeds the {wire.MAX_FRAME}-byte bound",
    a_frame_of_4_gib: f"frame of {0xFFFFFFFF} bytes exceeds the {wire.MAX_FRAME}-byte bound",
}


@pytest.mark.parametrize("make", list(FRAMING), ids=lambda f: f.__name__.replace("_", "-"))
def test_a_frame_that_breaks_the_fd_framing_is_refused_every_fd_closed_and_the_target_waits_on(hostile, make):
    fake, codec = hostile.connect()
    hostile.accepted(fake, codec, {**CLIENT, "path": f"{hostile.short_dir}/p.sock"})
    attempt = Attempt(FRAMING[make])
    data, fds = make(attempt)
    send_hostile(fake, [(data, fds)])
    attempt.sent()
    hostile.refused(fake, codec, attempt, aborts=False)


# Regression: the codec counted stray fds only when it ran out of data, so one riding
# on END slipped through and the target acknowledged. The same holds for HELD.
@pytest.mark.parametrize("end", [wire.FrameType.PRECOPY_END, wire.FrameType.END], ids=lambda t: t.name)
def test_an_uncounted_fd_riding_on_an_end_frame_is_refused_before_the_answer(hostile, end):
    fake, codec = hostile.connect()
    hostile.accepted(fake, codec, {**CLIENT, "path": f"{hostile.short_dir}/p.sock"})
    if end is wire.FrameType.END:
        send_chunks(fake, codec.send(wire.Precopy([])))
        assert isinstance(read_event(fake, codec), wire.Held)
    attempt = Attempt("1 fds arrived with no manifest entry")
    payload = json.dumps({"sections": 0, "fds": 0}).encode()
    send_hostile(fake, [(raw_frame(end, payload, nfds=0), [connected_pair(attempt)])])
    attempt.sent()
    fake.settimeout(10)
    try:
        first = fake.recv(wire.HEADER.size, socket.MSG_PEEK)  # an ACK here would be the commit
    except ConnectionResetError:
        first = b""
    if len(first) == wire.HEADER.size:
        answer = wire.FrameType(wire.HEADER.unpack(first)[2])
        assert answer is wire.FrameType.ABORT, f"the target answered {answer.name}, with an unlisted fd"
    hostile.refused(fake, codec, attempt, aborts=False)


class Hostile:
    """A real source serving a peer, a real target waiting, and a QMP connection to
    the target held open (so that its own fd does not come and go in the counts)."""

    def __init__(self, daemons, short_dir, runtime_dir, **target_popen):
        self.short_dir, self.runtime_dir = short_dir, runtime_dir
        path = os.path.join(short_dir, "app.sock")
        self.source = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                              "--chardev", ECHO.format(label="app", path=path))
        self.peer = connect_unix(path)
        assert echoes(self.peer)
        self.target = daemons("migrate-in", "--name", "web", ready=False, **target_popen)
        wait_for_target(runtime_dir)
        self.control = qmp.connect(incoming_of(runtime_dir))
        self.baseline = self.target_fds()

    def target_fds(self) -> int:
        # A QMP round trip first: the target's loop has then finished whatever step
        # it was in (a refusal logs, notifies and closes in one step).
        self.control.execute("query-status")
        return psutil.Process(self.target.pid).num_fds()

    def connect(self):
        return connect_when_bound(channel_of(self.runtime_dir)), wire.MigrationCodec(wire.Role.SOURCE)

    def accepted(self, fake, codec, *chardevs) -> None:
        send_chunks(fake, codec.send(wire.Hello("web", os.getpid(), "0")))
        send_chunks(fake, codec.send(wire.Table({"local-char-socket": True}, list(chardevs))))
        assert isinstance(read_event(fake, codec), wire.Accept)

    def refused(self, fake, codec, attempt: Attempt, aborts: bool) -> None:
        """The target refused, naming the problem; every fd sent is closed; the
        target waits on and a real source migrates to it."""
        reply = answer_then_hangup(fake, codec)
        fake.close()
        if aborts:
            assert isinstance(reply, wire.Abort) and attempt.names in reply.reason, reply
        else:
            assert isinstance(reply, (wire.Abort, wire.ConnectionClosed)), reply
        assert self.target_fds() == self.baseline, "the target kept a descriptor of the refused source"
        for witness in attempt.witnesses:
            assert witness(), "a copy of a descriptor the source sent is still open"
        error = self.control.execute("query-migrate").get("error-desc", "")
        assert f"refused source pid {os.getpid()}" in error and attempt.names in error, error
        assert f"refused source pid {os.getpid()}: " in self.target.stderr()
        assert self.target.proc.poll() is None
        self.control.close()
        result = run("migrate-out", "--name", "web", "--timeout", "10")
        assert result.returncode == 0, result.stderr
        self.target.wait_ready()
        assert echoes(self.peer, b"moved")
        assert status_of(os.path.join(self.runtime_dir, "web.sock"))["pid"] == self.target.pid


@pytest.fixture
def hostile(daemons, short_dir, runtime_dir):
    instance = Hostile(daemons, short_dir, runtime_dir)
    yield instance
    instance.control.close()


# ----- 3. the runtime dir, and names that try to leave it ----------------------------------------


@pytest.mark.parametrize("command", ["serve", "migrate-in"])
def test_a_runtime_dir_writable_by_others_is_refused_naming_it_and_the_mode(short_dir, monkeypatch, command):
    unsafe = os.path.join(short_dir, "open")
    os.mkdir(unsafe)
    os.chmod(unsafe, 0o777)
    monkeypatch.setenv("FDMIG_RUNTIME_DIR", unsafe)
    result = run(command, "--name", "web", "--timeout", "1") if command == "migrate-in" else run(command)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"fdmig: runtime dir {unsafe} is writable by others (mode 0777); expected 0700"]
    assert os.listdir(unsafe) == []


@needs_root
def test_a_runtime_dir_of_another_uid_is_refused_naming_the_owner(short_dir, monkeypatch):
    foreign = os.path.join(short_dir, "theirs")
    os.mkdir(foreign, 0o700)
    os.chown(foreign, 65534, 65534)
    monkeypatch.setenv("FDMIG_RUNTIME_DIR", foreign)
    serve, incoming = run_many([["serve"], ["migrate-in", "--name", "web", "--timeout", "1"]])
    for result in (serve, incoming):
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [
            f"fdmig: runtime dir {foreign} is owned by uid 65534, not by uid {os.geteuid()}"]
    assert os.listdir(foreign) == []


def test_a_runtime_dir_that_is_a_symlink_is_refused(short_dir, monkeypatch):
    real = os.path.join(short_dir, "real")
    os.mkdir(real, 0o700)
    link = os.path.join(short_dir, "link")
    os.symlink(real, link)
    monkeypatch.setenv("FDMIG_RUNTIME_DIR", link)
    result = run("serve")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"fdmig: runtime dir {link} is not a directory"]
    assert os.listdir(real) == []


def test_names_and_labels_cannot_leave_the_runtime_dir(daemons, short_dir, runtime_dir):
    daemons("serve", "--name", "web")
    before = sorted(os.listdir(short_dir))
    escapes = ["../x", "a/b", f"{short_dir}/abs", ".hidden", "-x"]
    commands = []
    for name in escapes:
        commands += [["serve", "--name", name], ["migrate-in", "--name", name, "--timeout", "1"],
                     ["migrate-out", "--name", name], ["status", "--name", name]]
    for label in ["a/b", "../x", "x/../../y"]:
        spec = f"socket,id={label},path={short_dir}/c.sock,server=on"
        commands += [["serve", "--name", "other", "--chardev", spec], ["attach", "--name", "web", spec],
                     ["migrate-in", "--name", "other", "--chardev", spec]]
    for result in run_many(commands):
        assert result.returncode == 2, (result.args, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "accepted: a letter, then letters, digits" in result.stderr, result.stderr
    with qmp.connect(os.path.join(runtime_dir, "web.sock")) as client:
        for label in ["a/b", "../x"]:
            with pytest.raises(FdmigError, match="not a valid id"):
                client.execute("chardev-add", {**parse_spec(f"id=ok,path={short_dir}/c.sock,server=on").to_qmp(),
                                               "id": label})
        assert client.execute("query-chardev") == []
    assert sorted(os.listdir(short_dir)) == before
    assert sorted(os.listdir(runtime_dir)) == ["web.sock"]


# ----- 4. resource limits ------------------------------------------------------------------------


def test_at_its_fd_limit_an_instance_refuses_attach_and_keeps_serving(daemons, short_dir, runtime_dir):
    path = os.path.join(short_dir, "app.sock")
    daemons("serve", "--name", "web", "--chardev", ECHO.format(label="app", path=path), preexec_fn=limit_fds(64))
    peer = connect_unix(path)
    assert echoes(peer)
    control = os.path.join(runtime_dir, "web.sock")
    with qmp.connect(control) as client:
        for i in range(64):
            spec = parse_spec(f"id=f{i},path={short_dir}/f{i}.sock,server=on")
            try:
                client.execute("chardev-add", spec.to_qmp())
            except FdmigError as exc:
                assert "fd limit" in str(exc) and "RLIMIT_NOFILE" in str(exc), exc
                break
        else:
            pytest.fail("64 chardevs attached under RLIMIT_NOFILE 64")
    filled = i
    assert filled > 5, "the limit bit before the instance held anything"
    assert not os.path.exists(f"{short_dir}/f{filled}.sock")
    os.mkdir(f"{short_dir}/srv")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{short_dir}/srv/s.sock")
    server.listen(4)
    # One at a time: a control connection holds an fd too, and which fd numbers are
    # free decides the refusal.
    new_server = run("attach", "--name", "web", f"socket,id=late,path={short_dir}/late.sock,server=on")
    new_client = run("attach", "--name", "web", f"socket,id=out,path={short_dir}/srv/s.sock")
    state = run("status", "--name", "web", "--json")
    for result in (new_server, new_client):
        assert result.returncode == 1, (result.args, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "fd limit" in result.stderr and "RLIMIT_NOFILE" in result.stderr, result.stderr
    assert not os.path.exists(f"{short_dir}/late.sock")
    assert state.returncode == 0, state.stderr
    labels = [c["label"] for c in json.loads(state.stdout)["chardevs"]]
    assert labels == ["app"] + [f"f{i}" for i in range(filled)]
    assert echoes(peer, b"still")
    # Room again once a chardev goes.
    assert run("detach", "--name", "web", "f0").returncode == 0
    result = run("attach", "--name", "web", f"socket,id=late,path={short_dir}/late.sock,server=on")
    assert result.returncode == 0, result.stderr


def test_a_migration_needing_more_fds_than_the_target_can_open_is_refused_before_the_commit(
        daemons, short_dir, runtime_dir):
    os.mkdir(f"{short_dir}/c")
    paths = [f"{short_dir}/c/{i}" for i in range(40)]
    args = []
    for i, path in enumerate(paths):
        args += ["--chardev", ECHO.format(label=f"c{i}", path=path)]
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket", *args)
    peers = [connect_unix(path) for path in paths]
    for peer in peers:
        assert echoes(peer)
    target = daemons("migrate-in", "--name", "web", ready=False, preexec_fn=limit_fds(64))
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    assert result.returncode == 1, result.stderr
    assert "RLIMIT_NOFILE" in result.stderr and "80 fds would come" in result.stderr, result.stderr
    assert "still serves every chardev" in result.stderr
    assert status_of(os.path.join(runtime_dir, "web.sock"))["pid"] == source.pid
    for peer in peers:
        assert echoes(peer, b"here")
    assert target.proc.poll() is None
    with qmp.connect(incoming_of(runtime_dir)) as client:
        reply = client.execute("query-migrate")
    assert reply["status"] == "failed" and "RLIMIT_NOFILE" in reply["error-desc"]
    # The target waits on: once the source holds what it can take, it takes it.
    with qmp.connect(os.path.join(runtime_dir, "web.sock")) as client:
        for i in range(8, 40):
            client.execute("chardev-remove", {"id": f"c{i}"})
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    target.wait_ready()
    for peer in peers[:8]:
        assert echoes(peer, b"moved")
    assert status_of(os.path.join(runtime_dir, "web.sock"))["pid"] == target.pid


def test_a_source_that_understates_its_fds_past_the_targets_limit_is_dropped_and_nothing_leaks(
        daemons, short_dir, runtime_dir):
    hostile = Hostile(daemons, short_dir, runtime_dir, preexec_fn=limit_fds(64))
    try:
        fake, codec = hostile.connect()
        # The table says one fd will come (well within the target's headroom)...
        hostile.accepted(fake, codec, {**CLIENT, "path": f"{short_dir}/p.sock"})
        attempt = Attempt("ancillary data truncated")
        fds = [connected_pair(attempt) for _ in range(100)]
        manifest = [{"label": "app", "meta": {}, "outbuf": 0, "fds": [f"r{i}" for i in range(100)]}]
        # ...and 100 come, more than RLIMIT_NOFILE 64 lets the target install.
        send_hostile(fake, [(raw_frame(wire.FrameType.SECTIONS, sections_payload(manifest), nfds=100), fds)])
        attempt.sent()
        reply = answer_then_hangup(fake, codec)
        fake.close()
        assert isinstance(reply, (wire.Abort, wire.ConnectionClosed)), reply
        assert hostile.target_fds() == hostile.baseline
        assert all(witness() for witness in attempt.witnesses), "the target kept some of the 100 fds"
        error = hostile.control.execute("query-migrate").get("error-desc", "")
        assert f"source pid {os.getpid()}" in error and "truncated" in error, error
        hostile.control.close()
        result = run("migrate-out", "--name", "web", "--timeout", "10")
        assert result.returncode == 0, result.stderr
        hostile.target.wait_ready()
        assert echoes(hostile.peer, b"moved")
    finally:
        hostile.control.close()


# ----- 5. a crashed instance ---------------------------------------------------------------------


def test_a_killed_instance_leaves_a_stale_socket_status_exits_3_and_a_new_one_starts(daemons, short_dir,
                                                                                     runtime_dir):
    path = os.path.join(short_dir, "app.sock")
    control = os.path.join(runtime_dir, "web.sock")
    crashed = daemons("serve", "--name", "web", "--chardev", ECHO.format(label="app", path=path))
    peer = connect_unix(path)
    assert echoes(peer)
    crashed.proc.send_signal(signal.SIGKILL)
    assert crashed.proc.wait(10) == -signal.SIGKILL
    assert sees_eof(peer)
    assert stat.S_ISSOCK(os.lstat(control).st_mode), "no stale control socket to test with"
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    result = run("status", "--name", "web")
    assert result.returncode == 3
    assert result.stderr.splitlines() == [f"fdmig: no instance answers at {control}"]
    successor = daemons("serve", "--name", "web", "--chardev", ECHO.format(label="app", path=path))
    assert status_of(control)["pid"] == successor.pid
    assert echoes(connect_unix(path), b"again")


def test_a_killed_waiting_target_leaves_stale_sockets_and_a_new_target_takes_the_migration(
        daemons, short_dir, runtime_dir):
    path = os.path.join(short_dir, "app.sock")
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket",
                     "--chardev", ECHO.format(label="app", path=path))
    peer = connect_unix(path)
    assert echoes(peer)
    crashed = daemons("migrate-in", "--name", "web", ready=False)
    wait_for_target(runtime_dir)
    crashed.proc.send_signal(signal.SIGKILL)
    assert crashed.proc.wait(10) == -signal.SIGKILL
    for stale in (channel_of(runtime_dir), incoming_of(runtime_dir)):
        assert stat.S_ISSOCK(os.lstat(stale).st_mode), f"no stale {stale} to test with"
    assert status_of(os.path.join(runtime_dir, "web.sock"))["pid"] == source.pid
    successor = daemons("migrate-in", "--name", "web", ready=False)
    result = run("migrate-out", "--name", "web", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    successor.wait_ready()
    assert echoes(peer, b"moved")
    assert status_of(os.path.join(runtime_dir, "web.sock"))["pid"] == successor.pid


# ----- 6. a control client that never reads -----------------------------------------------------


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# Regression: accepted control connections were blocking; a client that stopped reading froze the loop.
def test_a_control_client_that_never_reads_is_dropped_and_memory_stays_bounded(daemons, short_dir, runtime_dir):
    path = os.path.join(short_dir, "app.sock")
    os.mkdir(f"{short_dir}/h")
    bulk = []
    for i in range(60):  # a ~24 KiB x-fdmig-status reply: 1,500 of them are twice the 16 MiB bound
        bulk += ["--chardev", f"socket,id=hold{i},path={short_dir}/h/{i},server=on"]
    instance = daemons("serve", "--name", "web", "--chardev", ECHO.format(label="app", path=path), *bulk)
    peer = connect_unix(path)
    assert echoes(peer)
    before = peak_rss(instance.pid)
    flooder = connect_unix(os.path.join(runtime_dir, "web.sock"))
    try:
        assert b'"QMP"' in flooder.recv(65536)
        # 45 KB of requests: they fit in the socket buffer, so we never need to read.
        flooder.sendall(b'{"execute": "qmp_capabilities"}' + b'{"execute": "x-fdmig-status"}' * 1500)
        # Meanwhile the instance answers others and serves its chardevs.
        with qmp.connect(os.path.join(runtime_dir, "web.sock"), timeout=3) as client:
            assert client.execute("x-fdmig-status")["pid"] == instance.pid
        peer.settimeout(3)
        assert echoes(peer, b"still")
        # Still without reading: the instance must hang up on us by itself.
        hangup = select.poll()
        hangup.register(flooder.fileno(), select.POLLRDHUP)
        assert hangup.poll(20_000), "the instance never dropped the client that does not read"
        flooder.settimeout(10)
        received = 0
        try:
            while chunk := flooder.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass  # dropped with requests of ours unread
        assert received < 16 << 20, "it was not dropped: every reply came"
    finally:
        flooder.close()  # a frozen instance blocked in send() to it wakes up
    assert "dropped a client that does not read its replies" in instance.stderr()
    grown = peak_rss(instance.pid) - before
    assert grown < 48 << 20, f"peak RSS grew by {grown >> 20} MiB"
    assert echoes(peer, b"again")


def test_a_target_asks_for_what_only_it_reads():
    """ACCEPT says which of the newer exchanges a target takes: the byte counts
    behind RELEASED unless it hands the fds on to a program, which would leave
    them unread (and close with bytes unread: a reset, which may lose its
    TAKEN); the TCP state alone of chardevs staged from the precopy only over
    TCP."""
    from fdmig.migration.target import accept_info
    assert wire.TargetInfo.decode(accept_info({"pid": 7}, remote=False)) == wire.TargetInfo(pid=7, counters_after=True)
    served = wire.TargetInfo.decode(accept_info({"pid": 7}, remote=True))
    assert served.counters_after and served.tcp_precopy
    handed_on = wire.TargetInfo.decode(accept_info({"pid": 7, "exec": True}, remote=True))
    assert handed_on.exec and not handed_on.counters_after
