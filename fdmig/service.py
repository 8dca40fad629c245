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
import sys
import time

from fdmig import fdpass, notify, paths, process
from fdmig.errors import FdmigError

log = logging.getLogger("fdmig")
BACKOFF_FIRST = 0.1  # --restart: the first delay, doubling while the service keeps failing
BACKOFF_MAX = 10.0
# sh execs CMD in its own process, so $$ is CMD's pid: LISTEN_PID must be the pid
# of the process that reads it, known only once that process exists.
_SHIM = 'if [ -n "${LISTEN_FDS-}" ]; then LISTEN_PID=$$; export LISTEN_PID; fi; exec "$@"'
# How long a failed restart waits for the last line of the new service's stderr
# (its copier ends once every holder of the pipe's write end has exited).
LAST_LINE_WAIT = 1.0
MAX_LAST_LINE = 4096
# The copier of a service's stderr (fdmig/stderrcopy.py, run as a script: it
# imports nothing of fdmig's, and `ps` shows its file's name).
_COPIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stderrcopy.py")


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    EXITED = "exited"
    FAILED = "failed"


S = State
TRANSITIONS = {
    S.STARTING: (S.RUNNING, S.STOPPING, S.EXITED, S.FAILED),
    S.RUNNING: (S.RUNNING, S.STOPPING, S.EXITED, S.FAILED),
    S.STOPPING: (S.STOPPING, S.RESTARTING, S.EXITED, S.FAILED),
    S.RESTARTING: (S.STARTING, S.FAILED),
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

    # ----- starting ----------------------------------------------------------

    def start(self) -> None:
        """Start CMD with the chardevs' fds and the whole store. FdmigError if it
        cannot be executed."""
        if shutil.which(self.argv[0]) is None:
            raise FdmigError(f"cannot execute {self.argv[0]}: command not found")
        named = list(self.chardev_fds()) + self.store.named_fds()
        for _, fd in named:
            # Blocking, as socket activation hands them: O_NONBLOCK belongs to the open
            # file, so a service that set it would otherwise leave it to the next one.
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
        self.ready = False
        self.status_text = None
        self.exit_status = None
        self._exited.clear()
        self._became_ready.clear()
        self._supervise(pid)
        log.info("service: started %s (pid %d) with %d fd(s)", shlex.join(self.argv), pid, len(named))
        if self.state is not State.STARTING:
            self._to(State.STARTING)
        if not self.options.notify_ready:
            self._now_ready()

    def _copy_stderr(self) -> "StderrCopy | None":
        """The copier of the next start's stderr; None (the service writes to our
        stderr itself, its last line unknown) if it cannot be started."""
        self._copies = [copy for copy in self._copies if not copy.done.is_set()]
        if not sys.executable:
            return None
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

    # ----- exiting -----------------------------------------------------------

    def _on_exit(self) -> None:
        self._exit_seen = time.monotonic()
        self._unsupervise()
        self.exit_status = self._reap()
        self._drain()  # what it sent before it exited is still queued: take it
        on_purpose = self._stopping_on_purpose
        # A main process that was not our child (MAINPID=, or one a migration brought)
        # ended in a way only its parent may read: that counts as a failure, so that
        # --restart on-failure starts it again.
        failed = self.exit_status != "exit status 0" and not on_purpose
        log.log(logging.INFO if on_purpose or not failed else logging.WARNING,
                "service: pid %s ended (%s)", self.main_pid, self.exit_status)
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

    def _reap(self) -> str:
        """How our child ended, or that it is not known: the main process was not
        our child (MAINPID= named another, or a migration brought it)."""
        status = "status unknown: not fdmig's child"
        pid = self._spawned_pid
        if pid is not None:
            try:
                _, code = os.waitpid(pid, os.WNOHANG)
                status = _describe_status(code)
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
        await self._stop(interactive)

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
        if self._stopping is None or self._stopping.done() or not self.alive:
            return False
        log.warning("service: SIGKILL to pid %s now (Ctrl-C again)", self.main_pid)
        self.kill_at = time.time()
        self._signal(signal.SIGKILL)
        return True

    def _signal(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except (OSError, TypeError):
            pass  # gone meanwhile: its exit is on its way

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
            task = self._restarting = asyncio.ensure_future(self._restart_now_stopped())
        await asyncio.wait({task}, timeout=remaining())
        if not task.done():
            return {"status": "timeout", "waiting-for": "stop", "pid": self._stopping_pid,
                    "error": self._still_stopping()}
        started = {"error": "the restart was given up: the instance handed its service over"} \
            if task.cancelled() else task.result()
        if "error" in started:
            return {"status": "failed", "pid": None, "error": started["error"]}
        pid, stderr = started["pid"], started["stderr"]
        outcome = await self.wait_ready(remaining())
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

    def supervise_running(self, pid: int | None) -> None:
        """A migration's target: the service runs already (not our child, so how
        it ends is not ours to read); supervise it from here on."""
        self.main_pid = pid
        self._spawned_pid = None
        self._stderr = None  # its copier is the source's child: its last line is not known here
        if pid is None:
            return
        self._exited.clear()
        self._supervise(pid)

    def _log_handover(self) -> None:
        """How long the old service took to stop, and fdmig from its exit to the
        new one's start: the part of a restart's pause that is fdmig's."""
        if self._stop_sent is None or self._exit_seen is None:
            return
        log.info("service: restart: pid exited %.1f ms after the stop signal; the new one started %.1f ms "
                 "after that exit", (self._exit_seen - self._stop_sent) * 1000,
                 (self._spawned_at - self._exit_seen) * 1000)

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
        reason = self._refusal(pid, complete)
        if reason is not None:
            self._refuse(pid, reason, fds)
        else:
            self._apply(pid, notify.parse(data), fds)
        return True

    def _refusal(self, pid: int | None, complete: bool) -> str | None:
        if pid is None:
            return "it carried no credentials"
        if not complete:
            return f"it was truncated (over {notify.MAX_MESSAGE} bytes, or too many fds)"
        main = self.main_pid
        # The main process itself even if it has exited since (its last words, an
        # FDSTORE= just before it exits, are drained at its exit); anyone else must
        # be its live descendant.
        if main is not None and process.descends_from(pid, main):
            return None
        return f"pid {pid} is not the service (pid {main or 'none'}) or one of its descendants"

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
        kill_at = None
        if self.kill_at is not None:
            kill_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.kill_at))
        return {"pid": self.main_pid, "state": self.state.value, "ready": self.ready,
                "status-text": self.status_text, "restarts": self.restarts, "command": list(self.argv),
                "fdstore-max": self.store.limit, "fdstore-refused": self.store.refused,
                "stop-timeout-s": self.options.stop_timeout, "kill-at": kill_at}


class StderrCopy:
    """One start's stderr: a pipe whose write end becomes the service's fd 2 and
    whose read end a copier process (fdmig/stderrcopy.py) holds, started here.
    Every byte goes on to run's stderr; the last line comes back when the copier
    ends, for the message of a restart that failed (as `migrate-out --spawn`
    gives a target's). The copier is a process of its own, not a thread of the
    holder, because the service outlives a holder that migrates away or is
    killed, and its stderr must not break (EPIPE, SIGPIPE) with it."""

    def __init__(self, loop):
        self._loop = loop
        self.line: str | None = None
        self.done = asyncio.Event()
        read_end, self.write_end = os.pipe2(os.O_CLOEXEC)
        report, report_write = os.pipe2(os.O_CLOEXEC)
        try:
            actions = [(os.POSIX_SPAWN_DUP2, read_end, 0), (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                       (os.POSIX_SPAWN_DUP2, report_write, 3)]
            # Its own session: a terminal's Ctrl-C or hangup is not for it.
            self.pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", _COPIER, str(MAX_LAST_LINE)],
                                      {}, file_actions=actions, setsid=True)
        except BaseException:
            os.close(self.write_end)
            os.close(report)
            raise
        finally:
            os.close(read_end)
            os.close(report_write)
        self._report = report
        self._pidfd = process.pidfd(self.pid)
        if self._pidfd is None:  # cannot happen for a child not reaped yet; be safe
            self._on_exit()
        else:
            loop.add_reader(self._pidfd, self._on_exit)

    def started(self) -> None:
        """The service has its copy of the write end: ours must go, or the copier
        never sees the end of it."""
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        data = b""
        while True:  # it has exited: what it wrote is all there
            try:
                chunk = os.read(self._report, MAX_LAST_LINE + 1)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        os.close(self._report)
        self._report = -1
        self.line = data.decode(errors="replace").strip()[-MAX_LAST_LINE:] or None
        self.done.set()

    async def last_line(self, timeout: float) -> str | None:
        """The service's last line on stderr, once its copier has ended (within
        `timeout`: a child of the service may hold the pipe on); None if unknown."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        return self.line

    def close(self) -> None:
        """Let go of the copier: it runs on, reparented, until the service ends."""
        self.started()
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._report >= 0:
            os.close(self._report)
            self._report = -1


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


def _describe_status(code: int) -> str:
    if os.WIFSIGNALED(code):
        sig = os.WTERMSIG(code)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {os.WEXITSTATUS(code)}"


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

