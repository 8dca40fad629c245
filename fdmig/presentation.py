"""How a chardev shows itself: its row in `status` and its entry in QMP's
query-chardev. One row shape for held chardevs and for those a waiting target
will hold."""

import time


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


def row(chardev) -> dict:
    peer, pid, process = chardev.peer or (None, None, None)
    frontend = chardev.frontend.name
    if frontend == "bridge":
        frontend = f"bridge={chardev.frontend.partner.label}"
    entry = status_row(chardev.spec, chardev.state.value, frontend)
    entry.update({"fd": chardev.fd, "peer": peer, "peer-pid": pid, "peer-process": process,
                  "rx-bytes": chardev.rx_bytes, "tx-bytes": chardev.tx_bytes,
                  "connected-since": utc_iso(chardev.connected_since) if chardev.connected_since else None,
                  "migrations": chardev.migrations})
    return entry


def qmp_chardev(chardev) -> dict:
    """QEMU's query-chardev entry; the filename is `unix:P,server=on`, prefixed
    `disconnected:` when there is no peer."""
    name = chardev.spec.address
    if chardev.spec.server:
        name += ",server=on"
    if chardev.conn is None:
        name = "disconnected:" + name
    return {"label": chardev.label, "filename": name, "frontend-open": chardev.conn is not None}
