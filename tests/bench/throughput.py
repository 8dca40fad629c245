"""Bridge throughput against socat relaying the same stream, start-up time against
a bare Python, both with real processes over real unix sockets."""

import os
import socket
import subprocess
import sys
import time

from tests.bench.handoff import start_instance
from tests.helpers import FDMIG, connect_when_bound

CHUNK = 1 << 20


def _pump(writer: socket.socket, reader: socket.socket, total: int) -> float:
    """Seconds to move `total` bytes from writer's peer to reader's peer. The writer
    is a process of its own: with both ends in one, the GIL between them, not the
    relay, would be what is measured."""
    data = b"\x5a" * CHUNK
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            sent = 0
            while sent < total:
                writer.sendall(data[: min(CHUNK, total - sent)])
                sent += min(CHUNK, total - sent)
        finally:
            os._exit(0)
    buf = bytearray(CHUNK)
    got = 0
    try:
        while got < total:
            n = reader.recv_into(buf)
            if not n:
                raise RuntimeError(f"EOF after {got} of {total} bytes")
            got += n
        return time.monotonic() - started
    finally:
        os.waitpid(pid, 0)


def measure_bridge(total: int, workdir: str) -> float:
    env = dict(os.environ, FDMIG_RUNTIME_DIR=os.path.join(workdir, "rt-bridge"))
    a, b = os.path.join(workdir, "bridge-a.sock"), os.path.join(workdir, "bridge-b.sock")
    proc = start_instance(["serve", "--name", "bridge", "--chardev", f"socket,id=b,path={b},server=on",
                           "--chardev", f"socket,id=a,path={a},server=on,bridge=b"], workdir, env)
    try:
        reader, writer = connect_when_bound(b), connect_when_bound(a)
        return _pump(writer, reader, total)
    finally:
        proc.terminate()
        proc.wait(20)


def measure_socat(total: int, workdir: str) -> float:
    a, b = os.path.join(workdir, "socat-a.sock"), os.path.join(workdir, "socat-b.sock")
    proc = subprocess.Popen(["socat", f"UNIX-LISTEN:{a}", f"UNIX-LISTEN:{b}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        writer = connect_when_bound(a)
        reader = connect_when_bound(b)
        return _pump(writer, reader, total)
    finally:
        proc.kill()
        proc.wait(20)


HAPROXY_CFG = """\
global
    maxconn 16
defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 120s
    timeout server 120s
listen bridge
    bind unix@{a}
    server backend unix@{b}
"""


def measure_haproxy(total: int, workdir: str) -> float:
    """HAProxy in `mode tcp` (splicing where it can), between the same unix sockets:
    it accepts on a and connects to b per client, as a bridge's client side does."""
    a, b = os.path.join(workdir, "haproxy-a.sock"), os.path.join(workdir, "haproxy-b.sock")
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.bind(b)
    backend.listen(1)
    backend.settimeout(20)
    config = os.path.join(workdir, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(HAPROXY_CFG.format(a=a, b=b))
    proc = subprocess.Popen(["haproxy", "-db", "-q", "-f", config], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        writer = connect_when_bound(a)
        reader, _ = backend.accept()
        return _pump(writer, reader, total)
    finally:
        proc.kill()
        proc.wait(20)
        backend.close()


def measure_startup(argv: list[str], repeats: int, env=None) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
        samples.append(time.monotonic() - started)
    return samples


def startup_commands() -> dict[str, list[str]]:
    """What a user types: the `fdmig` script installed beside this interpreter (in
    its venv, say) when there is one, not whichever fdmig PATH finds first."""
    import sysconfig
    script = os.path.join(sysconfig.get_path("scripts"), "fdmig")
    fdmig = [script] if os.access(script, os.X_OK) else FDMIG
    return {"python3 -c pass": [sys.executable, "-c", "pass"],
            "fdmig --version": fdmig + ["--version"],
            "fdmig status": fdmig + ["status", "--name", "startup"]}
