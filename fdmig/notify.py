"""sd_notify(3) messages as systemd's manager receives them, as a sans-IO codec:
bytes in, a Message out. The notify socket (fdmig.service) moves the datagrams,
their fds and their sender's credentials; this decides what a datagram says.

A message is newline-separated KEY=VALUE assignments, UTF-8, in one datagram of
at most MAX_MESSAGE bytes (systemd's NOTIFY_BUFFER_MAX). Keys fdmig does not act
on are ignored, as systemd ignores them; so is a line that is not an assignment
or not UTF-8, but it is named in `ignored`, for the log."""

import dataclasses

MAX_MESSAGE = 4096
MAX_FDNAME = 255
DEFAULT_FDNAME = "stored"


@dataclasses.dataclass(frozen=True)
class Message:
    ready: bool = False  # READY=1
    reloading: bool = False  # RELOADING=1
    stopping: bool = False  # STOPPING=1
    status: str | None = None  # STATUS=
    mainpid: int | None = None  # MAINPID=
    barrier: bool = False  # BARRIER=1: its fd is closed, which is the answer
    fdstore: bool = False  # FDSTORE=1
    fdstore_remove: bool = False  # FDSTOREREMOVE=1
    fdname: str | None = None  # FDNAME=, as sent (check it with fdname_problem)
    fdpoll: bool = True  # FDPOLL=0 turns it off
    ignored: tuple[str, ...] = ()  # what could not be taken, for the log


def fdname_problem(name: str) -> str | None:
    """Why `name` cannot name a stored fd, or None: 1 to 255 characters, none of
    them a control character or ':' (LISTEN_FDNAMES separates names with ':')."""
    if not 1 <= len(name) <= MAX_FDNAME:
        return f"FDNAME of {len(name)} characters; accepted: 1 to {MAX_FDNAME}"
    if ":" in name:
        return f"FDNAME {name[:40]!r} holds ':'; accepted: no ':' and no control characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"FDNAME {name[:40]!r} holds a control character; accepted: no ':' and no control characters"
    return None


def parse(data: bytes) -> Message:
    fields: dict = {}
    ignored = []
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            ignored.append("a line that is not UTF-8")
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            ignored.append(f"{line[:40]!r}, not an assignment")
            continue
        fields[key] = value
    mainpid = None
    if "MAINPID" in fields:
        text = fields["MAINPID"]
        if text.isdigit() and int(text) > 0:
            mainpid = int(text)
        else:
            ignored.append(f"MAINPID={text[:20]!r}, not a process id")
    return Message(
        ready=fields.get("READY") == "1",
        reloading=fields.get("RELOADING") == "1",
        stopping=fields.get("STOPPING") == "1",
        status=fields.get("STATUS"),
        mainpid=mainpid,
        barrier=fields.get("BARRIER") == "1",
        fdstore=fields.get("FDSTORE") == "1",
        fdstore_remove=fields.get("FDSTOREREMOVE") == "1",
        fdname=fields.get("FDNAME"),
        fdpoll=fields.get("FDPOLL") != "0",
        ignored=tuple(ignored),
    )
