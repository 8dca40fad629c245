"""Non-blocking socket steps shared by chardevs and control connections: making a
TCP listener, taking a connection from it, draining a buffer into a socket, and
a pipe that moves a bridge's bytes from one socket to another with splice(2);
and whether an address is this host's."""

import errno
import fcntl
import logging
import os
import socket

log = logging.getLogger("fdmig")
ACCEPT_PAUSE = 0.25  # seconds without accepting after running out of fds
IP_FREEBIND, IPV6_FREEBIND = 15, 78  # linux/in.h, linux/in6.h


def holds(family: int, address: str) -> bool:
    """Whether this host holds the IP `address` now: only one of its own binds
    (not free-bound)."""
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


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


F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032  # linux/fcntl.h
PIPE_SIZE = 1 << 20  # the unprivileged maximum (fs.pipe-max-size) by default
_SPLICE = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE


class Pipe:
    """Bytes on their way from one socket to another, moved by splice(2) and never
    copied through this process: read from the source's kernel buffer into the
    pipe, written from the pipe into the destination's. `held` counts what is in
    the pipe. OSError from fill() is the source's, from drain() the destination's."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            self.size = fcntl.fcntl(self.w, F_GETPIPE_SZ)  # a smaller pipe only means more turns
        self.held = 0

    @property
    def room(self) -> int:
        """What fill() may still add: a full pipe must stop the reading, not spin it."""
        return self.size - self.held

    def fill(self, source: socket.socket, most: int) -> int | None:
        """Up to `most` bytes from `source`: how many (0 at the peer's EOF), None if none now."""
        try:
            n = os.splice(source.fileno(), self.w, most, flags=_SPLICE)
        except (BlockingIOError, InterruptedError):
            return None
        self.held += n
        return n

    def drain(self, destination: socket.socket) -> int:
        """What `destination` takes of the pipe now."""
        if not self.held:
            return 0
        try:
            n = os.splice(self.r, destination.fileno(), self.held, flags=_SPLICE)
        except (BlockingIOError, InterruptedError):
            return 0
        self.held -= n
        return n

    def take(self) -> bytes:
        """Everything in the pipe, out of it: a migration carries bytes, not pipes."""
        chunks = []
        while self.held:
            chunk = os.read(self.r, self.held)
            self.held -= len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)
        self.held = 0
