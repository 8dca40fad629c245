"""Non-blocking socket steps shared by chardevs and control connections: making a
TCP listener, taking a connection from it, and draining a buffer into a socket."""

import errno
import logging
import socket

log = logging.getLogger("fdmig")
ACCEPT_PAUSE = 0.25  # seconds without accepting after running out of fds
IP_FREEBIND, IPV6_FREEBIND = 15, 78  # linux/in.h, linux/in6.h


def listen_tcp(family: int, host: str, port: int, freebind: bool = False) -> socket.socket:
    """A non-blocking TCP listener at (host, port); OSError if it cannot be made.
    `freebind`: the address need not be this host's yet (it comes with a migration)."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if freebind:
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        sock.bind((host, port))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


def accept(listener: socket.socket, what: str, out_of_fds) -> socket.socket | None:
    """The next connection waiting on `listener`, or None. Out of fds, the listener
    stays readable (level-triggered), so `out_of_fds()` is called to stop watching
    it for a while rather than spin on accept(); any other failure is logged."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            out_of_fds()
        else:
            log.warning("%s: accept failed: %s", what, exc)
        return None
    return conn


def send_some(sock: socket.socket, buf: bytearray) -> int:
    """Send what the socket takes of `buf` now, and cut that from `buf`. Any
    OSError but would-block is the caller's: its connection is over."""
    try:
        sent = sock.send(buf)
    except (BlockingIOError, InterruptedError):
        return 0
    del buf[:sent]
    return sent
