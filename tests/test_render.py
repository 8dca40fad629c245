"""The status table, rich and plain, at the widths users have: one row per line
when there is room; at 80 columns, what `ps` and `ss` do, never a cell cut to
`ADDRE…` or a peer wrapped over four lines."""

import re
import time

import pytest

from fdmig import render

pytestmark = pytest.mark.cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def a_status(path="/run/fdmig-services/frontend/app.sock", since=None) -> dict:
    """What x-fdmig-status says of an instance with a connected echo chardev and a
    bridge, as a migrated one shows them."""
    since = since or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    chardev = {"label": "app", "address": f"unix:{path}", "role": "server", "state": "connected",
               "support-local-migration": True, "local-incoming": False, "frontend": "echo", "fd": 8,
               "peer": "unix:", "peer-pid": 95311, "peer-process": "socat", "rx-bytes": 6, "tx-bytes": 1536,
               "connected-since": since, "migrations": 1}
    upstream = {"label": "upstream-db", "address": "tcp:127.0.0.1:5432", "role": "client", "state": "connecting",
                "support-local-migration": False, "local-incoming": False, "frontend": "bridge=app", "fd": None,
                "peer": None, "peer-pid": None, "peer-process": None, "rx-bytes": 0, "tx-bytes": 0,
                "connected-since": None, "migrations": 0}
    return {"name": "web", "pid": 9615, "state": "running", "uptime-s": 3.7, "rss-bytes": 27682406,
            "open-fds": 12, "capabilities": {"local-char-socket": True},
            "migration": {"status": "completed", "chardevs": 1, "downtime-ms": 1.1, "total-ms": 9.0,
                          "error": None},
            "chardevs": [chardev, upstream]}


def rich_lines(status: dict, width: int) -> list[str]:
    from rich.console import Console
    console = Console(width=width, force_terminal=True, color_system="standard", record=True)
    console.print(render.rich_table(status))
    return [ANSI.sub("", line).rstrip() for line in console.export_text(styles=False).splitlines()]


def words(lines: list[str]) -> list[str]:
    return " ".join(lines).split()


RENDERERS = {"plain": lambda status, width: render.plain(status, width).splitlines(), "rich": rich_lines}


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
def test_at_80_columns_every_cell_is_whole_and_no_line_is_wider(renderer):
    # Issue 9: at 80 columns ADDRESS, PEER and SINCE came out as `ADDRE…` and the
    # peer wrapped over four lines.
    status = a_status()
    lines = RENDERERS[renderer](status, 80)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert "…" not in "\n".join(lines)
    shown = words(lines)
    for heading in render.COLUMNS:
        assert heading.upper() in shown
    for cell in ("app", "unix:/run/fdmig-services/frontend/app.sock", "server", "connected", "migrate", "echo",
                 "socat[95311]", "1.5K", "upstream-db", "tcp:127.0.0.1:5432", "connecting", "bridge=app"):
        assert cell in shown, f"{cell!r} is not shown whole:\n" + "\n".join(lines)
    # A row starts at the left edge with its label; what did not fit follows indented.
    starts = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert starts[-3:] == ["LABEL", "app", "upstream-db"]
    label_line = next(line for line in lines if line.startswith("app "))
    assert label_line.split()[:4] == ["app", "unix:/run/fdmig-services/frontend/app.sock", "server", "connected"]


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
def test_with_room_each_chardev_is_one_line_in_its_long_form(renderer):
    status = a_status(since="2026-11-26T01:16:13Z")
    lines = RENDERERS[renderer](status, 250)
    assert lines[2].split() == [c.upper() for c in render.COLUMNS]
    assert lines[3].split() == ["app", "unix:/run/fdmig-services/frontend/app.sock", "server", "connected",
                                "migrate", "echo", "8", "unix:", "pid", "95311", "(socat)", "6", "B", "1.5", "KiB",
                                "2026-11-26T01:16:13Z"]
    assert len(lines) == 5


def test_in_a_pipe_without_a_width_every_row_is_one_line():
    lines = render.plain(a_status(), None).splitlines()
    assert len(lines) == 5 and lines[3].startswith("app  ") and "unix: pid 95311 (socat)" in lines[3]


def test_a_cell_wider_than_the_screen_is_cut_at_the_edge_as_ps_cuts():
    path = "/run/" + "deep/" * 18 + "app.sock"
    lines = render.plain(a_status(path=path), 60).splitlines()
    assert all(len(line) <= 60 for line in lines)
    cut = [line for line in lines if line.endswith("…")]
    assert cut and all(f"unix:{path}".startswith(line.split()[-1][:-1]) for line in cut), "\n".join(lines)


def test_the_short_forms_say_the_same():
    status = a_status(since="2020-01-02T03:04:05Z")
    (app, _), = [render.rows(status, compact=True)[:1] + [None]]
    assert app[7] == "socat[95311]" and (app[8], app[9]) == ("6B", "1.5K")
    assert app[10] == time.strftime("%b%d", time.localtime(1577934245))  # more than a day ago: the date
    now = time.time()
    assert render.rows(a_status(since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))),
                       compact=True)[0][10] == time.strftime("%H:%M:%S", time.localtime(now))


def test_a_waiting_target_says_so_in_the_header():
    status = dict(a_status(), state="inmigrate")
    assert "state inmigrate (a migration target, waiting)" in render.header(status)[0]


def test_after_a_migration_across_hosts_the_header_says_what_moved_live_and_what_reconnects():
    status = a_status()
    status["migration"].update({"chardevs": 3, "moved-live": ["app", "db", "cache"], "reconnected": ["admin"],
                                "tcp-state": {"connections": 3, "send-queue-bytes": 3 * 2**20, "unsent-bytes": 10,
                                              "recv-queue-bytes": 2048}})
    assert ("last migration: completed, 3 chardev(s) moved live with their TCP state (3.0 MiB queued to send, "
            "2.0 KiB to read), 1 reconnect, downtime 1.1 ms") in " ".join(render.header(status))
