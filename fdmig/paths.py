"""Where an instance's sockets live, making that place safe to bind in, and who
may talk to them."""

import dataclasses
import os
import socket
import stat

from fdmig.errors import FdmigError


def runtime_dir() -> str:
    explicit = os.environ.get("FDMIG_RUNTIME_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "fdmig")
    if os.geteuid() == 0:
        return "/run/fdmig"
    return f"/tmp/fdmig-{os.geteuid()}"


def control_path(name: str) -> str:
    return os.path.join(runtime_dir(), f"{name}.sock")


def _stem(control: str) -> str:
    return control[:-5] if control.endswith(".sock") else control


def instance_name(control: str) -> str:
    """The name an instance at control path `control` goes by: its file name less .sock."""
    return os.path.basename(_stem(control))


def channel_beside(control: str) -> str:
    """The default migration channel, next to the control socket: <name>.migrate.sock."""
    return _stem(control) + ".migrate.sock"


def incoming_beside(control: str) -> str:
    """Where a target answers QMP while it waits, next to the control socket the
    source still holds: <name>.incoming.sock."""
    return _stem(control) + ".incoming.sock"


def notify_beside(control: str) -> str:
    """A `run` instance's NOTIFY_SOCKET for its service: <name>.notify.sock."""
    return _stem(control) + ".notify.sock"


@dataclasses.dataclass(frozen=True)
class ChannelAddress:
    """Where a migration channel listens: a unix path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def tcp(self) -> bool:
        return self.path is None

    @property
    def uri(self) -> str:
        if not self.tcp:
            return f"unix:{self.path}"
        return f"tcp:[{self.host}]:{self.port}" if ":" in self.host else f"tcp:{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.uri


def parse_channel_uri(uri: str) -> ChannelAddress:
    """A `unix:PATH` or `tcp:HOST:PORT` migration channel; anything else is refused
    with the reason. Here, not with the channel's asyncio code: the CLI parses it."""
    scheme, _, rest = uri.partition(":")
    if scheme == "unix" and rest:
        return ChannelAddress(path=rest)
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host and port.isdigit() and 0 < int(port) < 65536:
            return ChannelAddress(host=host, port=int(port))
        raise ValueError(f"channel '{uri}': accepted: tcp:HOST:PORT with a port from 1 to 65535")
    raise ValueError(f"channel '{uri}' is not understood; accepted: unix:PATH or tcp:HOST:PORT")


# Set for a target that `migrate-out --spawn` starts: its stdout and stderr are a
# pipe to migrate-out (which keeps the last line, should it fail) until the
# commit; then the source's own, sent over the channel, so the instance's log
# goes on where it went, and migrate-out's pipe closes when migrate-out is done.
SPAWNED_ENV = "FDMIG_SPAWNED"


def ensure_private_dir(path: str) -> str:
    """Create `path` 0700 (parents as needed) or check that an existing one is ours
    and closed to others: a socket bound inside it is then private from the first
    instant, with no window between bind() and chmod()."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise FdmigError(f"cannot create runtime dir {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise FdmigError(f"runtime dir {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise FdmigError(f"runtime dir {path} is owned by uid {st.st_uid}, not by uid {os.geteuid()}")
    if st.st_mode & 0o022:
        raise FdmigError(
            f"runtime dir {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "expected 0700")
    return path


def instance_names() -> list[str]:
    """Names of instances with a control socket in the runtime dir (for completion)."""
    try:
        entries = os.listdir(runtime_dir())
    except OSError:
        return []
    return sorted(e[:-5] for e in entries
                  if e.endswith(".sock") and not e.endswith((".migrate.sock", ".incoming.sock", ".notify.sock")))


def peercred(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(cred[0:4], "little"), int.from_bytes(cred[4:8], "little")


class Stranger(Exception):
    """The process at the other end runs as neither our uid nor root."""

    def __init__(self, pid: int, uid: int):
        super().__init__(f"uid {uid} is not uid {os.geteuid()}")
        self.pid, self.uid = pid, uid


def trusted_peer(sock: socket.socket) -> int:
    """The pid at the other end of a unix socket, if it runs as our own uid or as
    root (whatever the file modes say); Stranger otherwise. Every socket fdmig
    accepts or connects to is checked with this before a byte is read."""
    pid, uid = peercred(sock)
    if uid not in (os.geteuid(), 0):
        raise Stranger(pid, uid)
    return pid


def bind_private(path: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A unix socket at `path` (listening, if a stream socket), mode 0600 from the
    moment it exists. It is bound under a temporary name and renamed into place,
    so a client never finds the path missing while a predecessor's is replaced."""
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    # A datagram socket is bound in place: its name (getsockname) is what a
    # migration's target checks it by, and only its own service sends to it.
    in_place = kind != socket.SOCK_STREAM
    tmp = path if in_place else f"{path}.{os.getpid()}.tmp"
    old_umask = os.umask(0o177)
    try:
        if not in_place:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        sock.bind(tmp)
    except OSError as exc:
        sock.close()
        raise FdmigError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    if not in_place:
        sock.listen(64)
        os.rename(tmp, path)
    return sock


def remove_stale_socket(path: str, what: str) -> None:
    """QEMU unlinks whatever socket is at the path before binding; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FdmigError(f"{what}: {path} exists and is not a socket")
    os.unlink(path)


def remove_own_socket(path: str, inode: int) -> None:
    """Unlink `path` only if it is still the socket we bound (not a successor's)."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def socket_owner_pid(path: str) -> int | None:
    """Pid of the process answering at a unix socket path, if any (SO_PEERCRED)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return peercred(probe)[0] or None
    except OSError:
        return None
    finally:
        probe.close()


def claim_path(path: str, what: str = "an instance") -> None:
    """Refuse a path another live process answers at; replace a stale socket."""
    if not os.path.lexists(path):
        return
    pid = socket_owner_pid(path)
    if pid is not None:
        raise FdmigError(f"{what} already answers at {path} (pid {pid}); "
                         "stop it, or choose another --name or --control")
    remove_stale_socket(path, "control")
