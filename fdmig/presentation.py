"""How a chardev shows itself: its row in `status` and its entry in QMP's
query-chardev. One row shape for held chardevs and for those a waiting target
will hold."""

import json
import time
from json.encoder import encode_basestring as _quote  # the C one: a JSON string, quoted


def utc_iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def status_row(spec, state: str, frontend: str) -> dict:
    """A chardev's row in `status`, with nothing live in it yet (no fd, peer, bytes):
    what a waiting target shows for the chardevs it will hold."""
    return {"label": spec.id, "address": spec.address, "role": spec.role, "state": state,
            "support-local-migration": spec.support_local_migration, "local-incoming": spec.local_incoming,
            "frontend": frontend, "fd": None, "peer": None, "peer-pid": None, "peer-process": None,
            "rx-bytes": 0, "tx-bytes": 0, "connected-since": None, "migrations": 0,
            "spec": spec.to_spec_string()}


def pending_row(spec) -> dict:
    """A status row for a chardev a waiting target will hold."""
    return status_row(spec, "awaiting-incoming" if spec.local_incoming else "closed",
                      f"bridge={spec.bridge}" if spec.bridge else spec.frontend)


def qmp_chardev(chardev) -> dict:
    """QEMU's query-chardev entry; the filename is `unix:P,server=on`, prefixed
    `disconnected:` when there is no peer."""
    name = chardev.spec.address
    if chardev.spec.server:
        name += ",server=on"
    if chardev.conn is None:
        name = "disconnected:" + name
    return {"label": chardev.label, "filename": name, "frontend-open": chardev.conn is not None}


def row_json(chardev) -> str:
    """A chardev's row in `status`, as JSON text: status_row() with its live
    fields. What the spec fixes is encoded once per chardev and kept (a status
    of thousands is built while their peers wait), only what changes each time."""
    fixed = chardev.row_parts
    if fixed is None:
        fixed = chardev.row_parts = _fixed_parts(chardev)
    head, middle, tail = fixed
    peer, pid, process = chardev.peer or (None, None, None)
    since = chardev.connected_since
    fd = chardev.fd
    return (f"{head}{_quote(chardev.state.value)}{middle}{'null' if fd is None else fd}, \"peer\": "
            f"{'null' if peer is None else _quote(peer)}, \"peer-pid\": {'null' if pid is None else pid}, "
            f"\"peer-process\": {'null' if process is None else _quote(process)}, "
            f"\"rx-bytes\": {chardev.rx_bytes}, \"tx-bytes\": {chardev.tx_bytes}, "
            f"\"connected-since\": {_quote(utc_iso(since)) if since else 'null'}, "
            f"\"migrations\": {chardev.migrations}{tail}")


def _fixed_parts(chardev) -> tuple[str, str, str]:
    """The JSON of a row around its live fields: before the state, between the
    state and the fd, and after the migrations count."""
    frontend = chardev.frontend.name
    if frontend == "bridge":
        frontend = f"bridge={chardev.frontend.partner.label}"
    entry = status_row(chardev.spec, "", frontend)
    text = json.dumps(entry, separators=(", ", ": "))
    head = text[: text.index('"state": ') + len('"state": ')]
    start = text.index(', "support-local-migration": ')
    middle = text[start: text.index('"fd": ') + len('"fd": ')]
    tail = text[text.index(', "spec": '):]
    return head, middle, tail
