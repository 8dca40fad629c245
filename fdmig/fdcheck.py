"""Every descriptor fdmig is handed (inherited, passed by a control client, or
received in a migration) is checked against what its SPEC says before anything
uses it. One checker for all three. Light on imports: the CLI checks its own
fd=N with this before passing it."""

import os
import socket
import stat

from fdmig.errors import FdmigError


def family_of(spec) -> int:
    if spec.kind == "unix":
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in (spec.host or "") else socket.AF_INET


def stream_socket(fd: int, spec, label: str, role: str | None = None) -> socket.socket:
    """`fd` wrapped as a socket if it is what `spec` says; otherwise FdmigError,
    `fd` left open (it is the caller's to close, or not: a bare fd=N may be anything).

    `role` None is a descriptor handed over whole (fd=, fdname=): it must listen
    if and only if the spec is a server. A migrated one has a role ("listener" or
    "conn"), which says whether it listens, and must be at the spec's address."""
    name = f"fd {fd}" if role is None else f"the {role} fd"
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise FdmigError(f"chardev {label}: {name} is not open") from None
    if not stat.S_ISSOCK(mode):
        raise FdmigError(f"chardev {label}: {name} is not a socket; accepted: a stream socket")
    return _inspected(fd, name, lambda sock: _check(sock, spec, label, role, name), f"chardev {label}: ")


def notify_socket(fd: int, path: str) -> socket.socket:
    """`fd` wrapped as a socket if it is a `run` instance's notify socket: a unix
    datagram socket bound at `path`; otherwise FdmigError, `fd` left open."""
    name = "the service's notify fd"

    def check(sock):
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_DGRAM or sock.getsockname() != path:
            raise FdmigError(f"{name} is not a unix datagram socket bound at {path}")
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise FdmigError(f"{name} is not a socket")
    except OSError:
        raise FdmigError(f"{name} is not open") from None
    return _inspected(fd, name, check)


def _inspected(fd: int, name: str, check, prefix: str = "") -> socket.socket:
    """`fd` as a socket once `check(sock)` passes; the fd left open either way."""
    sock = socket.socket(fileno=fd)
    try:
        check(sock)
    except OSError as exc:
        sock.detach()
        raise FdmigError(f"{prefix}cannot inspect {name}: {exc.strerror}") from None
    except FdmigError:
        sock.detach()
        raise
    return sock


def _check(sock: socket.socket, spec, label: str, role: str | None, name: str) -> None:
    if sock.type != socket.SOCK_STREAM:
        raise FdmigError(f"chardev {label}: {name} is not a stream socket; accepted: SOCK_STREAM")
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    want = spec.server if role is None else role == "listener"
    have = "a listening" if listening else "a connected"
    if listening != want:
        accepted = (f" with server={'on' if listening else 'off'}" if role is None else
                    f": {'a listening' if want else 'a connected'} socket")
        raise FdmigError(f"chardev {label}: {name} is {have} socket; accepted{accepted}")
    if listening and not spec.server:
        raise FdmigError(f"chardev {label}: a listening fd arrived for a client chardev")
    if spec.kind not in ("unix", "inet"):
        return  # fd=, fdname=: the descriptor is the address
    families = (socket.AF_INET, socket.AF_INET6) if spec.kind == "inet" else (socket.AF_UNIX,)
    if sock.family not in families:
        raise FdmigError(f"chardev {label}: {name} is an {sock.family.name} socket, but the spec says {spec.address}")
    if spec.kind == "unix":
        bound = sock.getsockname() if spec.server else sock.getpeername()
        if bound != spec.path:
            raise FdmigError(f"chardev {label}: {name} is bound to '{bound}', not to {spec.path}")
    else:
        port = (sock.getsockname() if spec.server else sock.getpeername())[1]
        if spec.port and port != spec.port:
            raise FdmigError(f"chardev {label}: {name} is on port {port}, not {spec.port}")
