"""One generation of a `run` instance's service, beside the one that serves:
the old one while a new one starts (`run --overlap`), then while it drains, or
a new one that failed and is being stopped. Each is a process watched through a
pidfd (no polling, no mistaking a recycled pid), sent the stop signal once and
SIGKILL once its drain has lasted `run --timeout`.

Its phases and what may follow each are in TRANSITIONS; every change goes
through Generation._to."""

import enum
import logging
import os
import signal
import time

from fdmig import process
from fdmig.presentation import utc_iso

log = logging.getLogger("fdmig")


class Phase(enum.Enum):
    SERVING = "serving"  # the old generation while a new one starts beside it
    DRAINING = "draining"  # sent the stop signal: it finishes what it has, and exits
    KILLED = "killed"  # its drain lasted too long: sent SIGKILL
    EXITED = "exited"


P = Phase
TRANSITIONS = {
    P.SERVING: (P.DRAINING, P.EXITED),
    P.DRAINING: (P.KILLED, P.EXITED),
    P.KILLED: (P.EXITED,),
    P.EXITED: (),
}


class Generation:
    """`on_exit(generation)` is called once, when the process has exited (its
    status in `exit_status`). `spawned`: it is our child, whose status we reap;
    one a migration brought is not, and how it ended is not ours to read."""

    def __init__(self, loop, pid: int, spawned: bool, on_exit, pidfd: int | None = None, stderr=None,
                 pgid: int | None = None):
        self.pid = pid
        self.pgid = pgid  # its process group, SIGKILLed whole
        self.spawned = spawned
        self.phase = Phase.SERVING
        self.since: float | None = None  # when it began to drain (time.time())
        self.kill_at: float | None = None  # when SIGKILL comes (time.time())
        self.exit_status: str | None = None
        self.killed = False  # it was sent SIGKILL (its drain lasted too long)
        self.stderr = stderr  # service.StderrCopy of its start, if ours
        self.status_text: str | None = None  # its last STATUS=, to show again should it serve again
        self._loop = loop
        self._on_exit = on_exit
        self._kill: object = None  # the TimerHandle of the SIGKILL
        self._watching = False
        self._pidfd = pidfd if pidfd is not None else process.pidfd(pid)
        if self._pidfd is None:
            loop.call_soon(self._exited)  # gone already

    def _to(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"generation pid {self.pid}: {self.phase.value} -> {phase.value}")  # a bug
        self.phase = phase
        self.killed = self.killed or phase is Phase.KILLED

    @property
    def alive(self) -> bool:
        return self.phase is not Phase.EXITED

    def watch(self, on: bool) -> None:
        """See its exit, or not (inside a migration's downtime)."""
        if self._pidfd is None or on == self._watching:
            return
        if on:
            self._loop.add_reader(self._pidfd, self._exited)
        else:
            self._loop.remove_reader(self._pidfd)
        self._watching = on

    def drain(self, signum: int, timeout: float, since: float | None = None, killed: bool = False) -> None:
        """Send it `signum` and SIGKILL `timeout` seconds after the drain began.
        `since`: a drain begun elsewhere (a migration's source), signalled there,
        `killed` too if so: nothing is sent twice."""
        if self.phase is not Phase.SERVING:
            return
        self._to(Phase.DRAINING)
        self.since = since if since is not None else time.time()
        if since is None:
            self.signal(signum)
        self.kill_at = self.since + timeout
        if killed:
            self._to(Phase.KILLED)
        else:
            self._kill = self._loop.call_later(max(0.0, self.kill_at - time.time()), self.kill)

    def kill(self) -> None:
        self._kill = None
        if self.phase is Phase.DRAINING and not self._watching and self._pidfd is not None:
            # Inside a migration's downtime: its state is on its way to the target
            # as it was; the SIGKILL waits for the outcome (ours, or the target's).
            self._kill = self._loop.call_later(0.05, self.kill)
            return
        if self.phase is Phase.DRAINING:
            log.warning("service: generation pid %d did not drain within %g s; SIGKILL", self.pid,
                        self.kill_at - self.since)
            self.kill_now()

    def kill_now(self) -> None:
        """SIGKILL to it and its process group, now (its drain is over, or a
        second Ctrl-C says so)."""
        if self.phase in (Phase.SERVING, Phase.DRAINING):
            if self.phase is Phase.SERVING:
                self._to(Phase.DRAINING)
            self._to(Phase.KILLED)
        process.send(self._pidfd, self.pgid, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Its stop signal (SIGKILL, if that is the stop signal, to its whole group)."""
        process.send(self._pidfd, self.pgid, signum)

    def _exited(self) -> None:
        if self.phase is Phase.EXITED:
            return
        self.exit_status = self._reap()
        self.close()
        self._to(Phase.EXITED)
        self._on_exit(self)

    def _reap(self) -> str:
        if self.spawned:
            try:
                _, code = os.waitpid(self.pid, os.WNOHANG)
                return process.describe_status(code)
            except ChildProcessError:
                pass
        return "status unknown: not fdmig's child"

    def close(self) -> None:
        """Let go of it, unsignalled (a migration's commit: the target supervises
        it now, its SIGKILL still due at kill_at)."""
        if self._kill is not None:
            self._kill.cancel()
            self._kill = None
        self.watch(False)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def take_pidfd(self) -> int | None:
        """Its pidfd, handed over to whoever supervises it next (a generation that
        serves again becomes the current one); it is no longer watched here."""
        self.watch(False)
        if self._kill is not None:
            self._kill.cancel()
            self._kill = None
        fd, self._pidfd = self._pidfd, None
        return fd

    def row(self) -> dict:
        return {"pid": self.pid, "since": _iso(self.since), "kill-at": _iso(self.kill_at)}


def _iso(when: float | None) -> str | None:
    return None if when is None else utc_iso(when)
