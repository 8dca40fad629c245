"""A `run` instance's service: the program fdmig starts, hears and restarts, with
the `service` chardevs' fds and the fd store handed to it by systemd's own
protocols (socket activation, sd_notify), so that any program written for
systemd keeps its connections across its restarts, with no systemd as PID 1.

States and what may follow each are in TRANSITIONS; every change goes through
Service._to. The notify socket is a unix datagram socket with SO_PASSCRED: the
kernel attaches every sender's credentials, and only the service's main process
and its descendants are heard."""

import asyncio
import dataclasses
import enum
import fcntl
import logging
import os
import shlex
import shutil
import signal
import socket
import time

from fdmig import fdpass, marks, notify, paths, process
from fdmig.errors import FdmigError
from fdmig.generation import Generation
from fdmig.presentation import utc_iso
from fdmig.servicelog import LAST_LINE_WAIT, StderrCopy

log = logging.getLogger("fdmig")
BACKOFF_FIRST = 0.1  # --restart: the first delay, doubling while the service keeps failing
BACKOFF_MAX = 10.0
OVERLAP_GRACE = 2.0  # past restart's --timeout, for an overlapping restart to say how it ended
# sh execs CMD in its own process, so $$ is CMD's pid: LISTEN_PID must be the pid
# of the process that reads it, known only once that process exists.
_SHIM = 'if [ -n "${LISTEN_FDS-}" ]; then LISTEN_PID=$$; export LISTEN_PID; fi; exec "$@"'


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    EXITED = "exited"
    FAILED = "failed"


S = State
TRANSITIONS = {
    # RESTARTING from these: --overlap, the old generation serving on meanwhile.
    S.STARTING: (S.RUNNING, S.STOPPING, S.RESTARTING, S.EXITED, S.FAILED),
    S.RUNNING: (S.RUNNING, S.STOPPING, S.RESTARTING, S.EXITED, S.FAILED),
    S.STOPPING: (S.STOPPING, S.RESTARTING, S.EXITED, S.FAILED),
    # A failed overlapping restart leaves the old generation serving: RUNNING again.
    S.RESTARTING: (S.STARTING, S.RUNNING, S.FAILED),
    S.EXITED: (S.RESTARTING,),
    S.FAILED: (S.RESTARTING,),
}


@dataclasses.dataclass(frozen=True)
class Options:
    """How `fdmig run` was asked to run its service."""

    notify_ready: bool = False  # --notify: ready at READY=1, not once started
    restart: str = "no"  # --restart
    stop_signal: int = signal.SIGTERM  # --stop-signal
    stop_timeout: float = 90.0  # --timeout: SIGKILL after it
    fdstore_max: int = 1024  # --fdstore-max
    overlap: bool = False  # --overlap: a restart starts the new generation beside the old
    # --ready-delay, with --overlap: how long a new start must live (after its
    # READY=1, with --notify) before it is ready; 1 s by default, 0 with --notify.
    ready_delay: float = 1.0


class Service:
    """`chardev_fds()` gives the `service` chardevs' (name, fd) in command-line order;
    `on_change()` is called at every state change (the instance reports it)."""

    def __init__(self, argv: list[str], notify_path: str, store, chardev_fds, options: "Options", on_change,
                 sock: socket.socket | None = None):
        """`sock`: the notify socket, bound already (a migration brought it, with
        whatever messages it holds); else one is bound at `notify_path`."""
        self.argv, self.options = argv, options
        self.notify_path, self.store, self.chardev_fds = notify_path, store, chardev_fds
        self.on_change = on_change
        self.state = State.STARTING
        self.main_pid: int | None = None  # MAINPID= may name another process than the one started
        self.ready = False
        self.status_text: str | None = None
        self.restarts = 0
        self.exit_status: str | None = None
        self._spawned_pid: int | None = None  # our child, reaped with waitpid
        self._pgid: int | None = None  # its process group, SIGKILLed whole
        self._pidfd: int | None = None
        self._stop_sent = self._exit_seen = self._spawned_at = None  # a restart's timings, for the log
        self._exited = asyncio.Event()
        self._became_ready = asyncio.Event()
        self._stopping_on_purpose = False
        self._closing = False  # the instance stops: no start from now on
        self._stopping: asyncio.Task | None = None  # a stop under way (a restart's or the last)
        self._restarting: asyncio.Task | None = None  # a restart under way, whoever waits for it
        self._stopping_pid: int | None = None
        self.kill_at: float | None = None  # while stopping: when SIGKILL comes (time.time())
        self._stderr: StderrCopy | None = None  # the current start's
        self._copies: list[StderrCopy] = []
        self._backoff = BACKOFF_FIRST
        self._retry: asyncio.TimerHandle | None = None
        self._ready_timer: asyncio.TimerHandle | None = None  # --overlap without --notify: --ready-delay
        # --overlap: the old generation while a new one starts beside it, and those
        # that drain (or a new one that failed, being stopped), oldest first.
        self._old: Generation | None = None
        self.draining: list[Generation] = []
        self._generation_gone = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.sock = sock if sock is not None else _bind_notify(notify_path)
        self._notify_inode = os.stat(notify_path).st_ino
        self._hearing = False
        self.hear(True)

    def hear(self, on: bool) -> None:
        """Read the notify socket and watch the process's exit, or not: not inside
        a migration's downtime, so that the store cannot change under a section
        already built, and a source past its commit never starts a service again."""
        if on != self._hearing:
            if on:
                self._loop.add_reader(self.sock.fileno(), self._on_notify)
                if self._pidfd is not None:
                    self._loop.add_reader(self._pidfd, self._on_exit)
            else:
                self._loop.remove_reader(self.sock.fileno())
                if self._pidfd is not None:
                    self._loop.remove_reader(self._pidfd)
            for generation in self._generations():
                generation.watch(on)
            self._hearing = on

    # ----- states ------------------------------------------------------------

    def _to(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"service: {self.state.value} -> {state.value}")  # a bug in fdmig
        self.state = state
        self.on_change()

    @property
    def alive(self) -> bool:
        return self._pidfd is not None

    @property
    def restart_under_way(self) -> bool:
        return self._restarting is not None and not self._restarting.done()

    # ----- starting ----------------------------------------------------------

    def start(self, beside: bool = False) -> None:
        """Start CMD with the chardevs' fds and the whole store. FdmigError if it
        cannot be executed. `beside`: an older generation serves on with the same
        open files, whose flags are then left as they are."""
        began = time.monotonic()
        if shutil.which(self.argv[0]) is None:
            raise FdmigError(f"cannot execute {self.argv[0]}: command not found")
        named = list(self.chardev_fds()) + self.store.named_fds()
        if not beside:
            for _, fd in named:
                # Blocking, as socket activation hands them: O_NONBLOCK belongs to the open
                # file, so a service that set it would otherwise leave it to the next one.
                # Not under a generation still serving: the open file is its too, and
                # taking its O_NONBLOCK away would hang it in accept().
                os.set_blocking(fd, True)
        first = 3
        # Lifted above the range they go to, so no dup2 in the child clobbers one
        # still to move; close-on-exec, so the lifted copies vanish at the exec.
        lifted = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first + len(named)) for _, fd in named]
        stderr = self._copy_stderr()
        actions = [(os.POSIX_SPAWN_DUP2, stderr.write_end, 2)] if stderr is not None else []
        actions += [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, first + i) for i, fd in enumerate(lifted)]
        env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
        env["NOTIFY_SOCKET"] = self.notify_path
        if named:
            env["LISTEN_FDS"] = str(len(named))
            env["LISTEN_FDNAMES"] = ":".join(name for name, _ in named)
        try:
            pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", _SHIM, "fdmig-service", *self.argv], env,
                                 file_actions=actions, setsid=True)
        except OSError as exc:
            raise FdmigError(f"cannot start {self.argv[0]}: {exc.strerror}") from None
        finally:
            for fd in lifted:
                os.close(fd)
            if stderr is not None:
                stderr.started()  # the copier ends when the service (or nothing) holds the pipe
        self._stderr = stderr
        self._spawned_at = time.monotonic()
        self.main_pid = self._spawned_pid = pid
        self._pgid = pid  # it leads a session, and a process group, of its own (setsid)
        self.ready = False
        self.status_text = None
        self.exit_status = None
        self._exited.clear()
        self._became_ready.clear()
        self._supervise(pid)
        log.info("service: started %s (pid %d) with %d fd(s)", shlex.join(self.argv), pid, len(named))
        marks.span("service start", began)
        if self.state is not State.STARTING:
            self._to(State.STARTING)
        if not self.options.notify_ready:
            if self.options.overlap:  # alive --ready-delay after its start: ready
                self._ready_timer = self._loop.call_later(self.options.ready_delay, self._ready_if_alive, pid)
            else:
                self._now_ready()

    def _ready_if_alive(self, pid: int) -> None:
        self._ready_timer = None
        if self.alive and self._spawned_at is not None and self.state is State.STARTING and pid == self.main_pid:
            self._now_ready()

    def _copy_stderr(self) -> "StderrCopy | None":
        """The copier of the next start's stderr; None (the service writes to our
        stderr itself, its last line unknown) if it cannot be started."""
        self._copies = [copy for copy in self._copies if not copy.done.is_set()]
        try:
            copy = StderrCopy(self._loop)
        except OSError as exc:
            log.warning("service: its stderr goes to ours uncopied (its last line will not be known): %s",
                        exc.strerror)
            return None
        self._copies.append(copy)
        return copy

    def _supervise(self, pid: int) -> None:
        self._unsupervise()
        fd = process.pidfd(pid)
        if fd is None:
            self._loop.call_soon(self._on_exit)
            return
        self._pidfd = fd
        if self._hearing:
            self._loop.add_reader(fd, self._on_exit)

    def _unsupervise(self) -> None:
        if self._pidfd is not None:
            if self._hearing:
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _now_ready(self) -> None:
        self.ready = True
        self._backoff = BACKOFF_FIRST
        if self.state is State.STARTING:
            self._to(State.RUNNING)
        self._became_ready.set()

    async def wait_ready(self, timeout: float | None) -> str:
        """"ready", "exited" (it exited first: why is in exit_status) or "timeout"."""
        ready = asyncio.ensure_future(self._became_ready.wait())
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait({ready, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if self._became_ready.is_set() and self.alive:
            return "ready"
        return "exited" if self._exited.is_set() else "timeout"

    # ----- generations (--overlap) -------------------------------------------

    def _generations(self) -> list[Generation]:
        return ([self._old] if self._old is not None else []) + self.draining

    def _detach(self) -> Generation:
        """The current process as a generation of its own (it serves on, or is to
        be stopped); no process is current after it."""
        self._cancel_ready_timer()
        pidfd = self._pidfd
        if pidfd is not None and self._hearing:
            self._loop.remove_reader(pidfd)
        self._pidfd = None
        generation = Generation(self._loop, self.main_pid, self._spawned_pid == self.main_pid,
                                self._generation_exited, pidfd=pidfd, stderr=self._stderr, pgid=self._pgid)
        generation.watch(self._hearing)
        self.main_pid = self._spawned_pid = None
        self._stderr = None
        self.ready = False
        return generation

    async def _stopped_words(self, generation: Generation) -> str:
        """How a generation sent its stop signal ended, if it does within a moment
        (a restart's answer should not wait for its drain): its exit status and
        last line of stderr."""
        deadline = self._loop.time() + LAST_LINE_WAIT
        while generation.alive:
            self._generation_gone.clear()
            try:
                await asyncio.wait_for(self._generation_gone.wait(), max(0.0, deadline - self._loop.time()))
            except asyncio.TimeoutError:
                return ": it is being stopped"
        line = await generation.stderr.last_line(LAST_LINE_WAIT) if generation.stderr is not None else None
        ended = _ended(generation.exit_status) if not generation.alive else "is being stopped"
        return f": stopped, it {ended}" + (f": {line}" if line else "")

    def _reattach(self, generation: Generation) -> None:
        """The old generation current again: a new one failed beside it."""
        self._unsupervise()
        self.status_text = generation.status_text
        self.main_pid = generation.pid
        self._spawned_pid = generation.pid if generation.spawned else None
        self._pgid = generation.pgid
        self._stderr = generation.stderr
        self._pidfd = generation.take_pidfd()
        if self._pidfd is not None and self._hearing:
            self._loop.add_reader(self._pidfd, self._on_exit)
        self.exit_status = None
        self._exited.clear()
        self._now_ready()
        if self.state is not State.RUNNING:
            self._to(State.RUNNING)

    def _generation_exited(self, generation: Generation) -> None:
        self._drain()  # what it sent before it exited is still queued: take it
        if generation is self._old:
            log.warning("service: the old generation (pid %d) %s while a new one started", generation.pid,
                        _ended(generation.exit_status))
        elif generation in self.draining:
            self.draining.remove(generation)
            took = time.time() - generation.since if generation.since else 0.0
            log.info("service: generation pid %d %s after %.1f s (%s)", generation.pid,
                     "was killed" if generation.killed else "drained", took, generation.exit_status)
        self._generation_gone.set()
        self.on_change()

    def _drain_generation(self, generation: Generation) -> None:
        """Send a generation the stop signal; SIGKILL after the stop timeout."""
        with marks.spanning("generation drain signalled"):
            generation.drain(self.options.stop_signal, self.options.stop_timeout)
        self.draining.append(generation)
        log.info("service: generation pid %d drains: %s sent (SIGKILL in %g s)", generation.pid,
                 _signal_name(self.options.stop_signal), self.options.stop_timeout)

    async def _restart_overlapped(self, timeout: float | None) -> dict:
        """`fdmig restart` with --overlap: the new generation starts beside the old
        one; once it is ready the old one drains, else the new one is stopped and
        the old one serves on, never signalled. The outcome as restart() gives it."""
        self._cancel_retry()
        if not self.alive:  # nothing serves: nothing to overlap
            return await self._started_outcome(await self._restart_now_stopped(), timeout)
        self.restarts += 1
        self._to(State.RESTARTING)
        old = self._old = self._detach()
        old.status_text = self.status_text
        try:
            self.start(beside=True)
        except FdmigError as exc:
            self._old = None
            self._reattach(old)
            return {"status": "failed", "pid": None, "old-serves": True,
                    "error": f"{exc}; the old generation (pid {old.pid}) serves on"}
        pid, stderr = self.main_pid, self._stderr
        outcome = await self.wait_ready(timeout)
        self._old = None
        if outcome == "ready":
            if old.alive:
                self._drain_generation(old)
            self.on_change()
            return {"status": "ready", "pid": pid, "error": None}
        result = await self._outcome(pid, stderr, timeout, outcome)
        result["goes-on"] = False  # it has ended: the new generation stopped, the old one serving
        if outcome == "timeout":
            result["error"] = f"the new generation (pid {pid}) was not ready within {timeout:g} s"
            if self.alive:
                new = self._detach()
                self._drain_generation(new)  # it is stopped, as a drain is
                result["error"] += await self._stopped_words(new)
        if old.alive:
            self._reattach(old)
            result["error"] += f"; the old generation (pid {old.pid}) serves on"
            result["old-serves"] = True
        else:
            old.close()
            result["error"] += "; the old generation had exited meanwhile: no generation serves"
            if self.state is not State.FAILED:
                self._to(State.FAILED)
        self.on_change()
        return result

    async def _outcome(self, pid: int, stderr, timeout: float | None, outcome: str | None = None) -> dict:
        """A started service's readiness (awaited, unless `outcome` is known) as
        restart() reports it."""
        if outcome is None:
            outcome = await self.wait_ready(timeout)
        if outcome == "ready":
            return {"status": "ready", "pid": pid, "error": None}
        if outcome == "timeout":
            waiting = " (no READY=1 from it yet)" if self.options.notify_ready else ""
            return {"status": "timeout", "waiting-for": "ready", "pid": pid,
                    "error": f"the new service (pid {pid}) is not ready yet{waiting}"}
        line = await stderr.last_line(LAST_LINE_WAIT) if stderr is not None else None
        return {"status": "failed", "pid": pid, "exit-status": self.exit_status, "last-line": line,
                "error": f"the new service (pid {pid}) {_ended(self.exit_status)} before it was ready"
                         + (f": {line}" if line else "")}

    def _cancel_ready_timer(self) -> None:
        if self._ready_timer is not None:
            self._ready_timer.cancel()
            self._ready_timer = None

    # ----- exiting -----------------------------------------------------------

    def _on_exit(self) -> None:
        self._exit_seen = time.monotonic()
        self._cancel_ready_timer()
        self._unsupervise()
        self.exit_status = self._reap()
        self._drain()  # what it sent before it exited is still queued: take it
        if self._old is not None:
            # A new generation that ended beside the old one: the restart says so,
            # and the old one serves on. No state of the service's changes.
            log.warning("service: the new generation (pid %s) %s before it was ready", self.main_pid,
                        _ended(self.exit_status))
            self.main_pid = None
            self.ready = False
            self._exited.set()
            return
        on_purpose = self._stopping_on_purpose
        # A main process that was not our child (MAINPID=, or one a migration brought)
        # ended in a way only its parent may read: that counts as a failure, so that
        # --restart on-failure starts it again.
        failed = self.exit_status != "exit status 0" and not on_purpose
        never_ready = not self.ready and self.state is State.STARTING and not on_purpose
        log.log(logging.INFO if on_purpose or not failed else logging.WARNING,
                "service: pid %s ended (%s)%s", self.main_pid, self.exit_status,
                " before it was ready" if never_ready else "")
        self.main_pid = None
        self.ready = False
        if self.state is not State.STOPPING or not on_purpose:
            self._to(State.FAILED if failed else State.EXITED)
        self._exited.set()
        policy = self.options.restart
        again = policy == "always" or (policy == "on-failure" and failed)
        if again and not on_purpose:
            delay, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX)
            log.info("service: starting again in %g s (--restart %s)", delay, policy)
            self._retry = self._loop.call_later(delay, self._restart_now)
        elif failed and not self._closing:
            # Nothing starts it again: say what will (the listeners and the store are held).
            log.warning("service: not started again (--restart %s); fix it and run fdmig restart", policy)

    def _reap(self) -> str:
        """How our child ended, or that it is not known: the main process was not
        our child (MAINPID= named another, or a migration brought it)."""
        status = "status unknown: not fdmig's child"
        pid = self._spawned_pid
        if pid is not None:
            try:
                _, code = os.waitpid(pid, os.WNOHANG)
                status = process.describe_status(code)
            except ChildProcessError:
                pass
            self._spawned_pid = None
        return status

    def _restart_now(self) -> None:
        self._retry = None
        if self.state in (State.EXITED, State.FAILED) and not self._closing:
            self.restarts += 1
            self._to(State.RESTARTING)
            try:
                self.start()
            except FdmigError as exc:
                log.error("service: %s", exc)
                self._to(State.FAILED)

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    async def stop(self, interactive: bool = False) -> None:
        """The instance stops: the service gets the stop signal, SIGKILL after the
        stop timeout (or at kill_now()), and is never started again; returns once
        it has exited. A stop under way (a restart's) is joined. `interactive`:
        the instance stops on SIGINT, a terminal's Ctrl-C: the log says that a
        second one kills the service now."""
        self._closing = True
        self._cancel_retry()
        if self._stopping is not None and not self._stopping.done() and interactive:
            log.info("service: stopping pid %s (SIGKILL in %g s; Ctrl-C again to kill now)", self._stopping_pid,
                     max(0.0, round((self.kill_at or time.time()) - time.time())))
        task = self._restarting
        if self.options.overlap and task is not None and not task.done():
            task.cancel()  # an overlapping restart ends here: neither generation serves on
            await asyncio.gather(task, return_exceptions=True)
        old, self._old = self._old, None
        if old is not None and old.alive:
            self._drain_generation(old)
        await self._stop(interactive)
        # Those that drain have their stop signal and their SIGKILL due already.
        while any(generation.alive for generation in self.draining):
            self._generation_gone.clear()
            await self._generation_gone.wait()

    async def _stop(self, interactive: bool = False) -> None:
        if self._stopping is None or self._stopping.done():
            if not self.alive:
                return
            self._stopping = asyncio.ensure_future(self._stop_now(interactive))
        # Shielded: a waiter that goes (a restart's client hung up) leaves it running.
        await asyncio.shield(self._stopping)

    async def _stop_now(self, interactive: bool) -> None:
        """Stop signal, then SIGKILL after the stop timeout; until it has exited."""
        self._stopping_on_purpose = True
        pid = self._stopping_pid = self.main_pid
        timeout = self.options.stop_timeout
        try:
            if self.state is not State.STOPPING:
                self._to(State.STOPPING)
            self._stop_sent = time.monotonic()
            self.kill_at = time.time() + timeout
            self._signal(self.options.stop_signal)
            log.info("service: %s sent; stopping pid %s (SIGKILL in %g s%s)", _signal_name(self.options.stop_signal),
                     pid, timeout, "; Ctrl-C again to kill now" if interactive else "")
            try:
                await asyncio.wait_for(self._exited.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("service: pid %s did not stop within %g s; SIGKILL", pid, timeout)
                self._signal(signal.SIGKILL)
                await self._exited.wait()
        finally:
            self._stopping_on_purpose = False
            self.kill_at = None

    def kill_now(self) -> bool:
        """SIGKILL to a service that is being stopped and has not exited yet (a
        second Ctrl-C); whether there was one."""
        draining = [generation for generation in self.draining if generation.alive]
        for generation in draining:
            log.warning("service: SIGKILL to the draining generation pid %d now (Ctrl-C again)", generation.pid)
            generation.kill_at = time.time()
            generation.kill_now()
        if self._stopping is None or self._stopping.done() or not self.alive:
            return bool(draining)
        log.warning("service: SIGKILL to pid %s now (Ctrl-C again)", self.main_pid)
        self.kill_at = time.time()
        self._signal(signal.SIGKILL)
        return True

    def _signal(self, signum: int) -> None:
        process.send(self._pidfd, self._pgid, signum)

    async def restart(self, timeout: float | None) -> dict:
        """`fdmig restart`: stop, start again with the chardevs and the whole store,
        and wait until ready, `timeout` seconds at most, whatever is awaited: the
        stop (SIGKILL after the stop timeout) or the readiness. The stop and the
        start are a task of the service's own, which goes on without a waiter (a
        client that timed out or hung up): a restart under way is joined, never
        begun twice. The store and the listeners are held throughout."""
        if self._closing:
            raise FdmigError("the instance is stopping: its service is not started again")
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())
        task = self._restarting
        if task is None or task.done():
            # With --overlap the task bounds its wait for the new generation itself:
            # one not ready by then is stopped, whether a client still waits or not.
            work = self._restart_overlapped(timeout) if self.options.overlap else self._restart_now_stopped()
            task = self._restarting = asyncio.ensure_future(work)
        # --overlap: the task decides at the deadline itself; its answer follows at once.
        await asyncio.wait({task}, timeout=remaining() + OVERLAP_GRACE * self.options.overlap
                           if deadline is not None else None)
        if not task.done():
            if self.options.overlap:
                return {"status": "timeout", "waiting-for": "ready", "pid": self.main_pid,
                        "error": f"the new generation (pid {self.main_pid}) is not ready yet; it is stopped at "
                                 "the first restart's --timeout, and the old one serves on meanwhile"}
            return {"status": "timeout", "waiting-for": "stop", "pid": self._stopping_pid,
                    "error": self._still_stopping()}
        if task.cancelled():
            return {"status": "failed", "pid": None,
                    "error": "the instance is stopping: the restart was abandoned" if self._closing else
                    "the restart was given up: the instance handed its service over"}
        if self.options.overlap:
            return task.result()
        return await self._started_outcome(task.result(), remaining())

    async def _started_outcome(self, started: dict, timeout: float | None) -> dict:
        """What _restart_now_stopped() gave, as restart() reports it once the new
        service is ready (or not, within `timeout`)."""
        if "error" in started:
            return {"status": "failed", "pid": None, "error": started["error"]}
        return await self._outcome(started["pid"], started["stderr"], timeout)

    async def _restart_now_stopped(self) -> dict:
        """A restart's own task: the service stopped, started again. {"pid", "stderr"}
        of the new one, or {"error"}."""
        self._cancel_retry()
        self._stop_sent = self._exit_seen = None
        await self._stop()
        if self._closing:
            return {"error": "the instance stopped meanwhile: the service is not started again"}
        self.restarts += 1
        self._to(State.RESTARTING)
        try:
            self.start()
        except FdmigError as exc:
            self._to(State.FAILED)
            return {"error": str(exc)}
        self._log_handover()
        return {"pid": self.main_pid, "stderr": self._stderr}

    def _still_stopping(self) -> str:
        """What a restart still waits for while the old service has not exited."""
        pid = self._stopping_pid
        if self.kill_at is None:
            return f"the old service (pid {pid}) has not stopped yet"
        when = time.strftime("%H:%M:%S", time.localtime(self.kill_at))
        left = self.kill_at - time.time()
        if left <= 0:
            return f"the old service (pid {pid}) has not exited yet; SIGKILL sent at {when}"
        return (f"the old service (pid {pid}) has not stopped yet; SIGKILL at {when} "
                f"(in {left:.0f} s, run --timeout {self.options.stop_timeout:g} s)")

    def adopt_draining(self, draining) -> None:
        """A migration's target: the generations that drain at the source, each
        supervised from here on, its SIGKILL due when it was there; none is
        signalled again."""
        for pid, since, kill_at, killed in draining:
            generation = Generation(self._loop, pid, False, self._generation_exited, pgid=process.group_of(pid))
            generation.drain(self.options.stop_signal, kill_at - since, since=since, killed=killed)
            generation.watch(self._hearing)
            self.draining.append(generation)
            log.info("service: generation pid %d drains, as it did at the source (SIGKILL at %s)", pid,
                     time.strftime("%H:%M:%S", time.localtime(kill_at)))

    def supervise_running(self, pid: int | None) -> None:
        """A migration's target: the service runs already (not our child, so how
        it ends is not ours to read); supervise it from here on."""
        self.main_pid = pid
        self._spawned_pid = None
        self._stderr = None  # its copier is the source's child: its last line is not known here
        if pid is None:
            return
        self._pgid = process.group_of(pid)
        self._exited.clear()
        self._supervise(pid)

    def _log_handover(self) -> None:
        """How long the old service took to stop, and fdmig from its exit to the
        new one's start: the part of a restart's pause that is fdmig's."""
        if self._stop_sent is None or self._exit_seen is None:
            return
        log.info("service: restart: pid %s exited %.1f ms after the stop signal; the new one started %.1f ms "
                 "after that exit (pid %s)", self._stopping_pid, (self._exit_seen - self._stop_sent) * 1000,
                 (self._spawned_at - self._exit_seen) * 1000, self.main_pid)

    def close(self, unlink: bool = True) -> None:
        """Stop hearing and supervising. `unlink=False` after a migration's commit:
        the notify socket's path, and the socket itself, are the target's now."""
        self._cancel_retry()
        for task in (self._restarting, self._stopping):
            if task is not None and not task.done():
                task.cancel()  # handed over: the target supervises the service now
        for copy in self._copies:
            copy.close()
        self._copies = []
        self._cancel_ready_timer()
        for generation in self._generations():
            generation.close()  # unsignalled: after a commit, the target's to supervise
        self._unsupervise()
        self.hear(False)
        self.sock.close()
        if unlink:
            paths.remove_own_socket(self.notify_path, self._notify_inode)

    # ----- the notify socket -------------------------------------------------

    def _on_notify(self) -> None:
        for _ in range(64):  # then the rest of the loop has its turn
            if not self._receive_one():
                return

    def _drain(self) -> None:
        while self._receive_one():
            pass

    def _receive_one(self) -> bool:
        try:
            data, fds, creds, complete = fdpass.recv_datagram(self.sock, notify.MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.warning("service: notify socket: %s", exc)
            return False
        pid = creds[0] if creds else None
        reason, older = self._refusal(pid, complete)
        if reason is not None:
            self._refuse(pid, reason, fds)
        elif older is not None:
            self._apply_older(pid, older, notify.parse(data), fds)
        else:
            self._apply(pid, notify.parse(data), fds)
        return True

    def _refusal(self, pid: int | None, complete: bool) -> tuple[str | None, Generation | None]:
        """Why a message is refused (None: taken), and the older generation it
        comes from, if not from the newest."""
        if pid is None:
            return "it carried no credentials", None
        if not complete:
            return f"it was truncated (over {notify.MAX_MESSAGE} bytes, or too many fds)", None
        main = self.main_pid
        # The main process itself even if it has exited since (its last words, an
        # FDSTORE= just before it exits, are drained at its exit); anyone else must
        # be its live descendant. Generations are told apart by that ancestry.
        if main is not None and process.descends_from(pid, main):
            return None, None
        for generation in self._generations():
            if process.descends_from(pid, generation.pid):
                return None, generation
        return f"pid {pid} is not the service (pid {main or 'none'}) or one of its descendants", None

    def _apply_older(self, pid: int, generation: Generation, message: notify.Message, fds: list[int]) -> None:
        """A message from an older generation (--overlap): its store is kept for the
        next start; READY=1, STATUS=, MAINPID= and the like are the newest's to say."""
        said = [key for key, given in (("READY=1", message.ready), ("STATUS=", message.status is not None),
                                       ("MAINPID=", message.mainpid is not None), ("RELOADING=1", message.reloading),
                                       ("STOPPING=1", message.stopping)) if given]
        if said:
            log.info("service: pid %d of the %s generation (pid %d) sent %s: ignored, only the newest's count",
                     pid, generation.phase.value, generation.pid, ", ".join(said))
        stored = len(fds) if message.fdstore else 0
        self._apply(pid, dataclasses.replace(message, ready=False, status=None, mainpid=None, reloading=False,
                                             stopping=False), fds)
        if stored:
            log.info("service: pid %d of the %s generation (pid %d) stored %d fd(s) as %s: kept for the next start",
                     pid, generation.phase.value, generation.pid, stored, message.fdname or notify.DEFAULT_FDNAME)

    def _refuse(self, pid, reason: str, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        self.store.refused += 1
        log.warning("service: refused a notify message from pid %s: %s%s", pid, reason,
                    f"; its {len(fds)} fd(s) closed" if fds else "")

    def _apply(self, pid: int, message: notify.Message, fds: list[int]) -> None:
        for what in message.ignored:
            log.info("service: pid %d sent %s; ignored", pid, what)
        if message.barrier:
            for fd in fds:
                os.close(fd)  # closing it is the answer the sender waits for
            fds = []
        if message.fdstore and fds:
            reason = self.store.store(fds, message.fdname, message.fdpoll)
            if reason is not None:
                self._refuse(pid, reason, [])
            fds = []
        elif fds:
            for fd in fds:
                os.close(fd)
            log.warning("service: pid %d sent %d fd(s) without FDSTORE=1; closed", pid, len(fds))
        if message.fdstore_remove:
            name = message.fdname or notify.DEFAULT_FDNAME
            removed = self.store.remove(name)
            if removed:
                log.info("service: removed %d stored fd(s) named %s", removed, name)
        if message.status is not None:
            self.status_text = message.status
        if message.mainpid is not None:
            self._main_pid_is(message.mainpid)
        if message.reloading:
            self.ready = False
        if message.stopping and self.state in (State.STARTING, State.RUNNING):
            self._to(State.STOPPING)
        if message.ready and self.alive:
            if self.options.overlap and self.options.ready_delay and self.state is State.STARTING:
                # A server may say READY=1 before it serves (gunicorn: before its
                # workers exist): it must live --ready-delay on before it counts.
                if self._ready_timer is None:
                    self._ready_timer = self._loop.call_later(self.options.ready_delay, self._ready_if_alive,
                                                              self.main_pid)
            else:
                self._now_ready()
        self.on_change()

    def _main_pid_is(self, pid: int) -> None:
        if self.main_pid is not None and pid != self.main_pid and process.descends_from(pid, self.main_pid):
            log.info("service: main pid is now %d (MAINPID=)", pid)
            self.main_pid = pid
            self._supervise(pid)
        elif pid != self.main_pid:
            log.warning("service: MAINPID=%d ignored: not a descendant of pid %s", pid, self.main_pid)

    # ----- reporting ---------------------------------------------------------

    def status(self) -> dict:
        kill_at = utc_iso(self.kill_at) if self.kill_at is not None else None
        return {"pid": self.main_pid, "state": self.state.value, "ready": self.ready,
                "status-text": self.status_text, "restarts": self.restarts, "command": list(self.argv),
                "fdstore-max": self.store.limit, "fdstore-refused": self.store.refused,
                "stop-timeout-s": self.options.stop_timeout, "kill-at": kill_at, "overlap": self.options.overlap,
                "draining": [generation.row() for generation in self.draining if generation.alive],
                # While a new generation starts beside it (--overlap): the one that serves.
                "serving-beside": {"pid": self._old.pid} if self._old is not None and self._old.alive else None}


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _ended(exit_status: str | None) -> str:
    """`exit status 1` as `exited with status 1`, `killed by X` as `was killed by X`."""
    if exit_status is None:
        return "ended"
    if exit_status.startswith("exit status "):
        return "exited with status " + exit_status[len("exit status "):]
    if exit_status.startswith("killed by "):
        return "was " + exit_status
    return f"ended ({exit_status})"


def _bind_notify(path: str) -> socket.socket:
    paths.remove_stale_socket(path, "notify socket")
    sock = paths.bind_private(path, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    # Room for a burst of messages (a service storing thousands of connections).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    return sock


def parse_signal(text: str) -> int:
    """TERM, SIGTERM or 15."""
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if hasattr(signal.Signals, name):
            return signal.Signals[name].value
    raise ValueError(f"'{text}' is not a signal; accepted: a name (TERM, SIGINT, HUP...) or a number")

