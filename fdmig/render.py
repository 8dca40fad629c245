"""Rendering of status: one data path (the x-fdmig-status object) feeds the rich
table on a terminal, plain text in a pipe, and --json."""

import json
import time

COLUMNS = ("label", "address", "role", "state", "marks", "frontend", "fd", "peer",
           "rx", "tx", "since")


def _marks(chardev: dict) -> str:
    marks = []
    if chardev.get("support-local-migration"):
        marks.append("migrate")
    if chardev.get("local-incoming"):
        marks.append("incoming")
    return ",".join(marks) or "-"


def _peer(chardev: dict) -> str:
    peer = chardev.get("peer")
    if not peer:
        return "-"
    if chardev.get("peer-pid"):
        peer += f" pid {chardev['peer-pid']}"
        if chardev.get("peer-process"):
            peer += f" ({chardev['peer-process']})"
    return peer


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def rows(status: dict) -> list[tuple[str, ...]]:
    out = []
    for c in status["chardevs"]:
        since = c.get("connected-since") or "-"
        out.append((c["label"], c["address"], c["role"], c["state"], _marks(c), c["frontend"],
                    str(c["fd"]) if c["fd"] is not None else "-", _peer(c), _bytes(c["rx-bytes"]),
                    _bytes(c["tx-bytes"]), since))
    return out


def header(status: dict) -> list[str]:
    caps = ", ".join(k for k, v in status["capabilities"].items() if v) or "none"
    mig = status["migration"]
    if mig["status"] == "none":
        last = "none"
    else:
        last = f"{mig['status']}, {mig['chardevs']} chardev(s) moved"
        if mig.get("downtime-ms") is not None:
            last += f", downtime {mig['downtime-ms']:.1f} ms"
        if mig.get("error"):
            last += f": {mig['error']}"
    return [
        f"instance {status['name']}  pid {status['pid']}  state {status['state']}  "
        f"uptime {status['uptime-s']:.1f} s  rss {_bytes(status['rss-bytes'])}  open fds {status['open-fds']}",
        f"capabilities: {caps}   last migration: {last}",
    ]


def plain(status: dict) -> str:
    lines = header(status)
    table = [tuple(c.upper() for c in COLUMNS)] + rows(status)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def rich_table(status: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in COLUMNS:
        table.add_column(column.upper(), no_wrap=column in ("label", "state", "fd"))
    colours = {"connected": "green", "listening": "cyan", "connecting": "yellow",
               "disconnected": "red", "migrating": "magenta", "awaiting-incoming": "yellow"}
    for row in rows(status):
        cells = list(row)
        cells[3] = Text(row[3], style=colours.get(row[3], ""))
        table.add_row(*cells)
    head = [Text(line, style="bold" if i == 0 else "") for i, line in enumerate(header(status))]
    return Group(*head, table)


def as_json(status: dict) -> str:
    return json.dumps(status, indent=2)


def timestamp() -> str:
    return time.strftime("%H:%M:%S")
