"""Whether another process lives, and waiting for it to exit, through a pidfd:
no polling, and no mistaking a recycled pid for the process we meant."""

import os
import select


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
