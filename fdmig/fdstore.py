"""The fd store: the descriptors a service hands fdmig to keep (sd_notify
FDSTORE=1), as systemd keeps them for a unit with FileDescriptorStoreMax=, and
gives back at every start of the service, in the order stored.

The same open file stored twice is kept once. A stored fd is removed by its name
(FDSTOREREMOVE=1), or when it reports POLLHUP/POLLERR unless stored with FDPOLL=0.
A store request that cannot be taken whole is refused whole: the caller logs it
with the sender and counts it."""

import ctypes
import functools
import logging
import os
import platform
import socket
import stat
import time

from fdmig import notify

log = logging.getLogger("fdmig")
_KCMP_FILE = 0
_SYS_KCMP = {"x86_64": 312, "aarch64": 272, "i686": 349, "armv7l": 378}.get(platform.machine())


class Stored:
    def __init__(self, name: str, fd: int, poll: bool):
        self.name = name
        self.fd = fd
        self.poll = poll
        self.stored_at = time.time()
        self.inode = inode_of(fd)
        self.kind, self.address, self.peer = describe(fd)


class FdStore:
    """`poller` watches the stored fds for POLLHUP/POLLERR."""

    def __init__(self, limit: int, poller, on_change=lambda: None):
        self.limit = limit
        self.poller = poller
        self.on_change = on_change  # called when a hangup removes a stored fd
        self.entries: list[Stored] = []
        # By (st_dev, st_ino): only fds of one inode can be one open file, so a new
        # fd is compared with those alone, not with the whole store.
        self._by_inode: dict[tuple, list[Stored]] = {}
        self.refused = 0  # requests refused whole, for `status`

    def __len__(self) -> int:
        return len(self.entries)

    def store(self, fds: list[int], name: str | None, poll: bool) -> str | None:
        """Keep `fds` under `name`; the reason if refused (every fd then closed)."""
        name = notify.DEFAULT_FDNAME if name is None else name
        reason = "the fd store is off (--fdstore-max 0)" if self.limit == 0 else notify.fdname_problem(name)
        new, kept_already = ([], []) if reason is not None else self._split(fds)
        if reason is None and len(self.entries) + len(new) > self.limit:
            reason = (f"{len(new)} more fd(s) would make {len(self.entries) + len(new)}, "
                      f"over --fdstore-max {self.limit}")
        if reason is not None:
            _close(fds)
            return reason
        _close(kept_already)  # each kept once already, under its first name
        for fd in new:
            self._add(Stored(name, fd, poll))
        return None

    def _split(self, fds: list[int]) -> tuple[list[int], list[int]]:
        """`fds` as (new open files, open files the store or an earlier fd of
        `fds` holds already)."""
        new, kept_already, seen = [], [], {}
        for fd in fds:
            key = inode_of(fd)
            others = [entry.fd for entry in self._by_inode.get(key, ())] + seen.get(key, [])
            if any(same_file(fd, other) for other in others):
                kept_already.append(fd)
            else:
                new.append(fd)
                seen.setdefault(key, []).append(fd)
        return new, kept_already

    def adopt(self, name: str, fd: int, poll: bool, stored_at: float) -> None:
        """An fd a migration brought, stored on the source at `stored_at`."""
        entry = Stored(name, fd, poll)
        entry.stored_at = stored_at
        self._add(entry)

    def _add(self, entry: Stored) -> None:
        self.entries.append(entry)
        self._by_inode.setdefault(entry.inode, []).append(entry)
        if entry.poll:
            self._watch(entry)

    def remove(self, name: str) -> int:
        """Close and forget every fd stored under `name`; how many there were."""
        gone = [entry for entry in self.entries if entry.name == name]
        for entry in gone:
            self._drop(entry)
        return len(gone)

    def _watch(self, entry: Stored) -> None:
        def hung_up():
            if entry in self.entries:
                log.info("fd store: %s (fd %d) reported POLLHUP/POLLERR; removed", entry.name, entry.fd)
                self._drop(entry)
                self.on_change()
        try:
            self.poller.watch_errors(entry.fd, hung_up)
        except OSError:
            entry.poll = False  # a regular file cannot be polled, and never hangs up

    def _drop(self, entry: Stored) -> None:
        self.entries.remove(entry)
        same_inode = self._by_inode[entry.inode]
        same_inode.remove(entry)
        if not same_inode:
            del self._by_inode[entry.inode]
        if entry.poll:
            self.poller.watch(entry.fd)
        os.close(entry.fd)

    def named_fds(self) -> list[tuple[str, int]]:
        return [(entry.name, entry.fd) for entry in self.entries]

    def rows(self) -> list[dict]:
        from fdmig.presentation import utc_iso
        return [{"name": e.name, "fd": e.fd, "kind": e.kind, "address": e.address, "peer": e.peer,
                 "stored-at": utc_iso(e.stored_at)} for e in self.entries]

    def close(self) -> None:
        for entry in list(self.entries):
            self._drop(entry)


def _close(fds) -> None:
    for fd in fds:
        os.close(fd)


def inode_of(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def same_file(a: int, b: int) -> bool:
    """Whether fds `a` and `b` of this process are the same open file (one dup of
    the other), not only the same inode: kcmp(2), where the kernel has it."""
    sa, sb = os.fstat(a), os.fstat(b)
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        return False
    if stat.S_ISSOCK(sa.st_mode):
        return True  # a socket's inode is its one open file
    if _SYS_KCMP is not None:
        pid = os.getpid()
        result = _libc().syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)
        if result >= 0:
            return result == 0
    return _fdinfo(a) == _fdinfo(b)  # no kcmp: the same flags and offset, as systemd falls back


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _fdinfo(fd: int) -> tuple:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return fields.get("flags", "").strip(), fields.get("pos", "").strip()


def describe(fd: int) -> tuple[str, str | None, str | None]:
    """(kind, address, peer) of a stored fd, for `status`."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode):
        return "pipe", None, None
    if stat.S_ISREG(mode):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        return ("memfd" if target.startswith("/memfd:") else "file"), target or None, None
    if not stat.S_ISSOCK(mode):
        return "other", None, None
    sock = socket.socket(fileno=fd)
    try:
        family, kind = sock.family, sock.type
        if family == socket.AF_UNIX:
            return "unix", _unix_name(sock.getsockname()), _peer(sock, _unix_name)
        if family in (socket.AF_INET, socket.AF_INET6):
            proto = "tcp" if kind == socket.SOCK_STREAM else "udp" if kind == socket.SOCK_DGRAM else "other"
            show = lambda addr: _inet_name(proto, addr)  # noqa: E731
            return proto, show(sock.getsockname()), _peer(sock, show)
        return "other", None, None
    except OSError:
        return "other", None, None
    finally:
        sock.detach()


def _peer(sock, show):
    try:
        return show(sock.getpeername())
    except OSError:
        return None  # a listener, or an unconnected datagram socket


def _unix_name(name) -> str:
    if isinstance(name, bytes):  # abstract
        return "unix:@" + name[1:].decode(errors="replace")
    return f"unix:{name}"


def _inet_name(proto: str, addr) -> str:
    host, port = addr[:2]
    return f"{proto}:[{host}]:{port}" if ":" in host else f"{proto}:{host}:{port}"
