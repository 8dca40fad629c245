"""The rule that two instances never share a listening address (nor a tty or a
FIFO, which both would read, nor a file, which the second would truncate),
checked before `serve`, `run`, `attach` or `migrate-in` opens one: against what
the live instances of the runtime dir (fdmig.listing) say they hold, and
against the kernel's table of listening unix sockets."""

import os

from fdmig import listing
from fdmig.errors import SpecError

# The states of a server chardev that hold its listening socket.
LISTENING = ("listening", "connected", "disconnected", "migrating")
# What a second holder would read bytes from (a tty, a FIFO) or truncate (a file).
READ_DEVICES = ("serial", "pipe", "file")


def _resolved(spec, cwd: str | None = None):
    """`spec` with its unix path as the kernel finds it: relative to `cwd` (ours
    by default: another instance's relative paths are relative to its own), and
    its directory's symlinks resolved, so that two spellings of one socket file
    are one address. The file itself is not resolved: it may not exist yet."""
    if spec.kind != "unix" and spec.kind not in READ_DEVICES:
        return spec
    from fdmig.spec import ChardevSpec
    path = os.path.join(cwd if cwd is not None else os.getcwd(), spec.path)
    if spec.kind in READ_DEVICES:
        path = os.path.realpath(path)  # a device's, a FIFO's or a file's symlinks lead to one file
    else:
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return ChardevSpec(**{**spec.__dict__, "path": path})


def check_free(specs, own_name: str | None = None) -> None:
    """SpecError (exit 2) naming the instance and chardev if another live instance
    listens on an address one of `specs` would listen on (a unix path, or a TCP
    address, as spec.Addresses compares them). `own_name`'s instance is left
    out: a migration target takes its source's addresses over, and an attach is
    checked against its own instance elsewhere. A unix path some other process
    listens on is refused too; one that no process listens on is taken over."""
    adopted = _passed_names()
    servers = [_resolved(spec) for spec in specs
               if (spec.server and spec.kind in ("unix", "inet") or spec.kind in READ_DEVICES)
               and not spec.local_incoming and f"{spec.id}.listener" not in adopted]
    if not servers:
        return
    handed = None  # what the instance `own_name` listens on: ours to take
    for name, _, status in listing.statuses():
        if status is None or status.get("pid") == os.getpid():
            continue
        if name == own_name:  # its source, and a target waiting beside it (listening nowhere)
            handed = _listening(status, handed)
            continue
        held = _listening(status)
        for spec in servers:
            conflict = held.conflict(spec)
            if conflict is not None:
                label, address = conflict
                raise SpecError(f"chardev {spec.id}: {address} is in use by instance '{name}' "
                                f"(chardev {label}, pid {status['pid']}); stop it (fdmig stop --name "
                                f"{name}), or choose another address")
    for spec in servers:
        if spec.kind == "unix" and (handed is None or handed.conflict(spec) is None) \
                and unix_listening(spec.path):
            raise SpecError(f"chardev {spec.id}: unix:{spec.path} is in use: {_listener(spec.path)} listens on "
                            "it; stop it, or choose another path")


def _passed_names() -> set:
    """The names of the fds passed to us by socket activation: a chardev whose
    listener is among them (--fdstore) takes it up rather than listening."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return set()
    except ValueError:
        return set()
    return set(os.environ.get("LISTEN_FDNAMES", "").split(":"))


def _listening(status: dict, held=None):
    """The addresses an instance's server chardevs listen on, from its status
    (added to `held`, if given)."""
    from fdmig.spec import Addresses, parse_spec
    try:  # its relative paths are relative to its working directory
        cwd = os.readlink(f"/proc/{status['pid']}/cwd")
    except OSError:
        cwd = None  # unknown: compared as if ours
    if held is None:
        held = Addresses("/")  # every path in it resolved already
    for row in status.get("chardevs", []):
        held_open = row.get("role") == "server" or row.get("backend") in READ_DEVICES
        if held_open and row.get("spec") and row.get("state") in LISTENING:
            held.add(_resolved(parse_spec(row["spec"]), cwd))
    return held


def _listener(path: str) -> str:
    """Who listens at a unix path, as a message names it: `pid N (name)` where
    this user may see it (a service orphaned by a holder killed outright, say)."""
    import psutil
    try:
        for conn in psutil.net_connections(kind="unix"):
            if conn.laddr == path and conn.pid:  # psutil gives unix sockets no state
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def unix_listening(path: str) -> bool:
    """Whether a listening unix socket is bound at `path` (by any process of this
    network namespace), read from the kernel's table: connecting to find out
    would be a peer for whoever listens there."""
    try:
        with open("/proc/net/unix") as table:
            next(table)
            for line in table:
                fields = line.split(None, 7)
                # Flags 00010000: __SO_ACCEPTCON, a listening socket.
                if len(fields) == 8 and fields[7].rstrip("\n") == path and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError, StopIteration):
        pass
    return False
