"""Rendering of status: one data path (the x-fdmig-status object) feeds the rich
table on a terminal, plain text in a pipe, and --json.

Both tables come from one layout, fitted to a width as `ps` and `ss` fit theirs:
no cell is squeezed into an ellipsis or wrapped inside itself, and each chardev
stays one line. When the rows are wider than the screen the long cells take
their short forms (SINCE a time of day, PEER `process[pid]`, byte counts
`1.5M`); when they still are, the columns least wanted on a narrow screen are
left out (COLUMN_PRIORITY), and a line under the table names them. Only where
not even LABEL and STATE fit do the columns go on continuation lines, indented,
as `ss` does; a single cell wider than the screen is cut at its edge, as `ps`
cuts its last column. Without a width (a pipe, for grep and awk) every column
is shown and every row is one line.
"""

import calendar
import json
import textwrap
import time

from fdmig.lifecycle import MigrationStatus, RunState

COLUMNS = ("label", "address", "role", "state", "marks", "frontend", "fd", "peer",
           "rx", "tx", "since")
# Which columns a narrow screen keeps, most wanted first: a chardev is told by
# its label and state, then where it is and who is on it, then its traffic; its
# settings (frontend, role, marks) and the fd number are in `--json` and a wide
# screen. RX and TX go together.
COLUMN_PRIORITY = (("label",), ("state",), ("address",), ("peer",), ("rx", "tx"), ("frontend",), ("role",),
                   ("marks",), ("since",), ("fd",))
STORED_COLUMNS = ("stored", "kind", "fd", "address", "peer", "since")
GAP = "  "
INDENT = "  "  # of a continuation line
_STATE_STYLES = {"connected": "green", "listening": "cyan", "connecting": "yellow",
                 "disconnected": "red", "migrating": "magenta", "awaiting-incoming": "yellow"}


def _marks(chardev: dict) -> str:
    marks = []
    if chardev.get("support-local-migration"):
        marks.append("migrate")
    if chardev.get("local-incoming"):
        marks.append("incoming")
    return ",".join(marks) or "-"


def _peer(chardev: dict) -> str:
    """`pid 977 (socat)` for a unix peer: an unnamed client socket's address is
    only `unix:`, which says nothing; a named or TCP peer's address first."""
    peer = chardev.get("peer")
    if not peer:
        return "-"
    pid = chardev.get("peer-pid")
    if not pid:
        return peer
    who = f"pid {pid}" + (f" ({chardev['peer-process']})" if chardev.get("peer-process") else "")
    return who if peer == "unix:" else f"{peer} {who}"


def _short_peer(chardev: dict) -> str:
    """`socat[977]`, as the journal names a process; the address only when it says
    more than `unix:` (an unnamed unix client)."""
    peer = chardev.get("peer")
    if not peer:
        return "-"
    pid = chardev.get("peer-pid")
    if not pid:
        return peer
    who = f"{chardev['peer-process']}[{pid}]" if chardev.get("peer-process") else f"pid {pid}"
    return who if peer == "unix:" else f"{peer} {who}"


def _bytes(n: int, units=("B", "KiB", "MiB", "GiB"), sep: str = " ") -> str:
    for unit in units:
        if n < 1024 or unit == units[-1]:
            return f"{n}{sep}{unit}" if unit == units[0] else f"{n:.1f}{sep}{unit}"
        n /= 1024
    return str(n)


def _short_bytes(n: int) -> str:
    """`ls -h`'s form: 512B, 1.5K, 3.0M."""
    return _bytes(n, ("B", "K", "M", "G"), "")


def _short_since(since: str | None, now: float) -> str:
    """`ps`'s STIME: the local time of day within the last day, else the date."""
    if not since:
        return "-"
    try:
        when = calendar.timegm(time.strptime(since, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return since
    return time.strftime("%H:%M:%S" if now - when < 86400 else "%b%d", time.localtime(when))


def rows(status: dict, compact: bool = False) -> list[tuple[str, ...]]:
    """One tuple of cells per chardev; `compact`: the short forms of the long cells."""
    out = []
    now = time.time()
    for c in status["chardevs"]:
        if compact:
            peer, rx, tx = _short_peer(c), _short_bytes(c["rx-bytes"]), _short_bytes(c["tx-bytes"])
            since = _short_since(c.get("connected-since"), now)
        else:
            peer, rx, tx = _peer(c), _bytes(c["rx-bytes"]), _bytes(c["tx-bytes"])
            since = c.get("connected-since") or "-"
        out.append((c["label"], c["address"], c["role"] or "-", c["state"], _marks(c), c["frontend"],
                    str(c["fd"]) if c["fd"] is not None else "-", peer, rx, tx, since))
    return out


def _count(n: int) -> str:
    return "no chardev" if not n else "1 chardev" if n == 1 else f"{n} chardevs"


def _last_migration(mig: dict) -> str:
    """The last migration in a few words, each thing said once: `completed, 3
    chardevs moved, downtime 1.1 ms`, `cancelled (no chardev moved)`, `failed (no
    chardev moved): REASON`."""
    status = mig["status"]
    if status == MigrationStatus.NONE.value:
        return "none"
    if status in (MigrationStatus.SETUP.value, MigrationStatus.ACTIVE.value):
        return f"{status} (in progress)"
    if status != MigrationStatus.COMPLETED.value:
        text = f"{status} ({_count(mig['chardevs'])} moved)"
        error = mig.get("error")
        return f"{text}: {error}" if error and error != status else text
    text = f"{status}, {_count(mig['chardevs'])} moved"
    tcp = mig.get("tcp-state")
    if tcp is not None:  # over a TCP channel: live with their TCP state, or reconnecting
        text += (f" live with their TCP state ({_bytes(tcp['send-queue-bytes'])} queued to send, "
                 f"{_bytes(tcp['recv-queue-bytes'])} to read), {len(mig.get('reconnected') or [])} reconnected")
    if mig.get("downtime-ms") is not None:
        text += f", downtime {mig['downtime-ms']:.1f} ms"
    return text


def _header_fields(status: dict) -> list[tuple[list[str], str]]:
    """The header's two lines, as (fields, separator)."""
    caps = ", ".join(k for k, v in status["capabilities"].items() if v) or "none"
    state = status["state"]
    if state == RunState.INMIGRATE.value:
        state += " (a migration target, waiting)"
    return [
        ([f"instance {status['name']}", f"pid {status['pid']}", f"state {state}",
          f"uptime {status['uptime-s']:.1f} s", f"rss {_bytes(status['rss-bytes'])}",
          f"open fds {status['open-fds']}"], "  "),
        ([f"capabilities: {caps}", f"last migration: {_last_migration(status['migration'])}"], "   "),
    ] + _service_fields(status)


def _service_fields(status: dict) -> list[tuple[list[str], str]]:
    """A `run` instance's third header line: its service and its fd store."""
    service = status.get("service")
    if service is None:
        return []
    fields = [f"service: {service['state']}" + (f", pid {service['pid']}" if service["pid"] else ""),
              "ready" if service["ready"] else "not ready", f"restarts {service['restarts']}",
              f"stored fds {len(status.get('stored', []))} of {service['fdstore-max']}",
              f"refused {service['fdstore-refused']}"]
    if service.get("status-text"):
        fields.append(f"status: {service['status-text']}")
    # A line for each older generation that drains (run --overlap).
    draining = [([f"draining: pid {entry['pid']}", f"since {local_time(entry.get('since'))}",
                  f"SIGKILL at {local_time(entry.get('kill-at'))}"], ", ") for entry in service.get("draining") or []]
    beside = service.get("serving-beside")
    if beside:
        draining.insert(0, ([f"serving: pid {beside['pid']} (the old generation, until the new one is ready)"], ""))
    return [(fields, ", ")] + draining


def local_time(iso: str | None) -> str:
    """`2026-12-07T05:30:00Z` (status's form) as the local time of day."""
    if not iso:
        return "-"
    try:
        return time.strftime("%H:%M:%S", time.localtime(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))))
    except ValueError:
        return iso


def header(status: dict) -> list[str]:
    return [sep.join(fields) for fields, sep in _header_fields(status)]


def _fill(fields: list[str], sep: str, width: int | None) -> list[str]:
    """Fields joined by `sep`, as many to a line as fit `width`; the lines after
    the first indented; a field longer than a line wrapped at its spaces."""
    if width is None:
        return [sep.join(fields)]
    lines: list[str] = []
    for field in fields:
        room = width - (len(INDENT) if lines else 0)
        if lines and len(lines[-1]) + len(sep) + len(field) <= width:
            lines[-1] += sep + field
        elif len(field) <= room:
            lines.append((INDENT if lines else "") + field)
        else:
            # The indent counts: a wrapped line is no wider than the others.
            lines += textwrap.wrap(field, max(width, 10 + len(INDENT)), initial_indent=INDENT if lines else "",
                                   subsequent_indent=INDENT, break_on_hyphens=False) or [field]
    return lines


def _groups(widths: list[int], width: int | None) -> list[list[int]]:
    """The columns of each line of a row: all on one when they fit; otherwise as
    many as fit on the first line, the rest on continuation lines."""
    if width is None or sum(widths) + len(GAP) * (len(widths) - 1) <= width:
        return [list(range(len(widths)))]
    groups: list[list[int]] = []
    used = 0
    for column, w in enumerate(widths):
        if groups and used + len(GAP) + w <= width:
            groups[-1].append(column)
            used += len(GAP) + w
        else:
            groups.append([column])
            used = (len(INDENT) if len(groups) > 1 else 0) + w
    return groups


Line = list[tuple[str, str]]  # (text, rich style) segments


def _cut(line: Line, width: int | None) -> Line:
    """The line without trailing blanks and no wider than `width`: cut at the edge
    with '…' if it must be."""
    text = "".join(part for part, _ in line).rstrip()
    keep = len(text) if width is None or len(text) <= width else max(width - 1, 0)
    out, left = [], keep
    for part, style in line:
        if left <= 0:
            break
        out.append((part[:left], style))
        left -= len(part)
    if keep < len(text):
        out.append(("…", ""))
    return out


def layout(status: dict, width: int | None = None) -> list[Line]:
    """The status as lines of styled segments, fitted to `width` (None: unlimited)."""
    lines: list[Line] = []
    for n, (fields, sep) in enumerate(_header_fields(status)):
        for text in _fill(fields, sep, width):
            lines.append(_cut([(text, "bold" if n == 0 else "")], width))
    if status["chardevs"]:
        lines += _chardev_lines(status, width)
    else:
        for text in _fill([_no_chardevs(status)], "", width):
            lines.append(_cut([(text, "")], width))
    if status.get("stored"):
        lines += _table_lines(STORED_COLUMNS, stored_rows(status), width)
    return lines


def _no_chardevs(status: dict) -> str:
    if status["state"] != RunState.RUNNING.value:
        return "no chardevs"
    name = "" if status["name"] == "default" else f" --name {status['name']}"
    return f"no chardevs; add one with: fdmig attach{name} SPEC"


def _chardev_lines(status: dict, width: int | None) -> list[Line]:
    """The chardevs' table: every column where there is room, else the short
    forms, and the columns that fit in COLUMN_PRIORITY's order."""
    table = rows(status)
    if width is None or _table_width(COLUMNS, table) <= width:
        return _table_lines(COLUMNS, table, width, COLUMNS.index("state"))
    table = rows(status, compact=True)
    shown = _columns_that_fit(table, width)
    columns = [COLUMNS[i] for i in shown]
    lines = _table_lines(columns, [tuple(row[i] for i in shown) for row in table], width, columns.index("state"))
    hidden = [column.upper() for i, column in enumerate(COLUMNS) if i not in shown]
    if hidden:
        note = f"not shown: {', '.join(hidden)} (see --json)"
        lines += [_cut([(text, "dim")], width) for text in _fill([note], "", width)]
    return lines


def _columns_that_fit(table, width: int) -> list[int]:
    """The indexes of the columns that fit `width` together, taken in
    COLUMN_PRIORITY's order (a group too wide is passed over for the next), in
    table order. All of them where not even the first two groups fit: those
    rows are split onto continuation lines anyway."""
    widths = {column: max([len(column)] + [len(row[i]) for row in table]) for i, column in enumerate(COLUMNS)}
    chosen: list[str] = []
    used = -len(GAP)
    for n, group in enumerate(COLUMN_PRIORITY):
        need = sum(widths[column] + len(GAP) for column in group)
        if used + need <= width:
            chosen += group
            used += need
        elif n < 2:
            return list(range(len(COLUMNS)))
    return [i for i, column in enumerate(COLUMNS) if column in chosen]


def _table_width(columns, table) -> int:
    widths = [max([len(column)] + [len(row[i]) for row in table]) for i, column in enumerate(columns)]
    return sum(widths) + len(GAP) * (len(widths) - 1)


def _table_lines(columns, body, width: int | None, state_column: int | None = None) -> list[Line]:
    """A heading and rows, each column as wide as its widest cell, the columns
    split into groups of lines where `width` is too narrow for them all."""
    table = [tuple(column.upper() for column in columns)] + body
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines: list[Line] = []
    for r, row in enumerate(table):
        for g, group in enumerate(_groups(widths, width)):
            line: Line = [(INDENT, "")] if g else []
            for k, column in enumerate(group):
                cell = row[column] if k == len(group) - 1 else row[column].ljust(widths[column])
                if r == 0:
                    style = "bold"
                else:
                    style = _STATE_STYLES.get(row[column], "") if column == state_column else ""
                if k:
                    line.append((GAP, ""))
                line.append((cell, style))
            lines.append(_cut(line, width))
    return lines


def stored_rows(status: dict) -> list[tuple[str, ...]]:
    return [(e["name"], e["kind"], str(e["fd"]), e.get("address") or "-", e.get("peer") or "-",
             e.get("stored-at") or "-") for e in status.get("stored", [])]


def plain(status: dict, width: int | None = None) -> str:
    """Plain text: a header and the table, fitted to `width` (None: one row per line)."""
    return "\n".join("".join(part for part, _ in line) for line in layout(status, width))


class StatusView:
    """The status for rich, laid out for whatever width the console gives it (a
    Live display lays it out again when the terminal is resized)."""

    def __init__(self, status: dict):
        self.status = status

    def __rich_console__(self, console, options):
        from rich.text import Text
        for line in layout(self.status, options.max_width):
            yield Text.assemble(*line, no_wrap=True, overflow="crop")


def rich_table(status: dict) -> StatusView:
    return StatusView(status)


def as_json(status: dict) -> str:
    return json.dumps(status, indent=2)


def timestamp() -> str:
    return time.strftime("%H:%M:%S")
