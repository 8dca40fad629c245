"""Non-blocking socket steps shared by chardevs and control connections: taking
a connection from a listener, and draining a buffer into a socket."""

import errno
import logging
import socket

log = logging.getLogger("fdmig")
ACCEPT_PAUSE = 0.25  # seconds without accepting after running out of fds


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
