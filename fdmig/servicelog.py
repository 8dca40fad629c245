"""A service's stderr, copied: every byte goes on to `fdmig run`'s own stderr,
and the last line is kept for the message of a start that failed."""

import asyncio
import os

from fdmig import process

# How long a failed restart waits for the last line of the new service's stderr
# (its copier ends once every holder of the pipe's write end has exited).
LAST_LINE_WAIT = 1.0
MAX_LAST_LINE = 4096
# The copier, from the base system's tools, each a C program: it starts in a
# millisecond or two where a Python interpreter took 70 ms of a CPU, at every
# start of the service, under a restart's load. Standard input: the service's
# stderr. Every byte goes on to fdmig's own fd 2, inherited (opening /dev/fd/2
# would make a file's offset its own); -p: on, whatever becomes of it. Its copy
# goes through fd 4, the pipeline's pipe, and the last line that is not blank
# (its last MAX_LAST_LINE bytes) to fd 3 at the end. The signals a terminal or
# a stopping unit sends are ignored (inherited as ignored by the pipeline), so
# the service's last words are never lost.
_COPIER = ("trap '' INT TERM HUP QUIT; "
           f"tee -p /dev/fd/4 4>&1 >&2 | {{ grep -av '^[[:space:]]*$' | tail -n 1 | tail -c {MAX_LAST_LINE} >&3; }} "
           "2>/dev/null")  # the last line's reader may have gone (a holder that moved away): no word of it
_COPIER_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


class StderrCopy:
    """One start's stderr: a pipe whose write end becomes the service's fd 2 and
    whose read end a copier process (_COPIER) holds, started here.
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
            self.pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", _COPIER, "fdmig-stderr"], _COPIER_ENV,
                                      file_actions=actions, setsid=True)
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
