"""Sending and receiving file descriptors over a Unix socket (SCM_RIGHTS, and the
sender's SCM_CREDENTIALS on a datagram socket).

This is the only module in fdmig that builds or parses ancillary data. The rest of
the code sees fds as plain ints, and the migration codec (fdmig.migration.wire)
sees only how many arrived with each read.

Kernel semantics the callers rely on (Linux, AF_UNIX, SOCK_STREAM):

- The fds of one sendmsg() travel with the first byte of its data. A recvmsg()
  that returns that byte returns those fds, possibly along with earlier bytes, and
  never with the fds of a second sendmsg().
- The receiver gets new fds referring to the same open files (same offset, same
  flags), as if by dup(). The sender's fds stay open: closing them is its job.
"""

import array
import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence

# SCM_MAX_FD in include/net/scm.h: the kernel refuses (EINVAL) more fds than this
# in a single message.
MAX_FDS_PER_MSG = 253

# An fd in an SCM_RIGHTS payload is a C int.
_INT_SIZE = array.array("i").itemsize
_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid


class FdPassError(OSError):
    """Ancillary data arrived that we cannot take as it is. Every fd that came with it
    has been closed before this is raised."""


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
    """Send `data` with `fds` in one SCM_RIGHTS message; return the bytes sent.

    On a nonblocking socket the send may be partial, or raise BlockingIOError (in
    which case nothing, fds included, was sent). After a partial send the fds are
    already on their way, riding with the first byte: send the rest of `data` with
    plain sock.send()/sendall(), never with the fds again.
    """
    if len(fds) > MAX_FDS_PER_MSG:
        raise ValueError(f"{len(fds)} fds in one message; the kernel takes at most {MAX_FDS_PER_MSG}")
    if fds and not data:
        # On a stream socket fds need at least one byte to ride with.
        raise ValueError("fds must travel with at least one byte of data")
    ancdata = []
    if fds:
        ancdata.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
    return sock.sendmsg([data], ancdata)


def recv_with_fds(
    sock: socket.socket, bufsize: int, maxfds: int = MAX_FDS_PER_MSG
) -> tuple[bytes, list[int]]:
    """Receive up to `bufsize` bytes and the fds that came with them.

    b"" means EOF. The fds received are close-on-exec and now belong to the caller.
    A message carrying more than `maxfds` fds, or anything but SCM_RIGHTS, raises
    FdPassError after closing whatever did arrive, so nothing leaks. The kernel
    also truncates (same error) when installing the fds would exceed RLIMIT_NOFILE.
    BlockingIOError propagates from a nonblocking socket with nothing to read.
    """
    if maxfds < 0:
        raise ValueError(f"maxfds must be >= 0, not {maxfds}")
    ancbufsize = socket.CMSG_SPACE(maxfds * _INT_SIZE) if maxfds else 0
    data, ancdata, flags, _addr = sock.recvmsg(bufsize, ancbufsize, socket.MSG_CMSG_CLOEXEC)

    fds: list[int] = []
    foreign = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            # A truncated cmsg may end in part of an int; that part is no fd.
            whole = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:whole]))
        else:
            foreign.append((level, kind))

    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise FdPassError(
            errno.EMSGSIZE,
            f"ancillary data truncated (room for {maxfds} fds, or the fd limit was reached); "
            f"closed the {len(fds)} fds that did arrive",
        )
    if foreign:
        close_fds(fds)
        raise FdPassError(
            errno.EPROTO,
            f"unexpected ancillary data {foreign} (level, type); "
            f"closed the {len(fds)} fds that came with it",
        )
    return data, fds


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd. An fd that is already closed is fine; any other error is raised,
    but only after trying the rest (Linux frees the fd even when close() fails)."""
    first_error = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF and first_error is None:
                first_error = exc
    if first_error is not None:
        raise first_error


def recv_datagram(sock: socket.socket, bufsize: int, maxfds: int = MAX_FDS_PER_MSG):
    """One datagram from a unix socket with SO_PASSCRED on: (data, fds, (pid, uid,
    gid) or None, complete). `complete` is false when the datagram did not fit
    `bufsize` or its fds did not fit `maxfds`: the caller refuses it (its fds, those
    that arrived, are the caller's to close like any). BlockingIOError propagates."""
    ancbufsize = socket.CMSG_SPACE(maxfds * _INT_SIZE) + socket.CMSG_SPACE(_CREDS.size)
    data, ancdata, flags, _addr = sock.recvmsg(bufsize, ancbufsize, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    creds = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:whole]))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDS.size:
            creds = _CREDS.unpack_from(payload)
    complete = not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    return data, fds, creds, complete
