"""The fds of QEMU's other chardev backends (pty, serial, pipe, udp, file): how
each is opened, checked when it is handed over, and read and written.

A chardev holds one of these where a socket chardev holds its connection, so the
chardev's state machine, frontends and migration sections serve both. It is
always "connected": the fd is the far end, and nothing about it ends a session.
Every fd of one is named by a role, as a socket chardev's listener and
connection are, and moves in the chardev's section under that role:
- "conn": the fd read (a pty's master, the tty, the FIFO read, the udp socket,
  the file), and written too unless there is an "out";
- "out": a pipe's FIFO written, when `P.in` and `P.out` are two;
- "slave": a pty's slave, held so that the line never hangs up: with no process
  on the slave the master would read EIO, and the kernel would drop what the
  program wrote before it left.
"""

import dataclasses
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import termios

from fdmig.errors import FdmigError, SpecError
from fdmig.spec import bracketed, two_fifos

log = logging.getLogger("fdmig")

# A write is one datagram on a udp socket: at most what one IPv4 datagram carries.
WRITE_MAX = 65507
_SEND_TRIES = 4  # a udp write the peer's host refused each time is given up
_TIOCGPTN, _TIOCSPTLCK = 0x80045430, 0x40045431  # asm-generic/ioctls.h
_PTMX_MAJOR, _PTMX_MINOR = 5, 2


class Fd:
    """One fd of a chardev's, by role; the migration sends its number."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self.fd, flag)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view[:WRITE_MAX]):]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class End:
    """A chardev's fds as one endpoint with a socket's calls (recv, send,
    shutdown, close), so the chardev drives it as it drives a connection."""

    family = None  # not a socket: no TCP options, no peer credentials

    def __init__(self, label: str, kind: str, fds: dict, peer: str = ""):
        self.label = label
        self.kind = kind
        self.fds = fds  # role -> Fd
        self.peer = peer
        self._read = fds["conn"].fd
        self._write = fds["out"].fd if "out" in fds else self._read
        self.refused = 0  # udp datagrams the peer's host refused (ICMP port unreachable)

    def fileno(self) -> int:
        return self._read

    def local_port(self) -> int:
        """A udp socket's port, as bound."""
        sock = socket.socket(fileno=self._read)
        try:
            return sock.getsockname()[1]
        finally:
            sock.detach()

    def extra(self) -> dict:
        """The fds that move beside "conn", by role."""
        return {role: fd for role, fd in self.fds.items() if role != "conn"}

    def setblocking(self, flag: bool) -> None:
        for fd in self.fds.values():
            fd.setblocking(flag)

    def recv(self, size: int, flags: int = 0) -> bytes:
        """What waits to be read; BlockingIOError when nothing does. A read of
        nothing ends only a tty (hung up: it reads so from then on, as QEMU
        takes it); an empty datagram is no end."""
        try:
            data = os.read(self._read, size)
        except ConnectionRefusedError:
            self._refused()
            raise BlockingIOError(errno.EAGAIN, "nothing to read") from None
        if not data and self.kind != "serial":
            raise BlockingIOError(errno.EAGAIN, "nothing to read")
        return data

    def send(self, data) -> int:
        chunk = data[:WRITE_MAX]
        for _ in range(_SEND_TRIES):
            try:
                return os.write(self._write, chunk)
            except ConnectionRefusedError:
                # An earlier datagram's refusal, reported now: this one was not sent.
                self._refused()
        # Refused every time (a peer's host answering each with ICMP): udp loses a
        # datagram rather than the chardev; said and counted.
        log.warning("chardev %s: a datagram of %d bytes to %s not sent", self.label, len(chunk), self.peer)
        return len(chunk)

    def _refused(self) -> None:
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th...: a log that a flood cannot fill
            log.warning("chardev %s: %s refused a datagram (nothing listens there); %d refused so far",
                        self.label, self.peer, self.refused)

    def sendall(self, data: bytes) -> None:
        self.fds.get("out", self.fds["conn"]).sendall(data)

    def shutdown(self, how: int) -> None:
        """No half-close: the far end of a pty, tty, FIFO or datagram socket sees none."""

    def getpeername(self) -> str:
        return self.peer

    def close(self) -> None:
        for fd in self.fds.values():
            fd.close()


# ----- opening -----------------------------------------------------------------

def open_end(spec, label: str) -> End:
    """Open what `spec` names. FdmigError (with the path and the reason) if it
    cannot be opened."""
    opener = {"pty": _open_pty, "serial": _open_serial, "pipe": _open_pipe, "udp": _open_udp,
              "file": _open_file}[spec.kind]
    fds: dict = {}
    try:
        peer = opener(spec, fds)
    except BaseException as exc:
        for fd in fds.values():
            fd.close()
        if not isinstance(exc, OSError):
            raise
        where = f" {spec.path}" if spec.path and spec.kind != "pty" else ""
        raise FdmigError(f"chardev {label}: cannot open {spec.kind}{where}: {exc.strerror or exc}") from None
    return End(label, spec.kind, fds, peer)


_FLAGS = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


def _open_pty(spec, fds: dict) -> str:
    master = os.open("/dev/ptmx", os.O_RDWR | _FLAGS)
    fds["conn"] = Fd(master)
    fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))  # unlockpt()
    path = pty_path(master)
    # Left with the kernel's settings (echo, canonical input, CR-LF output), as a
    # terminal is for the shell or getty a console runs; a program that wants the
    # line raw (a virtual machine's serial port, screen) makes it so itself.
    fds["slave"] = Fd(os.open(path, os.O_RDWR | _FLAGS))
    return path


def _open_serial(spec, fds: dict) -> str:
    fds["conn"] = Fd(os.open(spec.path, os.O_RDWR | _FLAGS))
    if not os.isatty(fds["conn"].fd):
        raise OSError(errno.ENOTTY, "not a terminal device")
    make_raw(fds["conn"].fd)
    return spec.path


def _open_pipe(spec, fds: dict) -> str:
    """`P.in` read and `P.out` written when both exist, else `P` both ways, as
    QEMU does. Opened read-write: the open never waits for a far end, and no
    far end's close is ever an EOF here."""
    if two_fifos(spec.path):
        for role, path in zip(("conn", "out"), (f"{spec.path}.in", f"{spec.path}.out")):
            fds[role] = Fd(os.open(path, os.O_RDWR | _FLAGS))
    else:
        if spec.frontend == "echo":
            raise SpecError(f"chardev {spec.id}: frontend: echo on one FIFO both ways reads back its own "
                            f"echoes; accepted: {spec.path}.in and {spec.path}.out (mkfifo both) for an echo")
        try:
            fds["conn"] = Fd(os.open(spec.path, os.O_RDWR | _FLAGS))
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"neither {spec.path}.in and {spec.path}.out nor {spec.path} exist "
                                        "(make them with mkfifo)") from None
    for fd in fds.values():
        if not stat.S_ISFIFO(os.fstat(fd.fd).st_mode):
            raise OSError(errno.EINVAL, "not a FIFO (make one with mkfifo)")
    return spec.path


def _open_udp(spec, fds: dict) -> str:
    infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    fds["conn"] = Fd(sock.detach())
    sock = socket.socket(fileno=fds["conn"].fd)
    local = (spec.localaddr or "", spec.localport or 0)
    try:
        sock.bind(local)
    except OSError as exc:
        where = f"{bracketed(local[0]) or '*'}:{local[1]}"
        if exc.errno == errno.EADDRINUSE:  # a SPEC that does not fit, as a TCP address in use is
            raise SpecError(f"chardev {spec.id}: cannot bind udp {where}: {exc.strerror}; accepted: a "
                            "localaddr and localport no other socket holds") from None
        raise OSError(exc.errno, f"cannot bind {where}: {exc.strerror}") from None
    else:
        sock.connect(address)
    finally:
        sock.detach()
    return _udp_name(address)


def _open_file(spec, fds: dict) -> str:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (0 if spec.append else os.O_TRUNC)
    fds["conn"] = Fd(os.open(spec.path, flags, 0o666))
    return spec.path


def _udp_name(address) -> str:
    return f"udp:{bracketed(address[0])}:{address[1]}"


def pty_path(master: int) -> str:
    """The slave of a pty master: /dev/pts/N (ptsname)."""
    return f"/dev/pts/{struct.unpack('I', fcntl.ioctl(master, _TIOCGPTN, b'0000'))[0]}"


def make_raw(fd: int) -> None:
    """cfmakeraw(), and CLOCAL: no line discipline between a serial chardev and
    its line, and no hangup read from a modem line's carrier, as QEMU sets a
    tty. Applied once, at the first open: a handover never touches a line's
    settings."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
               | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8 | termios.CREAD | termios.CLOCAL
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


# ----- checking what arrives ------------------------------------------------------

ROLES = {"pty": ("conn", "slave"), "serial": ("conn",), "pipe": ("conn", "out"), "udp": ("conn",),
         "file": ("conn",)}


def roles(spec) -> tuple[str, ...]:
    """The roles of the fds a chardev of `spec` holds, as it would open them here."""
    if spec.kind == "pipe" and not two_fifos(spec.path):
        return ("conn",)
    return ROLES[spec.kind]


def check(fd: int, role: str, spec, label: str) -> Fd:
    """`fd` as the `role` fd of `spec`'s chardev if it is what the spec says;
    otherwise FdmigError, `fd` left open (the caller's to close)."""
    name = f"chardev {label}: the {role} fd"
    if role not in ROLES[spec.kind]:
        raise FdmigError(f"{name}: a {spec.kind} chardev has no such fd; accepted: {', '.join(ROLES[spec.kind])}")
    try:
        found = os.fstat(fd)
    except OSError:
        raise FdmigError(f"{name} is not open") from None
    try:
        problem = _CHECKS[spec.kind](fd, found, role, spec)
    except OSError as exc:
        problem = f"cannot be inspected: {exc.strerror}"
    if problem:
        raise FdmigError(f"{name} {problem}")
    return Fd(fd)


def take_up(fd: int, spec, label: str) -> End:
    """An End from `fd`, the one a chardev of `spec` read, kept for it in its
    manager's fd store by an earlier life of this instance (--fdstore); the fds
    beside it (a pty's slave, a pipe's FIFO written) opened again by path.
    FdmigError if `fd` is not what the spec says (`fd` left open)."""
    if spec.kind == "pty":
        try:
            spec = dataclasses.replace(spec, path=pty_path(fd))
        except OSError:
            raise FdmigError(f"chardev {label}: the stored fd is not a pty's master") from None
    fds = {"conn": check(fd, "conn", spec, label)}
    extra = {"pty": "slave", "pipe": "out"}.get(spec.kind)
    if extra in roles(spec):
        path = spec.path if spec.kind == "pty" else f"{spec.path}.out"
        try:
            fds[extra] = Fd(os.open(path, os.O_RDWR | _FLAGS))
        except OSError as exc:
            raise FdmigError(f"chardev {label}: cannot open {path} again: {exc.strerror}") from None
    os.set_blocking(fd, False)
    return join(spec, fds)


def join(spec, by_role: dict) -> End:
    """The End a target holds, from the fds that arrived for it by role."""
    peer = spec.path or ""
    if spec.kind == "udp":
        sock = socket.socket(fileno=by_role["conn"].fd)
        try:
            peer = _udp_name(sock.getpeername())
        finally:
            sock.detach()
    return End(spec.id, spec.kind, dict(by_role), peer)


def _same_file(found: os.stat_result, path: str) -> str:
    try:
        there = os.stat(path)
    except OSError as exc:
        return f"cannot be compared with {path}: {exc.strerror}"
    if (found.st_dev, found.st_ino) != (there.st_dev, there.st_ino):
        return f"is not {path}"
    return ""


def _check_pty(fd: int, found, role: str, spec) -> str:
    if not stat.S_ISCHR(found.st_mode) or not os.isatty(fd):
        return "is not a terminal; accepted: a pty's master and slave"
    if role == "conn":
        if (os.major(found.st_rdev), os.minor(found.st_rdev)) != (_PTMX_MAJOR, _PTMX_MINOR):
            return "is not a pty master"
        path = pty_path(fd)
        return "" if path == spec.path else f"is the master of {path}, not of {spec.path}"
    there = os.stat(spec.path)
    return "" if found.st_rdev == there.st_rdev else f"is not {spec.path}"


def _check_serial(fd: int, found, role: str, spec) -> str:
    if not stat.S_ISCHR(found.st_mode) or not os.isatty(fd):
        return "is not a terminal; accepted: a tty device"
    return "" if found.st_rdev == os.stat(spec.path).st_rdev else f"is not {spec.path}"


def _check_pipe(fd: int, found, role: str, spec) -> str:
    if not stat.S_ISFIFO(found.st_mode):
        return "is not a FIFO"
    split = two_fifos(spec.path)
    if role == "out" and not split:
        return f"arrived for {spec.path}.out, which does not exist here"
    path = {"conn": f"{spec.path}.in", "out": f"{spec.path}.out"}[role] if split else spec.path
    return _same_file(found, path)


def _check_udp(fd: int, found, role: str, spec) -> str:
    if not stat.S_ISSOCK(found.st_mode):
        return "is not a socket; accepted: a udp socket"
    sock = socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return "is not a udp socket"
        try:
            port = sock.getpeername()[1]
        except OSError:
            return "is not connected; accepted: a udp socket connected to the SPEC's host and port"
        if port != spec.port:
            return f"sends to port {port}, not {spec.port}"
        local = sock.getsockname()[1]
        if spec.localport and local != spec.localport:
            return f"is bound to port {local}, not {spec.localport}"
        return ""
    finally:
        sock.detach()


def _check_file(fd: int, found, role: str, spec) -> str:
    if not stat.S_ISREG(found.st_mode):
        return "is not a regular file"
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_ACCMODE == os.O_RDONLY or not flags & os.O_APPEND:
        return "is not open for appending"
    return _same_file(found, spec.path)


_CHECKS = {"pty": _check_pty, "serial": _check_serial, "pipe": _check_pipe, "udp": _check_udp,
           "file": _check_file}
