"""Whether another process lives, and waiting for it to exit, through a pidfd:
no polling, and no mistaking a recycled pid for the process we meant. A shell
command run so. And our own name, as ps shows it."""

import ctypes
import os
import select
import signal

PR_SET_NAME = 15


def set_name(name: str) -> None:
    """Our name (comm) for ps and pgrep: a process started as `python -c` is
    named python otherwise. Best effort: nothing depends on it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another uid
    return True


def pidfd(pid: int) -> int | None:
    """A pidfd for `pid`, None if it has exited already."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def wait_exit_blocking(pid: int, timeout: float) -> bool:
    """Whether `pid` exits within `timeout` seconds; blocks (a CLI, not the loop)."""
    fd = pidfd(pid)
    if fd is None:
        return True
    try:
        return bool(select.select([fd], [], [], max(0.0, timeout))[0])
    finally:
        os.close(fd)


async def wait_exit(pid: int, timeout: float | None = None) -> bool:
    """Whether `pid` exits within `timeout` seconds, the loop serving meanwhile."""
    import asyncio
    fd = pidfd(pid)
    if fd is None:
        return True
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


OUTPUT_LIMIT = 64 << 10  # what shell() keeps of a command's output: its end


async def shell(command: str, timeout: float) -> tuple[int | None, bytes]:
    """`sh -c command`, its stdin /dev/null, the loop serving meanwhile: (its
    return code as subprocess gives it, None if it outlasted `timeout` and was
    killed; the end of its output, stdout and stderr together, read as it
    comes). Done when the shell exits, whatever it left running. Its exit is
    a pidfd's event: no child watcher, no thread, which asyncio's subprocesses
    cost a migration's downtime. OSError if it cannot start."""
    import asyncio
    import subprocess
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=write_end,
                                stderr=subprocess.STDOUT)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    output = bytearray()

    def take_output() -> None:
        while True:
            try:
                data = os.read(read_end, OUTPUT_LIMIT)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(read_end)
                return
            output.extend(data)
            del output[:-OUTPUT_LIMIT]

    exited = loop.create_future()
    fd = os.pidfd_open(proc.pid)
    os.set_blocking(read_end, False)
    loop.add_reader(read_end, take_output)
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, timeout)
        take_output()  # what it wrote before it exited
        return proc.wait(), bytes(output)
    except asyncio.TimeoutError:
        return None, bytes(output)
    finally:
        loop.remove_reader(fd)
        loop.remove_reader(read_end)
        os.close(fd)
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (/proc/PID/stat), None if it has gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name, in parentheses, may itself hold spaces and ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether `pid` is `ancestor` or one of its live descendants."""
    for _ in range(256):  # deeper than any real process tree
        if pid == ancestor:
            return True
        if pid is None or pid <= 1:
            return False
        pid = parent_of(pid)
    return False


def describe_status(code: int) -> str:
    """How a child ended, from its wait status: `exit status N`, `killed by SIGX`."""
    if os.WIFSIGNALED(code):
        sig = os.WTERMSIG(code)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {os.WEXITSTATUS(code)}"


def group_of(pid: int) -> int | None:
    """The process group a service leads (started in a session of its own), or
    None where that is not one to signal: gone, or fdmig's own."""
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return None
    return pgid if pgid != os.getpgrp() else None


def send(pidfd: int | None, pgid: int | None, signum: int) -> None:
    """`signum` to a service's process, by its pidfd; SIGKILL to the rest of its
    process group too: its children would otherwise live on as orphans holding
    its sockets, as systemd's KillMode=control-group kills every process of a
    unit. One gone meanwhile is no error: its exit is on its way."""
    if pidfd is not None:
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except OSError:
            pass
    if signum == signal.SIGKILL and pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass  # nobody left in it
