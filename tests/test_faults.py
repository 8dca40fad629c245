"""A process killed at every step of a migration, each side in turn, with a peer
streaming through every moved chardev. Before the commit point the source serves
on; after it the target does; a source that dies before it has sent everything
takes its connections with it. In no case do two processes read one connection:
the probes would see a record twice or out of order."""

import os
import signal

import pytest

from tests.bench.handoff import Probes
from tests.helpers import connect_unix, run

CHARDEVS = 130  # a listener and a connection each: 260 fds, two SCM_RIGHTS batches

# (side killed, fault point, who serves afterwards). The RELIABILITY section of
# fdmig-performance(7) says this one in words.
MATRIX = [
    ("target", "target-after-hello", "source"),
    ("target", "target-after-table", "source"),
    ("target", "target-after-batch", "source"),
    ("target", "target-after-precopy", "source"),
    ("target", "target-before-ack", "source"),
    ("target", "target-after-ack", "source"),
    ("target", "target-after-released", "source"),
    ("source", "source-after-table", "nobody"),
    ("source", "source-after-batch", "nobody"),
    ("source", "source-after-precopy", "nobody"),
    ("source", "source-after-quiesce", "nobody"),
    ("source", "source-after-transfer", "target"),
    ("source", "source-after-ack", "target"),
    ("source", "source-after-released", "target"),
]


def status_pid() -> int | None:
    import json
    result = run("status", "--name", "web", "--json")
    return json.loads(result.stdout)["pid"] if result.returncode == 0 else None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("side, point, survivor", MATRIX, ids=[m[1] for m in MATRIX])
def test_kill_at_every_step(daemons, short_dir, side, point, survivor):
    fault = dict(os.environ, FDMIG_FAULT=f"{point}=kill")
    os.mkdir(os.path.join(short_dir, "c"))
    args = []
    for i in range(CHARDEVS):
        args += ["--chardev", f"id=c{i},path={short_dir}/c/{i},server=on,frontend=echo,support-local-migration=on"]
    source = daemons("serve", "--name", "web", "--capability", "local-char-socket", *args,
                     env=fault if side == "source" else None)
    peers = [connect_unix(f"{short_dir}/c/{i}") for i in range(CHARDEVS)]
    probes = Probes(peers)
    try:
        probes.wait_answers(3)
        target = daemons("migrate-in", "--name", "web", ready=False, env=fault if side == "target" else None)
        result = run("migrate-out", "--name", "web", "--timeout", "20", timeout=60)
        killed = source if side == "source" else target
        assert killed.proc.wait(20) == -signal.SIGKILL, f"the fault at {point} did not fire"
        if survivor == "source":
            assert result.returncode == 1 and "still serves every chardev" in result.stderr, result.stderr
            assert status_pid() == source.pid
            probes.wait_answers(3)  # every stream goes on, in order, once
        elif survivor == "target":
            target.wait_ready()
            assert status_pid() == target.pid
            probes.wait_answers(3)
            assert result.returncode == 0, result.stderr
        else:
            with pytest.raises(RuntimeError, match="EOF|reset|Broken pipe"):  # the peers lost their connections
                probes.wait_answers(3)
            assert target.proc.poll() is None  # it dropped the partial state and waits on
            assert result.returncode == 1
    finally:
        probes.stop()
        for peer in peers:
            peer.close()
        pid = status_pid()
        if pid not in (None, source.pid):
            os.kill(pid, signal.SIGTERM)
