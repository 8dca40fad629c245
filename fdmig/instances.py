"""The instances in the runtime dir, as their control sockets answer: for
`fdmig list`, the completion of --name, and the rule that two instances never
share a listening address."""

import os

from fdmig import paths, qmp
from fdmig.errors import FdmigError, SpecError

# The states of a server chardev that hold its listening socket.
LISTENING = ("listening", "connected", "disconnected", "migrating")
# How long one instance may take to answer before it is listed as not answering.
ANSWER_TIMEOUT = 2.0


def _ask(name: str, control: str, timeout: float) -> dict:
    """What the instance at `control` says of itself (its status), or, while only
    a migration target waits there, what the target says; None: stale."""
    for path in (control, paths.incoming_beside(control)):
        if not os.path.exists(path):
            continue
        try:
            with qmp.connect(path, timeout=timeout) as client:
                return {"name": name, "control": control, "status": client.execute("x-fdmig-status")}
        except (FdmigError, OSError, EOFError, ValueError):
            continue
    return {"name": name, "control": control, "status": None}


def survey(timeout: float = ANSWER_TIMEOUT) -> list[dict]:
    """Every instance with a control socket (or a waiting target's) in the
    runtime dir, asked at once: [{"name", "control", "status" (None: nothing
    answers)}], by name."""
    try:
        entries = os.listdir(paths.runtime_dir())
    except OSError:
        return []
    names = set()
    for entry in entries:
        if entry.endswith(".incoming.sock"):
            names.add(entry[:-len(".incoming.sock")])
        elif entry.endswith(".sock") and not entry.endswith((".migrate.sock", ".notify.sock")):
            names.add(entry[:-len(".sock")])
    if not names:
        return []
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        return list(pool.map(lambda name: _ask(name, paths.control_path(name), timeout), sorted(names)))


def live_names(timeout: float = 0.5) -> list[str]:
    return [found["name"] for found in survey(timeout) if found["status"] is not None]


def _absolute(spec):
    """`spec` with a relative unix path made ours: another instance's are its own."""
    if spec.kind != "unix" or os.path.isabs(spec.path):
        return spec
    from fdmig.spec import ChardevSpec
    return ChardevSpec(**{**spec.__dict__, "path": os.path.abspath(spec.path)})


def check_free(specs, own_name: str | None = None) -> None:
    """SpecError (exit 2) naming the instance and chardev if another live instance
    listens on an address one of `specs` would listen on (a unix path, or a TCP
    address, as spec.Addresses compares them). `own_name`'s instance is left
    out: a migration target takes its source's addresses over, and an attach is
    checked against its own instance elsewhere. A unix path some other process
    listens on is refused too; one that no process listens on is taken over."""
    from fdmig.spec import Addresses
    adopted = _passed_names()
    servers = [_absolute(spec) for spec in specs
               if spec.server and spec.kind in ("unix", "inet") and not spec.local_incoming
               and f"{spec.id}.listener" not in adopted]
    if not servers:
        return
    handed = Addresses()  # what the instance `own_name` listens on: ours to take
    for found in survey():
        status = found["status"]
        if status is None or status.get("pid") == os.getpid():
            continue
        held = _listening(status)
        if found["name"] == own_name:
            handed = held
            continue
        for spec in servers:
            conflict = held.conflict(spec)
            if conflict is not None:
                label, address = conflict
                raise SpecError(f"chardev {spec.id}: {address} is in use by instance '{found['name']}' "
                                f"(chardev {label}, pid {status['pid']}); stop it (fdmig stop --name "
                                f"{found['name']}), or choose another address")
    for spec in servers:
        if spec.kind == "unix" and handed.conflict(spec) is None and unix_listening(spec.path):
            raise SpecError(f"chardev {spec.id}: unix:{spec.path} is in use: another process listens on it; "
                            "stop it, or choose another path")


def _passed_names() -> set:
    """The names of the fds passed to us by socket activation: a chardev whose
    listener is among them (--fdstore) takes it up rather than listening."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return set()
    except ValueError:
        return set()
    return set(os.environ.get("LISTEN_FDNAMES", "").split(":"))


def _listening(status: dict):
    """The addresses an instance's server chardevs listen on, from its status."""
    from fdmig.spec import Addresses, parse_spec
    try:  # its relative paths are relative to its working directory
        cwd = os.readlink(f"/proc/{status['pid']}/cwd")
    except OSError:
        cwd = ""
    held = Addresses(cwd)
    for row in status.get("chardevs", []):
        if row.get("role") == "server" and row.get("spec") and row.get("state") in LISTENING:
            held.add(parse_spec(row["spec"]))
    return held


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
