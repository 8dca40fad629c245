"""The unit files of fdmig-systemd(7), run as written in the parts that need no
systemd as PID 1: ExecStart under a real NOTIFY_SOCKET (Type=notify readiness),
ExecReload as the live handover (MAINPID= then READY=1), and the socket unit's
ListenStream=/FileDescriptorName= through systemd-socket-activate."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Notify, connect_unix, connect_when_bound, needs, recv_exactly

PAGE = Path(__file__).resolve().parent.parent / "man" / "fdmig-systemd.7"


def unit_blocks() -> list[str]:
    """The example blocks of the page, as a reader sees them."""
    text = PAGE.read_text()
    blocks = re.findall(r"^\.EX\n(.*?)^\.EE", text, re.S | re.M)
    return [b.replace("\\-", "-").replace("\\e", "\\") for b in blocks]


def directive(block: str, key: str) -> str:
    joined = re.sub(r"\\\n\s*", " ", block)  # systemd's line continuation
    return re.search(rf"^{key}=(.*)$", joined, re.M).group(1).strip()


def service(marker: str) -> str:
    return next(b for b in unit_blocks() if "[Service]" in b and marker in b)


def as_run_here(command: str, workdir: str) -> list[str]:
    """The unit's command line with this fdmig and a private /run/web."""
    argv = shlex.split(command.replace("/run/web", workdir))
    assert argv[0] == "/usr/bin/fdmig"
    return [sys.executable, "-m", "fdmig"] + argv[1:]


def test_notify_service_starts_ready_and_reloads_live(runtime_dir, short_dir):
    unit = service("path=/run/web/app.sock")
    assert directive(unit, "Type") == "notify" and directive(unit, "NotifyAccess") == "all"
    notify = Notify(short_dir)
    env = dict(os.environ, NOTIFY_SOCKET=notify.path)
    main = subprocess.Popen(as_run_here(directive(unit, "ExecStart"), short_dir), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        notify.wait_for("READY", "1", alive=lambda: main.poll() is None)
        peer = connect_unix(os.path.join(short_dir, "app.sock"))
        peer.sendall(b"before reload")
        assert recv_exactly(peer, 13) == b"before reload"
        mark = len(notify.messages)
        reload = subprocess.run(as_run_here(directive(unit, "ExecReload"), short_dir), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        assert reload.returncode == 0
        new_pid = int(notify.wait_for("MAINPID", after=mark)["MAINPID"])
        assert new_pid != main.pid
        notify.wait_for("READY", "1", after=mark)
        assert main.wait(10) == 0  # the old main process is gone; systemd follows MAINPID
        peer.sendall(b"after reload")
        assert recv_exactly(peer, 12) == b"after reload"
        os.kill(new_pid, 15)
    finally:
        if main.poll() is None:
            main.kill()
        notify.close()


@needs("systemd-socket-activate")
def test_socket_activated_service_serves_the_units_socket_and_reloads_live(runtime_dir, short_dir):
    socket_unit = next(b for b in unit_blocks() if "[Socket]" in b)
    unit = service("fdname=")
    path = directive(socket_unit, "ListenStream").replace("/run/web", short_dir)
    name = directive(socket_unit, "FileDescriptorName")
    notify = Notify(short_dir)
    env = dict(os.environ, NOTIFY_SOCKET=notify.path)
    activator = subprocess.Popen(["systemd-socket-activate", "-l", path, f"--fdname={name}",
                                  "-E", "FDMIG_RUNTIME_DIR", "-E", "NOTIFY_SOCKET",
                                  *as_run_here(directive(unit, "ExecStart"), short_dir)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        peer = connect_when_bound(path, alive=lambda: activator.poll() is None)
        peer.sendall(b"activated")  # the first connection starts fdmig
        assert recv_exactly(peer, 9) == b"activated"
        notify.wait_for("READY", "1")
        mark = len(notify.messages)
        reload = subprocess.run(as_run_here(directive(unit, "ExecReload"), short_dir), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        assert reload.returncode == 0
        new_pid = int(notify.wait_for("MAINPID", after=mark)["MAINPID"])
        peer.sendall(b"same peer")
        assert recv_exactly(peer, 9) == b"same peer"
        peer.close()
        late = connect_unix(path)  # the listener moved too
        late.sendall(b"new peer")
        assert recv_exactly(late, 8) == b"new peer"
        os.kill(new_pid, 15)
    finally:
        activator.terminate()
        activator.wait(10)
        notify.close()
