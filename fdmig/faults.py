"""Fault injection at named points of a migration, for tests that must force a race
at an exact step. Off unless $FDMIG_FAULT names a point: `POINT=ACTION[,...]`, with
ACTION `kill` (SIGKILL ourselves), `stop` (SIGSTOP: a hung peer) or `exit`."""

import os
import signal


def point(name: str) -> None:
    spec = os.environ.get("FDMIG_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.partition("=")
        if where != name:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "exit":
            os._exit(1)
