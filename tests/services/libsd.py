"""Debian's libsystemd0, loaded with ctypes: the services under test talk to the
fd store through systemd's own client code, not a reimplementation of it."""

import ctypes
import os

_lib = ctypes.CDLL("libsystemd.so.0", use_errno=True)
_lib.sd_pid_notify_with_fds.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                        ctypes.POINTER(ctypes.c_int), ctypes.c_uint]
_lib.sd_pid_notify_with_fds.restype = ctypes.c_int
_lib.sd_notify_barrier.argtypes = [ctypes.c_int, ctypes.c_uint64]
_lib.sd_notify_barrier.restype = ctypes.c_int
_lib.sd_listen_fds_with_names.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.POINTER(ctypes.c_char_p))]
_lib.sd_listen_fds_with_names.restype = ctypes.c_int

SD_LISTEN_FDS_START = 3


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    if rc == 0:
        raise RuntimeError(f"{what}: NOTIFY_SOCKET is not set")
    return rc


def notify(state: str, fds=()) -> None:
    """sd_pid_notify_with_fds(0, 0, state, fds, n): one datagram, fds as SCM_RIGHTS."""
    fds = list(fds)
    array = (ctypes.c_int * len(fds))(*fds) if fds else None
    _check(_lib.sd_pid_notify_with_fds(0, 0, state.encode(), array, len(fds)), f"sd_notify {state!r}")


def barrier(timeout: float = 10.0) -> None:
    """sd_notify_barrier(3): returns once the manager has handled every message sent before."""
    _check(_lib.sd_notify_barrier(0, int(timeout * 1_000_000)), "sd_notify_barrier")


def listen_fds() -> list[tuple[int, str]]:
    """sd_listen_fds_with_names(3): [(fd, name)] from fd 3 on (it checks LISTEN_PID)."""
    names = ctypes.POINTER(ctypes.c_char_p)()
    count = _lib.sd_listen_fds_with_names(0, ctypes.byref(names))
    if count < 0:
        raise OSError(-count, f"sd_listen_fds_with_names: {os.strerror(-count)}")
    return [(SD_LISTEN_FDS_START + i, names[i].decode() if names else "unknown") for i in range(count)]
