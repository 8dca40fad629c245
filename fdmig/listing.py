"""The instances in the runtime dir, as `fdmig list` shows them and shell
completion offers them, and `fdmig stop`: clients of the control sockets.

Every socket is asked at once, each in a thread with a short timeout of its own,
so one hung instance (stopped, or swamped) costs the listing that timeout once,
not once per instance after it."""

import os
import stat
import time

from fdmig import paths, process, qmp
from fdmig.errors import FdmigError, NoInstanceError, TimeoutExpired

PROBE_TIMEOUT = 2.0  # `list`: how long an instance has to answer
COMPLETION_TIMEOUT = 0.5  # completion: a shell waits on it at every <TAB>
COLUMNS = ("name", "pid", "state", "chardevs", "control")
# Beside the states an instance reports (running, inmigrate, postmigrate):
STALE = "stale"  # a socket file nobody listens on: left by an instance killed outright
UNRESPONSIVE = "unresponsive"  # a process listens but does not answer within the timeout
_STATE_STYLES = {"running": "green", "inmigrate": "yellow", "postmigrate": "magenta",
                 STALE: "red", UNRESPONSIVE: "red"}
_OTHER_SOCKETS = (".migrate.sock", ".notify.sock")


def sockets(directory: str | None = None) -> list[tuple[str, str]]:
    """(name, path) of every control socket in the runtime dir: `<name>.sock`, and
    `<name>.incoming.sock` where a migration target waits. Sorted by name, an
    instance before the target waiting to take it over."""
    directory = directory or paths.runtime_dir()
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if not name.endswith(".sock") or name.endswith(_OTHER_SOCKETS):
            continue
        try:
            if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                continue
        except OSError:
            continue  # gone meanwhile
        incoming = name.endswith(".incoming.sock")
        stem = name[:-len(".incoming.sock")] if incoming else name[:-len(".sock")]
        found.append((stem, incoming, entry.path))
    return [(stem, path) for stem, _, path in sorted(found)]


def statuses(timeout: float = PROBE_TIMEOUT, directory: str | None = None) -> list[tuple[str, str, dict | None]]:
    """(name, control path, status or None where nothing answers) of each control
    socket of the runtime dir, asked all at once."""
    def ask(item):
        name, path = item
        try:
            with qmp.connect(path, timeout=timeout) as client:
                return name, path, client.execute("x-fdmig-status")
        except (FdmigError, OSError, EOFError, ValueError):
            return name, path, None
    return _each(ask, sockets(directory))


def _each(work, found: list) -> list:
    if not found:
        return []
    from concurrent.futures import ThreadPoolExecutor  # threads: not for every command's start
    with ThreadPoolExecutor(max_workers=min(32, len(found))) as pool:
        return list(pool.map(work, found))


def find(timeout: float = PROBE_TIMEOUT, directory: str | None = None) -> list[dict]:
    """A row of `list` for each control socket of the runtime dir: what the
    instance there says of itself; stale where nobody listens, unresponsive
    where a process listens and does not answer. A socket that is a chardev of
    an instance that answers (its path in the runtime dir) is none of them."""
    found = statuses(timeout, directory)
    chardev_paths = {os.path.realpath(row["address"][len("unix:"):])
                     for _, _, status in found if status is not None
                     for row in status.get("chardevs") or [] if row.get("address", "").startswith("unix:")}
    rows = []
    for name, path, status in found:
        row = {"name": name, "pid": None, "state": STALE, "chardevs": None, "control": path}
        if status is not None:
            row.update(pid=status.get("pid"), state=status.get("state"), chardevs=len(status.get("chardevs") or []))
        elif os.path.realpath(path) in chardev_paths:
            continue
        else:
            # A listener that does not answer (hung, or not an instance of ours) is
            # not stale: the next serve would not replace it.
            pid = paths.socket_owner_pid(path)
            if pid is not None:
                row.update(pid=pid, state=UNRESPONSIVE)
        rows.append(row)
    return rows


def _answers(path: str, timeout: float) -> bool:
    try:
        with qmp.connect(path, timeout=timeout):
            return True
    except (FdmigError, OSError, EOFError, ValueError):
        return False


def answering_names(timeout: float = COMPLETION_TIMEOUT) -> list[str]:
    """The names of the instances that answer now (for completion)."""
    found = sockets()
    answers = _each(lambda item: _answers(item[1], timeout), found)
    return sorted({name for (name, _), ok in zip(found, answers) if ok})


# ----- rendering -------------------------------------------------------------------

def _cells(row: dict) -> tuple[str, ...]:
    return tuple("-" if row[key] is None else str(row[key]) for key in COLUMNS)


def plain(rows: list[dict]) -> str:
    """A heading and one line per instance, the columns aligned, no cell empty
    (`-` for none): for grep and awk."""
    table = [tuple(c.upper() for c in COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def rich_table(rows: list[dict]):
    from rich.table import Table
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in COLUMNS:
        table.add_column(column.upper(), no_wrap=column != "control",
                         justify="right" if column in ("pid", "chardevs") else "left")
    state = COLUMNS.index("state")
    for row in rows:
        cells = list(_cells(row))
        style = _STATE_STYLES.get(row["state"])
        if style:
            cells[state] = f"[{style}]{cells[state]}[/]"
        table.add_row(*cells)
    return table


# ----- stop ------------------------------------------------------------------------

def stop(control_path: str, timeout: float) -> dict:
    """QMP quit to the instance at `control_path` (or to the migration target that
    waits beside it, on <name>.incoming.sock), then wait until its process has
    exited: {"pid"}. NoInstanceError (3) if none answers; TimeoutExpired (4),
    saying what it still waits for, if it has not exited within `timeout`."""
    deadline = time.monotonic() + timeout
    client, missing = None, None
    for path in (control_path, paths.incoming_beside(control_path)):
        try:
            client = qmp.connect(path, timeout=max(0.1, min(10.0, timeout)))
            break
        except NoInstanceError as exc:
            missing = missing or exc
    if client is None:
        if os.path.exists(control_path) and paths.socket_owner_pid(control_path) is None:
            # Left by an instance killed outright: `list` calls it stale. Cleared,
            # so that the name is free and `list` no longer shows it.
            paths.remove_stale_socket(control_path, "control")
            notify = paths.notify_beside(control_path)  # a `run` instance's, as dead
            if os.path.exists(notify):
                paths.remove_stale_socket(notify, "notify socket")
            raise NoInstanceError(f"no instance answers at {control_path}; removed the stale socket an "
                                  "instance killed outright left there")
        raise missing
    with client:
        status = client.execute("x-fdmig-status")
        pid, name = status["pid"], status.get("name") or paths.instance_name(control_path)
        # Held from before the quit, while the instance still answers: no other
        # process that gets its pid later is mistaken for it.
        pidfd = process.pidfd(pid)
        try:
            client.execute("quit")
        except FdmigError:
            pass  # it closed the connection: it is stopping already
    if pidfd is None:
        return {"pid": pid, "name": name}
    try:
        exited = _wait_readable(pidfd, max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        raise FdmigError(f"interrupted; instance {name} (pid {pid}) goes on stopping: it was asked to "
                         "quit") from None
    finally:
        os.close(pidfd)
    if exited:
        return {"pid": pid, "name": name}
    raise TimeoutExpired(f"instance {name} (pid {pid}) has not exited after {timeout:g} s: "
                         f"{_still_stopping(control_path, pid)}; it goes on stopping")


def _wait_readable(fd: int, timeout: float) -> bool:
    import select
    return bool(select.select([fd], [], [], timeout)[0])


def _still_stopping(control_path: str, pid: int) -> str:
    """What a stopping instance is still doing, as far as it says."""
    try:
        with qmp.connect(control_path, timeout=1) as client:
            status = client.execute("x-fdmig-status")
    except (FdmigError, OSError):
        return "it no longer answers, and has not exited"
    service = status.get("service") if status.get("pid") == pid else None
    if service and service.get("pid") and service.get("state") == "stopping":
        from fdmig.render import local_time
        kill = f"; SIGKILL at {local_time(service['kill-at'])}" if service.get("kill-at") else ""
        return f"its service (pid {service['pid']}) has not stopped yet{kill}"
    return "it is still closing"
