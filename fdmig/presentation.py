"""How a chardev shows itself: its row in `status` and its entry in QMP's
query-chardev. One row shape for held chardevs and for those a waiting target
will hold."""

import json
import operator
import time
from json.encoder import encode_basestring as _quote  # the C one: a JSON string, quoted


def utc_iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def status_row(spec, state: str, frontend: str) -> dict:
    """A chardev's row in `status`, with nothing live in it yet (no fd, peer, bytes):
    what a waiting target shows for the chardevs it will hold."""
    return {"label": spec.id, "backend": spec.backend, "address": spec.address, "role": spec.role, "state": state,
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
    if chardev.spec.server and chardev.stream:
        name += ",server=on"
    if chardev.conn is None:
        name = "disconnected:" + name
    return {"label": chardev.label, "filename": name, "frontend-open": chardev.conn is not None}


# What a row shows that changes with a connection or a migration, not with each
# byte: a row keeps its JSON around the byte counts until one of these changes.
_LIVE = operator.attrgetter("state", "fd", "peer", "connected_since", "migrations")


def row_json(chardev) -> str:
    """A chardev's row in `status`, as JSON text: status_row() with its live
    fields. A status of thousands is built while their peers wait, so all but the
    byte counts is kept, and encoded again only when it changes: a row of a
    streaming chardev is two numbers put in."""
    live = _LIVE(chardev)
    parts = chardev.row_parts
    if parts is None or parts[0] != live:
        if chardev.row_frame is None:
            frame_row(chardev)
        parts = chardev.row_parts = (live, *_live_parts(chardev.row_frame, live))
    return f"{parts[1]}{chardev.rx_bytes}, \"tx-bytes\": {chardev.tx_bytes}{parts[2]}"


def frame_row(chardev) -> None:
    """Encode the JSON of a chardev's row around its live fields, which its spec
    and frontend fix: once they are set, not in the first status (while its peer,
    and thousands of others, wait)."""
    frontend = chardev.frontend.name
    if frontend == "bridge":
        frontend = f"bridge={chardev.frontend.partner.label}"
    text = json.dumps(status_row(chardev.spec, "", frontend), separators=(", ", ": "))
    head = text[: text.index('"state": ') + len('"state": ')]
    start = text.index(', "support-local-migration": ')
    middle = text[start: text.index('"fd": ') + len('"fd": ')]
    tail = text[text.index(', "spec": '):]
    chardev.row_frame, chardev.row_parts = (head, middle, tail), None


def forget_row(chardev) -> None:
    """The row's JSON is to be framed again (by frame_row, or the next status)."""
    chardev.row_frame = chardev.row_parts = None


def _live_parts(frame, live) -> tuple[str, str]:
    """A row's JSON before its rx-bytes count and after its tx-bytes count."""
    head, middle, tail = frame
    state, fd, peer, since, migrations = live
    peer, pid, process = peer or (None, None, None)
    return (f"{head}{_quote(state.value)}{middle}{'null' if fd is None else fd}, \"peer\": "
            f"{'null' if peer is None else _quote(peer)}, \"peer-pid\": {'null' if pid is None else pid}, "
            f"\"peer-process\": {'null' if process is None else _quote(process)}, \"rx-bytes\": ",
            f", \"connected-since\": {_quote(utc_iso(since)) if since else 'null'}, "
            f"\"migrations\": {migrations}{tail}")
