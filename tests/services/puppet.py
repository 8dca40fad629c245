"""A service the test drives step by step, to force each race at its exact point.

  python3 -m tests.services.puppet CONTROL_PATH

At start, before it opens anything, it records what it was started with (its pid,
environment, open descriptors and their flags, its stdin), then connects to the
test's SOCK_SEQPACKET socket at CONTROL_PATH and sends that report as JSON with
its LISTEN_FDS descriptors attached (so the test can compare identities). Then it
runs the test's commands, one JSON message each (descriptors attached with
SCM_RIGHTS), and answers each once done:

  {"notify": STATE, "barrier": bool}  sd_pid_notify_with_fds(STATE, the attached
                                      fds), closes its copies, then (barrier)
                                      sd_notify_barrier: the instance has handled it
  {"notify": STATE, "fork": true}     the same from a forked child (a descendant)
  {"on-stop": STATE}                  kept, with the attached fds, for the stop signal
  {"run": ARGV}                       runs a program (a child of the service)
  {"nonblock": true}                  sets O_NONBLOCK on every LISTEN_FDS descriptor
  {"ignore-stop": true}               ignores the stop signals from now on
  {"exit": CODE}                      answers, then exits with CODE

On SIGTERM, SIGINT or SIGHUP it sends {"signal": NAME}, then the on-stop message
if any, and exits 0.
"""

import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys

from tests.services import libsd

MAX_FDS = 64


def snapshot() -> dict:
    """What the service was started with, taken before it opens a descriptor."""
    open_fds = []
    for fd in range(3, 512):
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        open_fds.append({"fd": fd, "cloexec": bool(flags & fcntl.FD_CLOEXEC),
                         "nonblock": bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)})
    null, stdin = os.stat("/dev/null"), os.fstat(0)
    return {"pid": os.getpid(), "ppid": os.getppid(), "env": dict(os.environ), "fds": open_fds,
            "stdin-is-dev-null": stat.S_ISCHR(stdin.st_mode) and stdin.st_rdev == null.st_rdev}


def listen_fds() -> list[int]:
    try:
        if int(os.environ["LISTEN_PID"]) != os.getpid():
            return []
        return list(range(3, 3 + int(os.environ["LISTEN_FDS"])))
    except (KeyError, ValueError):
        return []


class Stopped(BaseException):
    pass


def main() -> int:
    report = snapshot()
    passed = listen_fds()
    for fd in passed:
        os.set_inheritable(fd, False)  # not to the programs that {"run"} starts
    control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    control.connect(sys.argv[1])
    socket.send_fds(control, [json.dumps(report).encode()], passed)
    on_stop: list = []
    ignoring = []

    def stopping(signum, frame):
        if not ignoring:
            raise Stopped(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stopping)
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(control, 1 << 16, MAX_FDS)
            if not data:  # the test is done with us: wait for the stop signal
                while True:
                    signal.pause()
            command = json.loads(data)
            answer = {"ok": True}
            try:
                answer.update(perform(command, fds, on_stop, passed, ignoring))
            except Exception as exc:  # reported to the test, which fails with it
                answer = {"ok": False, "error": repr(exc)}
            finally:
                if "on-stop" not in command:
                    for fd in fds:
                        os.close(fd)
            control.send(json.dumps(answer).encode())
            if "exit" in command:
                os._exit(command["exit"])
    except Stopped as stop:
        try:
            control.send(json.dumps({"signal": str(stop)}).encode())
        except OSError:
            pass  # the test has gone already
        for state, fds in on_stop:
            libsd.notify(state, fds)
        return 0


def perform(command: dict, fds: list[int], on_stop: list, passed: list[int], ignoring: list) -> dict:
    if "notify" in command and command.get("fork"):
        pid = os.fork()
        if pid == 0:
            try:
                libsd.notify(command["notify"], fds)
                libsd.barrier()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return {"child": pid, "status": status}
    if "notify" in command:
        libsd.notify(command["notify"], fds)
        if command.get("barrier"):
            libsd.barrier()
        return {}
    if "on-stop" in command:
        on_stop.append((command["on-stop"], fds))
        return {}
    if "run" in command:
        return {"rc": subprocess.run(command["run"], stdin=subprocess.DEVNULL).returncode}
    if "nonblock" in command:
        for fd in passed:
            os.set_blocking(fd, False)
        return {}
    if "ignore-stop" in command:
        ignoring.append(True)
        return {}
    if "exit" in command:
        return {}
    raise ValueError(f"unknown command {command}")


if __name__ == "__main__":
    sys.exit(main())
