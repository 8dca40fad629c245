"""Spans on a timeline, for the benchmark to lay the peers' longest pauses against
what the instance was doing. Off unless $FDMIG_MARKS names a file: then each span
is a line `BEGIN END PID NAME` (CLOCK_MONOTONIC seconds, which every process on
the host shares), kept in memory and appended to the file at exit, so that marking
costs the loop a list append, not a write."""

import atexit
import contextlib
import gc
import os
import time

_PATH = os.environ.get("FDMIG_MARKS")
_spans: list[tuple[float, float, str]] = []


def on() -> bool:
    return bool(_PATH)


def span(name: str, began: float, ended: float | None = None) -> None:
    """A span of `name` from `began` to `ended` (now when left out)."""
    if _PATH:
        _spans.append((began, time.monotonic() if ended is None else ended, name))


@contextlib.contextmanager
def spanning(name: str):
    began = time.monotonic()
    try:
        yield
    finally:
        span(name, began)


def flush() -> None:
    """Append what was marked to the file."""
    if not _PATH or not _spans:
        return
    pid = os.getpid()
    lines = "".join(f"{b:.6f} {e:.6f} {pid} {name}\n" for b, e, name in _spans)
    _spans.clear()
    fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


_gc_began = 0.0


def _collector(phase: str, info: dict) -> None:
    global _gc_began
    if phase == "start":
        _gc_began = time.monotonic()
    else:
        span(f"gc{info['generation']}", _gc_began)


if _PATH:
    gc.callbacks.append(_collector)
    atexit.register(flush)
