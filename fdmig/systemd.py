"""The two systemd protocols fdmig speaks, written against their documentation:
sd_notify (a datagram of newline-separated assignments to $NOTIFY_SOCKET) and
socket activation ($LISTEN_FDS descriptors from fd 3 on)."""

import array
import logging
import os
import socket

log = logging.getLogger("fdmig")
SD_LISTEN_FDS_START = 3


def notify(*assignments: str, fds: tuple[int, ...] = ()) -> bool:
    """Send e.g. notify("READY=1", "STATUS=serving 3 chardevs"), with `fds` (FDSTORE=1).
    False when not under a service manager, or when the message could not go."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    message = "\n".join(assignments).encode()
    try:
        # Never block the instance on a manager that does not read: drop instead.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            if fds:
                sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], 0, address)
            else:
                sock.sendto(message, address)
    except BlockingIOError:
        log.debug("sd_notify to %s dropped: its queue is full", address)
        return False
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def listen_fds(unset_environment: bool = True) -> dict[str, list[int]]:
    """Descriptors passed by socket activation, by name (several may share a name).
    Like sd_listen_fds(3): only when $LISTEN_PID is our pid; marked close-on-exec."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return {}
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "")
    names = names.split(":") if names else []
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    found: dict[str, list[int]] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        found.setdefault(name, []).append(fd)
    return found


def activation_env(names: list[str], pid: int) -> dict[str, str]:
    """The environment that hands len(names) fds from fd 3 on to process `pid`."""
    return {"LISTEN_FDS": str(len(names)), "LISTEN_PID": str(pid), "LISTEN_FDNAMES": ":".join(names)}
