"""A descriptor handed to fdmig (inherited, or passed by a control client) is
checked against what its SPEC says before anything uses it. Light on imports:
the CLI checks its own fd=N with this before passing it."""

import os
import socket
import stat

from fdmig.errors import FdmigError


def stream_socket(fd: int, server: bool, label: str) -> socket.socket:
    """`fd` wrapped as a socket if it is a stream socket, listening if and only if
    `server`; otherwise FdmigError, `fd` left open (it is the caller's)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise FdmigError(f"chardev {label}: fd {fd} is not open") from None
    if not stat.S_ISSOCK(mode):
        raise FdmigError(f"chardev {label}: fd {fd} is not a socket; accepted: a stream socket")
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise FdmigError(f"chardev {label}: fd {fd} is not a stream socket; accepted: SOCK_STREAM")
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    if listening != server:
        sock.detach()
        have = "a listening" if listening else "a connected"
        want = "server=on" if listening else "server=off"
        raise FdmigError(f"chardev {label}: fd {fd} is {have} socket; accepted with {want}")
    return sock
