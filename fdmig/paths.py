"""Where an instance's sockets live, and making that place safe to bind in."""

import os
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


def channel_path(name: str) -> str:
    return os.path.join(runtime_dir(), f"{name}.migrate.sock")


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
                  if e.endswith(".sock") and not e.endswith((".migrate.sock", ".incoming.sock")))
