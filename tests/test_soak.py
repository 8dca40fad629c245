"""Soak: many back-and-forth migrations of many streaming chardevs, and many
rollbacks of one source; nothing lost, and neither fds nor memory grow.

The CI size keeps the suite short; FDMIG_SOAK=1 runs the full size (200
migrations, 100 chardevs, 200 rollbacks)."""

import json
import os
import signal
import socket
import threading

import psutil
import pytest

from fdmig import fdpass
from fdmig.migration import wire
from tests.bench.handoff import Probes
from tests.helpers import connect_unix, run

FULL = bool(os.environ.get("FDMIG_SOAK"))
CHARDEVS = 100
MIGRATIONS = 200 if FULL else 20
ROLLBACKS = 200 if FULL else 40


def serving_process() -> psutil.Process:
    result = run("status", "--name", "web", "--json")
    assert result.returncode == 0, result.stderr
    return psutil.Process(json.loads(result.stdout)["pid"])


@pytest.fixture
def streaming_instance(daemons, short_dir):
    os.mkdir(os.path.join(short_dir, "c"))
    args = []
    for i in range(CHARDEVS):
        args += ["--chardev", f"id=c{i},path={short_dir}/c/{i},server=on,frontend=echo,support-local-migration=on"]
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket", *args)
    peers = [connect_unix(f"{short_dir}/c/{i}") for i in range(CHARDEVS)]
    probes = Probes(peers)
    probes.wait_answers(3)
    yield source, probes
    probes.stop()
    for peer in peers:
        peer.close()
    pid = serving_process().pid
    if pid != source.pid:
        os.kill(pid, signal.SIGTERM)


@pytest.mark.timeout(600 if FULL else 120)
def test_back_and_forth_migrations_lose_nothing_and_leak_nothing(streaming_instance):
    source, probes = streaming_instance
    fds, rss = [], []
    for _ in range(MIGRATIONS):
        result = run("migrate-out", "--name", "web", "--spawn", "--timeout", "30")
        assert result.returncode == 0, result.stderr
        probes.wait_answers(2)  # every stream goes on, in order, exactly once
        process = serving_process()
        fds.append(process.num_fds())
        rss.append(process.memory_info().rss)
    # Each migration lands in a fresh process: they must all hold the same fds
    # (100 listeners, 100 connections, the poller, the control socket) and the
    # same memory, within the noise of a Python heap.
    assert len(set(fds[2:])) == 1, f"open fds drift across migrations: {fds}"
    assert max(rss[2:]) - min(rss[2:]) < 8 * 2**20, f"RSS drifts across migrations: {rss}"


def aborting_target(path: str, rounds: int, done: threading.Event) -> threading.Thread:
    """A target that takes the whole transfer, fds and all, then aborts: the source
    quiesces, sends everything and rolls back, `rounds` times."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)

    def serve():
        with listener:
            for _ in range(rounds):
                conn, _ = listener.accept()
                conn.settimeout(30)
                with conn:
                    codec = wire.MigrationCodec(wire.Role.TARGET)
                    received = []
                    while True:
                        event = codec.next_event()
                        if event is wire.NEED_DATA:
                            data, fds = fdpass.recv_with_fds(conn, 1 << 20)
                            received += fds
                            codec.receive_data(data, len(fds))
                        elif isinstance(event, wire.Table):
                            conn.sendall(b"".join(c.data for c in codec.send(wire.Accept())))
                        elif isinstance(event, wire.Precopy):
                            conn.sendall(b"".join(c.data for c in codec.send(wire.Held())))
                        elif isinstance(event, wire.Transfer):
                            break
                    fdpass.close_fds(received)
                    conn.sendall(b"".join(c.data for c in codec.send(wire.Abort("soak: no, thanks"))))
                    while conn.recv(65536):  # until the source hangs up
                        pass
        done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(600 if FULL else 120)
def test_rollbacks_after_a_full_transfer_leak_nothing_in_the_source(streaming_instance, runtime_dir):
    source, probes = streaming_instance
    done = threading.Event()
    channel = os.path.join(runtime_dir, "soak.migrate.sock")
    aborting_target(channel, ROLLBACKS, done)
    process = psutil.Process(source.pid)
    fds, rss = [], []
    for _ in range(ROLLBACKS):
        result = run("migrate-out", "--name", "web", "--channel", f"unix:{channel}", "--timeout", "30")
        assert result.returncode == 1 and "soak: no, thanks" in result.stderr, result.stderr
        probes.wait_answers(1)
        fds.append(process.num_fds())
        rss.append(process.memory_info().rss)
    assert done.wait(30)
    assert len(set(fds[2:])) == 1, f"the source's open fds drift across rollbacks: {fds}"
    assert max(rss[5:]) - min(rss[5:]) < 8 * 2**20, f"the source's RSS drifts across rollbacks: {rss}"
