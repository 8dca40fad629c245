"""Chardev SPECs: QEMU's `-chardev BACKEND,...` syntax and QEMU's chardev-add shape.

One ChardevSpec is the single description of a chardev; the command line, QMP's
chardev-add, `status` and the migration table all convert to and from it here, so
every validation rule lives in one place.
"""

import dataclasses
import difflib
import functools
import os
import re

from fdmig.errors import SpecError

# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
MAX_LABEL = 128
FRONTENDS = ("hold", "echo", "sink", "bridge", "service")
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_DIGITS_RE = re.compile(r"[0-9]+\Z")
FD_MAX = 2**31 - 1  # a C int
_BOOLS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}
_BOOL_KEYS = ("server", "wait", "nodelay", "support-local-migration", "local-incoming", "logappend", "append")
_KEYS = ("id", "path", "host", "port", "fd", "fdname", "server", "wait", "reconnect-ms",
         "nodelay", "support-local-migration", "local-incoming", "frontend", "bridge",
         "logfile", "logappend")
# QEMU's backends that hold an fd worth keeping (DESIGN "Other backends"), and
# the keys each takes beside _COMMON_KEYS: the SPEC's first word picks one.
BACKENDS = ("socket", "pty", "serial", "pipe", "udp", "file")
_BACKEND_ALIASES = {"tty": "serial"}
_COMMON_KEYS = ("id", "support-local-migration", "local-incoming", "frontend", "bridge", "logfile", "logappend")
_BACKEND_KEYS = {
    "pty": (),
    "serial": ("path",),
    "pipe": ("path",),
    "udp": ("host", "port", "localaddr", "localport"),
    "file": ("path", "append"),
}
# What a backend's fd can do: a file is written, never read.
_UNREAD = ("file",)
_DEVICE_KINDS = ("serial", "pipe", "file")  # opened by path: one chardev per path
# QEMU's older spellings, still met in command lines written for it: reconnect=S
# in seconds (renamed reconnect-ms in QEMU 9.2) and delay=off (nodelay=on). Taken
# into the current key; never written back, and not offered in messages.
_LEGACY_KEYS = {"reconnect": "reconnect-ms", "delay": "nodelay"}
_FLAG_KEYS = (*_BOOL_KEYS, "delay")  # what a key given alone may be
ADDRESS_KEYS = ("path", "host+port", "fd", "fdname")
# A chardev's states (fdmig.chardev.State), here so that what only names them
# (`status --wait`, completion) need not import the chardev machinery.
STATES = ("listening", "connecting", "connected", "disconnected", "awaiting-incoming",
          "migrating", "migrated", "closed")


@dataclasses.dataclass(frozen=True)
class ChardevSpec:
    id: str
    # A socket's address kind ("unix", "inet", "fd" or "fdname"), or the other
    # backend it is ("pty", "serial", "pipe", "udp", "file"): each names what
    # the chardev's fds are, which is what every check of them asks.
    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None
    fd: str | None = None  # an inherited fd number, or a name given with getfd
    fdname: str | None = None  # a LISTEN_FDNAMES name (systemd socket activation)
    server: bool = False
    wait: bool = False
    reconnect_ms: int = 0
    nodelay: bool = False
    support_local_migration: bool = False
    local_incoming: bool = False
    frontend: str = "hold"
    bridge: str | None = None
    logfile: str | None = None
    logappend: bool = False
    localaddr: str | None = None  # udp: the address its socket is bound to
    localport: int | None = None
    append: bool = False  # file: written on at its end, not truncated first

    @property
    def backend(self) -> str:
        return self.kind if self.kind in _BACKEND_KEYS else "socket"

    @property
    def address(self) -> str:
        """QEMU's query-chardev filename forms (the pty's path is the kernel's, known
        once it is open; a udp socket's local end after '@')."""
        kind = self.kind
        if kind == "pty":
            return f"pty:{self.path}" if self.path else "pty"
        if kind in ("serial", "pipe", "file"):
            return f"{kind}:{self.path}"
        if kind == "udp":
            local = f"@{bracketed(self.localaddr or '')}:{self.localport or 0}"
            return f"udp:{bracketed(self.host)}:{self.port}{local}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "inet":
            return f"tcp:{bracketed(self.host)}:{self.port}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        return f"fdname:{self.fdname}"

    @property
    def fd_is_number(self) -> bool:
        """fd=N names an inherited descriptor; fd=NAME one passed with getfd."""
        return self.kind == "fd" and self.fd.isdigit()

    @property
    def role(self) -> str | None:
        """A socket's role; None for the other backends, which have none."""
        if self.kind in _BACKEND_KEYS:
            return None
        return "server" if self.server else "client"

    @property
    def described(self) -> str:
        """Its role and address, as a log line names the chardev."""
        return f"{self.role} {self.address}" if self.role else self.address

    @property
    def reads(self) -> bool:
        """Whether its fd is ever read (a file is only written)."""
        return self.kind not in _UNREAD

    def to_dict(self) -> dict:
        """The SPEC as kebab-case keys with only what differs from the defaults."""
        return dict(self._dict)

    # Computed once: a status or a migration table of thousands of chardevs is
    # built inside the loop that serves them. The spec never changes.
    @functools.cached_property
    def _dict(self) -> dict:
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "kind" or value == field.default:
                continue
            out[field.name.replace("_", "-")] = value
        out["id"] = self.id
        if self.backend != "socket":
            out["backend"] = self.backend
        return out

    def to_spec_string(self) -> str:
        return self._spec_string

    @functools.cached_property
    def _spec_string(self) -> str:
        parts = [self.backend]
        for key, value in self._dict.items():
            if key == "backend" or key == "path" and self.kind == "pty":
                continue  # a pty's path is the kernel's, not a key a SPEC gives
            if isinstance(value, bool):
                value = "on" if value else "off"
            parts.append(f"{key}={str(value).replace(',', ',,')}")  # QEMU's escape for ','
        return ",".join(parts)

    def to_qmp(self) -> dict:
        """chardev-add arguments in QEMU's shape (fdmig's own members added to `data`)."""
        if self.backend != "socket":
            return _backend_qmp(self)
        if self.kind == "unix":
            addr = {"type": "unix", "data": {"path": self.path}}
        elif self.kind == "inet":
            addr = {"type": "inet", "data": {"host": self.host, "port": str(self.port)}}
        elif self.kind == "fd":
            addr = {"type": "fd", "data": {"str": self.fd}}
        else:
            addr = {"type": "fdname", "data": {"name": self.fdname}}
        data = {"addr": addr}
        for key, value in self.to_dict().items():
            if key not in ("id", "path", "host", "port", "fd", "fdname"):
                data[key] = value
        return {"id": self.id, "backend": {"type": "socket", "data": data}}


class FieldError(SpecError):
    """A SpecError about one key of one chardev: `chardev LABEL: KEY: problem`, or
    `chardev KEY: problem` while the chardev's label is not known."""

    def __init__(self, field: str, problem: str, label: str | None = None):
        self.field, self.problem, self.label = field, problem, label
        super().__init__(f"chardev {label}: {field}: {problem}" if label else f"chardev {field}: {problem}")

    def naming(self, label: str | None) -> "FieldError":
        """The same error naming its chardev `label` (unless it names one already)."""
        if self.label is not None or not label:
            return self
        return FieldError(self.field, self.problem, label)


def _fail(field: str, problem: str, label: str | None = None) -> FieldError:
    return FieldError(field, problem, label)


def _valid_label(value) -> str | None:
    return value if isinstance(value, str) and _ID_RE.match(value) and len(value) <= MAX_LABEL else None


def parse_bool(key: str, value: str) -> bool:
    try:
        return _BOOLS[value.lower()]
    except KeyError:
        raise _fail(key, f"'{value}' is not a boolean; accepted: on/off, true/false, yes/no") from None


def _parse_int(key: str, value, low: int, high: int) -> int:
    # ASCII digits only: str.isdigit() is true for '²', which int() refuses.
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _DIGITS_RE.match(value))):
        raise _fail(key, f"'{value}' is not a number; accepted: {low} to {high}")
    if isinstance(value, str) and len(value) > 20:  # int() refuses more than 4300 digits
        raise _fail(key, f"{value[:20]}... is out of range; accepted: {low} to {high}")
    number = int(value)
    if not low <= number <= high:
        raise _fail(key, f"{number} is out of range; accepted: {low} to {high}")
    return number


def parse_spec(text: str) -> ChardevSpec:
    """Parse QEMU's `-chardev` syntax. `socket` in front may be left out. An error
    names the chardev by its id= wherever in the SPEC that is."""
    items = _split_items(text)
    try:
        return _parse_items(text, items)
    except FieldError as exc:
        ids = [item[3:] for item in items if item.startswith("id=")]
        raise exc.naming(_valid_label(ids[0]) if ids else None) from None


def _parse_items(text: str, items: list[str]) -> ChardevSpec:
    backend = "socket"
    if items and items[0] and "=" not in items[0] and not _is_flag(items[0]):
        backend = _backend(items.pop(0))
    fields: dict[str, str] = {}
    for item in items:
        if not item:
            raise _fail("SPEC", f"empty item in '{text}'; expected key=value pairs separated by ','")
        key, eq, value = item.partition("=")
        if not eq:
            key, value = _flag_item(key, backend)
        if key not in _keys(backend) and (backend != "socket" or key not in _LEGACY_KEYS) \
                and (backend, key) != ("pty", "path"):  # refused in build_spec's words
            raise _fail(key, _unknown_key(key, backend=backend))
        if key in fields:
            raise _fail(key, "given twice")
        fields[key] = value
    if backend != "socket":
        fields["backend"] = backend
    return build_spec(fields, from_user=True)


def _is_flag(word: str) -> bool:
    return word in _KEYS or word in _FLAG_KEYS or (word.startswith("no") and word[2:] in _FLAG_KEYS)


def _backend(word: str) -> str:
    """The SPEC's first word: a backend's name (or an alias of one)."""
    backend = _BACKEND_ALIASES.get(word, word)
    if backend not in BACKENDS:
        near = difflib.get_close_matches(word, [*BACKENDS, *_BACKEND_ALIASES], n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise _fail("backend", f"'{word}' is not supported; {hint}accepted: {', '.join(BACKENDS)} (tty: serial)")
    return backend


def keys_of(word: str) -> tuple:
    """The keys a SPEC whose first word is `word` takes (a socket's if `word` is a
    key=value already, the first word left out)."""
    backend = _BACKEND_ALIASES.get(word, word)
    return _keys(backend if backend in BACKENDS else "socket")


def _keys(backend: str) -> tuple:
    if backend == "socket":
        return _KEYS
    keys = (*_COMMON_KEYS, *_BACKEND_KEYS[backend])
    return tuple(k for k in keys if not (backend in _UNREAD and k in ("logfile", "logappend")))


def _flag_item(item: str, backend: str = "socket") -> tuple[str, str]:
    """A key given alone, as QEMU's option parser takes it: a boolean key means
    on (`server` is server=on), the same with `no` in front off (`nowait` is
    wait=off). `nodelay` is a key of its own, so on, as QEMU makes it too."""
    keys = _keys(backend)
    flags = [key for key in _FLAG_KEYS if key in keys or backend == "socket"]
    if item in flags:
        return item, "on"
    if item.startswith("no") and item[2:] in flags:
        return item[2:], "off"
    if item in keys or backend == "socket" and item in _LEGACY_KEYS:
        raise _fail(item, "needs a value (key=value)")
    raise _fail(item, _unknown_key(item, [*flags, *(f"no{key}" for key in flags)], backend))


def _split_items(text: str) -> list[str]:
    """Split at ',' as QEMU's option parser does: ',,' is a literal ',' in a value."""
    items, current, i = [], [], 0
    while i < len(text):
        if text[i] != ",":
            current.append(text[i])
            i += 1
        elif text.startswith(",,", i):
            current.append(",")
            i += 2
        else:
            items.append("".join(current))
            current = []
            i += 1
    items.append("".join(current))
    return items


def _unknown_key(key: str, spellings=(), backend: str = "socket") -> str:
    """The message for an unknown key: the nearest known one (or a flag's
    spelling, for a key given alone) suggested, then every key accepted."""
    keys = _keys(backend)
    near = difflib.get_close_matches(key, [*keys, *spellings], n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    if key in BACKENDS or key in _BACKEND_ALIASES:
        return f"'{key}' is a backend; it goes first: {key},id=LABEL,..."
    if backend != "socket":
        if key in _KEYS or key in _BACKEND_KEYS["udp"] or key == "append":
            return f"not a key of a {backend} chardev; accepted: {', '.join(keys)}"
        return f"unknown key for a {backend} chardev; {hint}accepted: {', '.join(keys)}"
    return f"unknown key; {hint}accepted: {', '.join(keys)}"


def build_spec(fields: dict, from_user: bool = False) -> ChardevSpec:
    """Validate kebab-case fields (strings from a SPEC, or JSON values) into a spec.
    `from_user`: a SPEC or chardev-add, not a migration's table (which names the
    pty a chardev holds)."""
    try:
        backend = fields.get("backend", "socket")
        if backend == "socket":
            fields = {k: v for k, v in fields.items() if k != "backend"}
        else:
            if not isinstance(backend, str):
                raise _fail("backend", f"'{backend}' is not supported; accepted: {', '.join(BACKENDS)}")
            return _build_other(_backend(backend), fields, from_user)
        return _build(fields)
    except FieldError as exc:
        raise exc.naming(_valid_label(fields.get("id"))) from None


def _build_other(backend: str, fields: dict, from_user: bool) -> ChardevSpec:
    """A pty, serial, pipe, udp or file chardev: its keys, then what all share."""
    keys = _keys(backend)
    for key in fields:
        if key == "path" and backend == "pty":
            if from_user:
                raise _fail("path", "the kernel names a pty's slave when it opens (status shows it); "
                                    "accepted: pty,id=LABEL")
        elif key != "backend" and key not in keys:
            raise _fail(key, _unknown_key(key, backend=backend))
    label = _label(fields)
    flags = _flags(fields)
    spec = dict(id=label, kind=backend, support_local_migration=flags["support_local_migration"],
                local_incoming=flags["local_incoming"], logappend=flags["logappend"])
    if backend == "pty":
        if fields.get("path") not in (None, ""):
            spec["path"] = _device_path(fields["path"])
    elif backend in ("serial", "pipe", "file"):
        if fields.get("path") in (None, ""):
            raise _fail("path", f"missing; a {backend} chardev needs path=")
        spec["path"] = _device_path(fields["path"])
        spec["append"] = _flag(fields, "append")
    else:
        spec.update(_udp_address(fields))
    spec.update(_frontend(fields, label))
    if backend in _UNREAD and spec["frontend"] in ("echo", "sink"):
        raise _fail("frontend", f"a {backend} chardev is written, never read, so it has nothing to "
                                f"{spec['frontend']}; accepted: hold, bridge=LABEL, service")
    spec.update(_logfile(fields, spec["logappend"]))
    return ChardevSpec(**spec)


def _device_path(value) -> str:
    path = str(value)
    if "\0" in path:
        raise _fail("path", "contains a NUL byte")
    return path


def _udp_address(fields: dict) -> dict:
    """QEMU's udp keys: the peer host= (localhost if not given) and port=, the
    local localaddr= and localport= (any address, a fresh port if not given)."""
    host = str(fields.get("host") or "localhost")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if fields.get("port") in (None, ""):
        raise _fail("port", "missing; a udp chardev sends to host= and port=")
    out = {"host": host, "port": _parse_int("port", fields["port"], 1, 65535)}
    localaddr = fields.get("localaddr")
    if localaddr not in (None, ""):
        localaddr = str(localaddr)
        out["localaddr"] = localaddr[1:-1] if localaddr.startswith("[") and localaddr.endswith("]") else localaddr
    if fields.get("localport") not in (None, "", 0, "0"):
        out["localport"] = _parse_int("localport", fields["localport"], 0, 65535)
    return out


def two_fifos(path: str) -> bool:
    """Whether a pipe chardev at `path` is two FIFOs, P.in read and P.out
    written (both exist, as QEMU looks for them), not P both ways."""
    return os.path.exists(f"{path}.in") and os.path.exists(f"{path}.out")


def bracketed(host: str) -> str:
    """A host as an address names it: an IPv6 one in brackets."""
    return f"[{host}]" if ":" in host else host


def _backend_qmp(spec: ChardevSpec) -> dict:
    """chardev-add arguments in QEMU's shape for a backend other than socket."""
    kind = spec.kind
    if kind == "pty":
        data = {}
    elif kind in ("serial", "pipe"):
        data = {"device": spec.path}
    elif kind == "file":
        data = {"out": spec.path}
    else:
        data = {"remote": {"type": "inet", "data": {"host": spec.host, "port": str(spec.port)}}}
        if spec.localaddr or spec.localport:
            data["local"] = {"type": "inet", "data": {"host": spec.localaddr or "", "port": str(spec.localport or 0)}}
    for key, value in spec.to_dict().items():
        if key not in ("id", "backend", "path", "host", "port", "localaddr", "localport"):
            data[key] = value
    return {"id": spec.id, "backend": {"type": kind, "data": data}}


def _build(fields: dict) -> ChardevSpec:
    # The checks run in this order, so that a SPEC with several mistakes is
    # always told about the same one first.
    _check_keys(fields)
    _one_spelling(fields)
    label = _label(fields)
    kind = _address_kind(fields)
    spec = dict(id=label, kind=kind, **_flags(fields))
    spec.update(_address(kind, fields, spec["server"]))
    spec.update(_reconnect_and_wait(fields, spec["server"], spec["wait"]))
    spec.update(_frontend(fields, label))
    spec.update(_logfile(fields, spec["logappend"]))
    return ChardevSpec(**spec)


def _check_keys(fields: dict) -> None:
    for key in fields:
        if key not in _KEYS and key not in _LEGACY_KEYS:
            raise _fail(key, _unknown_key(key))


def _one_spelling(fields: dict) -> None:
    """A key and QEMU's older spelling of it (_LEGACY_KEYS) are not both given."""
    for old, new in _LEGACY_KEYS.items():
        if old in fields and new in fields:
            raise _fail(old, f"given with {new}=, which replaced it; accepted: one of them")


def _label(fields: dict) -> str:
    label = fields.get("id")
    if label is None or label == "":
        raise _fail("id", "missing; every chardev needs id=LABEL")
    label = str(label)
    check_label(label)
    return label


def _address_kind(fields: dict) -> str:
    """"unix", "inet", "fd" or "fdname": which one address key is given."""
    given = [k for k in ("path", "host", "fd", "fdname") if fields.get(k) not in (None, "")]
    if "port" in fields and "host" not in given:
        raise _fail("port", "given without host=; TCP needs host= and port=")
    if len(given) != 1:
        what = "none given" if not given else f"{' and '.join(given)} given"
        raise _fail("address", f"exactly one of path=, host=+port=, fd=, fdname= is needed; {what}")
    return {"path": "unix", "host": "inet", "fd": "fd", "fdname": "fdname"}[given[0]]


def _flags(fields: dict) -> dict:
    """The boolean keys as ChardevSpec arguments."""
    # QEMU's delay=off is nodelay=on.
    nodelay = not _flag(fields, "delay", True) if "delay" in fields else _flag(fields, "nodelay")
    return dict(server=_flag(fields, "server"), wait=_flag(fields, "wait"), nodelay=nodelay,
                support_local_migration=_flag(fields, "support-local-migration"),
                local_incoming=_flag(fields, "local-incoming"), logappend=_flag(fields, "logappend"))


def _flag(fields: dict, key: str, default: bool = False) -> bool:
    # A bool from JSON, or a string from a SPEC; anything else is refused in
    # parse_bool's words.
    value = fields.get(key, default)
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise _fail(key, f"'{value}' is not a boolean; accepted: on/off, true/false, yes/no")
    return parse_bool(key, value)


def _address(kind: str, fields: dict, server: bool) -> dict:
    if kind == "unix":
        return {"path": _unix_path(fields["path"])}
    if kind == "inet":
        return _inet_address(fields, server)
    if kind == "fd":
        return {"fd": _fd(fields["fd"])}
    return {"fdname": str(fields["fdname"])}


def _unix_path(value) -> str:
    path = str(value)
    if len(path.encode()) > UNIX_PATH_MAX:
        raise _fail("path", f"{len(path.encode())} bytes is too long for a unix socket; "
                            f"accepted: at most {UNIX_PATH_MAX} bytes")
    if "\0" in path:
        raise _fail("path", "contains a NUL byte")
    return path


def _inet_address(fields: dict, server: bool) -> dict:
    host = str(fields["host"])
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "port" not in fields:
        raise _fail("port", "missing; TCP needs host= and port=")
    # Port 0 asks the kernel for a fresh port: a listener can take one, a client cannot reach it.
    return {"host": host, "port": _parse_int("port", fields["port"], 0 if server else 1, 65535)}


def _fd(value) -> str:
    fd = str(value)
    if _DIGITS_RE.match(fd):
        return str(_parse_int("fd", fd, 0, FD_MAX))
    if not _ID_RE.match(fd):
        raise _fail("fd", f"'{fd}' is neither a descriptor number nor a getfd name")
    return fd


def _reconnect_and_wait(fields: dict, server: bool, wait: bool) -> dict:
    """reconnect-ms= and wait=, each of which belongs to one role only."""
    out = {}
    if "reconnect-ms" in fields:
        key, out["reconnect_ms"] = "reconnect-ms", _parse_int("reconnect-ms", fields["reconnect-ms"], 0, 86_400_000)
    elif "reconnect" in fields:  # QEMU's older key, in seconds
        key, out["reconnect_ms"] = "reconnect", _parse_int("reconnect", fields["reconnect"], 0, 86_400) * 1000
    if out.get("reconnect_ms") and server:
        raise _fail(key, "only a client reconnects; not accepted with server=on")
    if wait and not server:
        raise _fail("wait", "only a server waits for its first peer; accepted with server=on")
    return out


def _frontend(fields: dict, label: str) -> dict:
    """frontend= and bridge=: bridge=LABEL alone implies frontend=bridge."""
    frontend = fields.get("frontend", "hold")
    bridge = fields.get("bridge")
    if frontend not in FRONTENDS:
        raise _fail("frontend", f"'{frontend}' is not known; accepted: {', '.join(FRONTENDS)}")
    if bridge in (None, ""):
        if frontend == "bridge":
            raise _fail("frontend", "frontend=bridge needs bridge=LABEL")
        return {"frontend": frontend}
    bridge = str(bridge)
    check_label(bridge, field="bridge")
    if frontend not in ("hold", "bridge") or "frontend" in fields and frontend != "bridge":
        raise _fail("bridge", f"bridge= relays to another chardev; not accepted with frontend={frontend}")
    if bridge == label:
        raise _fail("bridge", "a chardev cannot bridge to itself; accepted: another chardev's id")
    return {"frontend": "bridge", "bridge": bridge}


def _logfile(fields: dict, logappend: bool) -> dict:
    if fields.get("logfile") not in (None, ""):
        return {"logfile": str(fields["logfile"])}
    if logappend:
        raise _fail("logappend", "needs logfile=PATH")
    return {}


def check_label(label: str, field: str = "id") -> None:
    if not _ID_RE.match(label) or len(label) > MAX_LABEL:
        raise _fail(field, f"'{label}' is not a valid id; accepted: a letter, then letters, "
                           f"digits, '-', '.', '_' (at most {MAX_LABEL} characters)")


def from_dict(data: dict) -> ChardevSpec:
    return build_spec(dict(data))


def from_qmp(arguments: dict) -> ChardevSpec:
    """chardev-add's QEMU shape back to a spec. Raises SpecError with QMP-ish wording."""
    if not isinstance(arguments, dict):
        raise SpecError("chardev-add: arguments must be an object")
    backend = arguments.get("backend")
    if not isinstance(backend, dict):
        raise SpecError("chardev-add: Parameter 'backend' is missing")
    kind = _BACKEND_ALIASES.get(backend.get("type"), backend.get("type"))
    if kind not in BACKENDS:
        raise SpecError(f"chardev-add: backend type '{backend.get('type')}' is not supported; "
                        f"accepted: {', '.join(BACKENDS)}")
    if kind != "socket":
        return _from_qmp_other(arguments.get("id"), kind, backend.get("data", {}))
    data = backend.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("addr"), dict):
        raise SpecError("chardev-add: Parameter 'backend.data.addr' is missing")
    addr = data["addr"]
    addr_data = addr.get("data")
    if not isinstance(addr_data, dict):
        raise SpecError("chardev-add: Parameter 'backend.data.addr.data' is missing")
    fields = {k: v for k, v in data.items() if k != "addr"}
    kind = addr.get("type")
    if kind == "unix":
        fields["path"] = addr_data.get("path")
    elif kind == "inet":
        fields["host"] = addr_data.get("host")
        fields["port"] = addr_data.get("port")
    elif kind == "fd":
        fields["fd"] = addr_data.get("str")
    elif kind == "fdname":
        fields["fdname"] = addr_data.get("name")
    else:
        raise SpecError(f"chardev-add: address type '{kind}' is not supported; accepted: unix, inet, fd, fdname")
    for key, value in fields.items():
        if value is not None and not isinstance(value, (str, int, bool)):
            raise SpecError(f"chardev-add: Invalid parameter type for '{key}'")
    fields["id"] = arguments.get("id")
    if not isinstance(fields["id"], str):
        raise SpecError("chardev-add: Parameter 'id' is missing or not a string")
    return build_spec({k: v for k, v in fields.items() if v is not None})


def _from_qmp_other(label, kind: str, data) -> ChardevSpec:
    """chardev-add of a pty, serial, pipe, udp or file chardev, in QEMU's shapes
    (ChardevHostdev's device, ChardevFile's out, ChardevUdp's remote and local)."""
    if not isinstance(data, dict):
        raise SpecError("chardev-add: Parameter 'backend.data' must be an object")
    fields = {k: v for k, v in data.items() if k not in ("device", "out", "remote", "local")}
    if kind in ("serial", "pipe"):
        fields["path"] = data.get("device")
    elif kind == "file":
        fields["path"] = data.get("out")
    elif kind == "udp":
        for member, host, port in (("remote", "host", "port"), ("local", "localaddr", "localport")):
            addr = data.get(member)
            if addr is None and member == "local":
                continue
            if not isinstance(addr, dict) or not isinstance(addr.get("data"), dict) or addr.get("type") != "inet":
                raise SpecError(f"chardev-add: Parameter 'backend.data.{member}' must be an inet address")
            fields[host], fields[port] = addr["data"].get("host"), addr["data"].get("port")
    for key, value in fields.items():
        if value is not None and not isinstance(value, (str, int, bool)):
            raise SpecError(f"chardev-add: Invalid parameter type for '{key}'")
    if not isinstance(label, str):
        raise SpecError("chardev-add: Parameter 'id' is missing or not a string")
    fields.update(id=label, backend=kind)
    return build_spec({k: v for k, v in fields.items() if v is not None}, from_user=True)


def check_set(specs, cwd: str | None = None) -> None:
    """Rules across chardevs: unique labels, no two on one address (Addresses),
    bridge targets present and free. `cwd`: what relative paths are relative to."""
    check = SetCheck(cwd)
    check.add(specs)
    check.done()


class SetCheck:
    """check_set a piece at a time, for one who checks thousands behind its
    serving (a migration's target, paced): add() each piece, then done()."""

    def __init__(self, cwd: str | None = None):
        self._seen: dict[str, ChardevSpec] = {}
        self._addresses = Addresses(cwd)

    def add(self, specs) -> None:
        for spec in specs:
            if spec.id in self._seen:
                raise duplicate_label(spec.id)
            self._addresses.check(spec)
            self._addresses.add(spec)
            self._seen[spec.id] = spec

    def done(self) -> None:
        bridged: set[str] = set()
        for spec in self._seen.values():
            if spec.bridge is not None:
                check_bridge(spec, self._seen, bridged)
                bridged.add(spec.bridge)


def partners_first(specs) -> list:
    """The specs in an order that opens each bridge's partner before the bridge."""
    return sorted(specs, key=lambda spec: spec.bridge is not None)


def duplicate_label(label: str) -> SpecError:
    return _fail("id", f"duplicate label '{label}'; each chardev needs its own id", label)


def check_bridge(spec: ChardevSpec, by_label, bridged) -> None:
    """`spec.bridge` must name a chardev of `by_label` with frontend hold that no
    other chardev (in `bridged`) relays to already."""
    other = by_label.get(spec.bridge)
    if other is None:
        names = sorted(label for label in by_label if label != spec.id)
        raise _fail("bridge", f"'{spec.bridge}' names no chardev; accepted: one of "
                              f"{', '.join(names[:20]) or '(none)'}", spec.id)
    if other.frontend not in ("hold", "bridge") or other.bridge not in (None, spec.id):
        raise _fail("bridge", f"'{spec.bridge}' already has frontend {other.frontend}; "
                              "a bridge needs a chardev with frontend=hold", spec.id)
    if spec.bridge in bridged:
        raise _fail("bridge", f"'{spec.bridge}' is bridged by more than one chardev", spec.id)


def check_incoming(spec: ChardevSpec, incoming: bool) -> None:
    """local-incoming=on belongs to an instance that waits for a migration."""
    if spec.local_incoming and not incoming:
        raise _fail("local-incoming", "only an incoming instance (only migrate-in starts one) waits for a "
                                      "migrated fd; this instance is running", spec.id)


def check_fits(spec: ChardevSpec, held: dict, incoming: bool, addresses: "Addresses | None" = None) -> None:
    """Rules for adding `spec` to an instance holding `held` (label -> spec):
    a new label, an address no held chardev uses, local-incoming only on an
    incoming instance, a free bridge partner. `addresses`: the index of what
    `held` uses, kept by the instance (else built here from `held`'s specs)."""
    if spec.id in held:
        raise duplicate_label(spec.id)
    if addresses is None:
        addresses = Addresses()
        for other in held.values():
            addresses.add(other)
    addresses.check(spec)
    check_incoming(spec, incoming)
    if spec.bridge is not None:
        check_bridge(spec, held, {s.bridge for s in held.values() if s.bridge})


# ----- addresses: what two chardevs of one instance may not share ----------------

class Addresses:
    """The unix paths and TCP listening addresses of an instance's chardevs, by
    label, for the rule that two of them may not share one: a second listener
    would leave the first listening where nobody reaches it, and its close would
    unlink the first one's socket file. Conflicts, as the kernel sees them:
    - a unix path a server listens on is that server's alone: neither a second
      server nor a client of the same instance (which would take the server's one
      peer) may use it. Clients may share a path: several connections to one
      service, as QEMU allows.
    - two servers on one TCP port whose hosts overlap: the same address (numeric
      forms compared as addresses, `localhost` as the 127.0.0.1 an IPv4 socket
      binds), or either the wildcard `0.0.0.0` (every IPv4 address, and every
      host name: those bind IPv4) or `::` (every address, IPv4 too). Port 0 is a
      fresh port each time and never conflicts. Clients are not checked: where a
      TCP name leads is the resolver's business, not a rule of the SPEC.
    An index, not a scan: an instance starting with thousands of chardevs checks
    each one with a few dict lookups.
    """

    def __init__(self, cwd: str | None = None):
        # Relative paths are relative to the process that binds them.
        if cwd is None:
            try:
                cwd = os.getcwd()
            except OSError:  # a working directory since removed: compare as written
                cwd = ""
        self._cwd = cwd
        self._servers: dict[str, str] = {}  # unix path -> label
        self._clients: dict[str, dict[str, None]] = {}  # unix path -> labels, in order
        self._tcp: dict[int, dict[str, str]] = {}  # port -> host -> label
        self._devices: dict[str, str] = {}  # a file a serial, pipe or file chardev opens -> label
        self._opened: dict[str, list[str]] = {}  # label -> the files it was added with

    def _path(self, path: str) -> str:
        path = os.path.normpath(os.path.join(self._cwd, path))
        # POSIX lets '//' mean something else; on Linux it is '/'.
        return "/" + path.lstrip("/") if path.startswith("//") else path

    def _files(self, spec: ChardevSpec) -> list[str]:
        """The files a serial, pipe or file chardev opens: a pipe's P.in and P.out
        where both exist (QEMU's rule), else its path."""
        path = self._path(spec.path)
        if spec.kind == "pipe" and two_fifos(path):
            return [f"{path}.in", f"{path}.out"]
        return [path]

    @staticmethod
    def _spec(item) -> ChardevSpec:
        return getattr(item, "spec", item)  # a ChardevSpec, or a chardev holding one

    def conflict(self, spec: ChardevSpec) -> tuple[str, str] | None:
        """(label, address) of a chardev held that `spec` may not share an address
        with, or None."""
        if spec.kind in _DEVICE_KINDS:
            label = next(filter(None, map(self._devices.get, self._files(spec))), None)
            return None if label is None else (label, spec.address)
        if spec.kind == "unix":
            path = self._path(spec.path)
            label = self._servers.get(path)
            if label is None and spec.server:
                label = next(iter(self._clients.get(path, ())), None)
            return None if label is None else (label, f"unix:{spec.path}")
        if spec.kind == "inet" and spec.server and spec.port:
            bucket = self._tcp.get(spec.port)
            if not bucket:
                return None
            host = _listening_host(spec.host)
            label = bucket.get(host) or bucket.get("::")
            if label is None and ":" not in host:
                label = bucket.get("0.0.0.0")
            if label is None and host in ("::", "0.0.0.0"):
                label = next((other for h, other in bucket.items() if host == "::" or ":" not in h), None)
            return None if label is None else (label, spec.address)
        return None

    def check(self, spec: ChardevSpec) -> None:
        found = self.conflict(spec)
        if found is None:
            return
        label, address = found
        if spec.kind in _DEVICE_KINDS:
            raise _fail("path", f"{spec.path} is chardev {label}'s already; two chardevs of one instance "
                                "never open one device, FIFO or file (both would read or write it)", spec.id)
        if spec.kind == "unix":
            raise _fail("path", f"{address} is chardev {label}'s already; two chardevs of one instance share "
                                "a unix path only if both are clients (server=off)", spec.id)
        raise _fail("host+port", f"{address} overlaps the listening address of chardev {label}; accepted: "
                                 "a host and port no other server of this instance listens on", spec.id)

    def add(self, item) -> None:
        spec = self._spec(item)
        if spec.kind in _DEVICE_KINDS:
            self._opened[spec.id] = files = self._files(spec)
            for path in files:
                self._devices.setdefault(path, spec.id)
        elif spec.kind == "unix":
            path = self._path(spec.path)
            if spec.server:
                self._servers.setdefault(path, spec.id)
            else:
                self._clients.setdefault(path, {})[spec.id] = None
        elif spec.kind == "inet" and spec.server and spec.port:
            self._tcp.setdefault(spec.port, {}).setdefault(_listening_host(spec.host), spec.id)

    def remove(self, item) -> None:
        spec = self._spec(item)
        if spec.kind in _DEVICE_KINDS:
            for path in self._opened.pop(spec.id, ()):
                if self._devices.get(path) == spec.id:
                    del self._devices[path]
        elif spec.kind == "unix":
            path = self._path(spec.path)
            if spec.server:
                if self._servers.get(path) == spec.id:
                    del self._servers[path]
            else:
                labels = self._clients.get(path)
                if labels is not None:
                    labels.pop(spec.id, None)
                    if not labels:
                        del self._clients[path]
        elif spec.kind == "inet" and spec.server and spec.port:
            bucket = self._tcp.get(spec.port)
            host = _listening_host(spec.host)
            if bucket is not None and bucket.get(host) == spec.id:
                del bucket[host]
                if not bucket:
                    del self._tcp[spec.port]


def _listening_host(host: str) -> str:
    """`host` in the form two equal listening addresses share (no name is resolved)."""
    import ipaddress
    host = host.lower()
    if host == "localhost":
        return "127.0.0.1"  # what an IPv4 socket (a host without ':') binds
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class Held(dict):
    """label -> chardev (anything with a `.spec`), keeping `addresses`, the index
    check_fits needs, in step with every change."""

    def __init__(self):
        super().__init__()
        self.addresses = Addresses()

    def __setitem__(self, label, chardev) -> None:
        if label in self:
            self.addresses.remove(self[label])
        super().__setitem__(label, chardev)
        self.addresses.add(chardev)

    def __delitem__(self, label) -> None:
        self.addresses.remove(self[label])
        super().__delitem__(label)

    _MISSING = object()

    def pop(self, label, default=_MISSING):
        if label in self:
            self.addresses.remove(self[label])
        return super().pop(label) if default is self._MISSING else super().pop(label, default)

    def popitem(self):
        label, chardev = super().popitem()
        self.addresses.remove(chardev)
        return label, chardev

    def setdefault(self, label, chardev=None):
        if label not in self:
            self[label] = chardev
        return self[label]

    def update(self, *args, **kwargs) -> None:
        for label, chardev in dict(*args, **kwargs).items():
            self[label] = chardev

    def clear(self) -> None:
        super().clear()
        self.addresses = Addresses()
