"""The status table, rich and plain, at the widths users have: one row per line,
every column when there is room; at 80 columns still one line per chardev, the
least wanted columns giving way, never a cell cut to `ADDRE…` or a peer wrapped
over four lines; then the real `fdmig status` on a terminal and in a pipe."""

import os
import re
import time

import psutil
import pytest

from fdmig import render
from tests.helpers import connect_unix, echoes, on_a_terminal, run

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


def a_short_status() -> dict:
    """The status of the man page's example: short addresses, as most are."""
    return a_status(path="/tmp/app.sock")


def chardev_lines(lines: list[str]) -> list[str]:
    """The table's heading and rows: from LABEL on, up to the note under them."""
    start = next(i for i, line in enumerate(lines) if line.startswith("LABEL "))
    end = next((i for i, line in enumerate(lines) if line.startswith("not shown")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
@pytest.mark.parametrize("status", [a_status, a_short_status], ids=["long-path", "short-path"])
def test_at_80_columns_each_chardev_is_one_line_of_whole_cells(renderer, status):
    # Issue 21: at 80 columns every row split onto a second line. Issue 9: cells
    # came out as `ADDRE…` and the peer wrapped over four lines.
    lines = RENDERERS[renderer](status(), 80)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert "…" not in "\n".join(lines)
    table = chardev_lines(lines)
    assert [line.split()[0] for line in table] == ["LABEL", "app", "upstream-db"], "\n".join(lines)
    shown = table[0].split()
    assert shown[:2] == ["LABEL", "ADDRESS"] and "STATE" in shown
    hidden = [column.upper() for column in render.COLUMNS if column.upper() not in shown]
    assert hidden, "at 80 columns some columns must give way"
    note, = [line for line in lines if line.startswith("not shown")]
    assert note == f"not shown: {', '.join(hidden)} (see --json)"
    # Each shown cell is whole, under its heading.
    app = dict(zip(shown, table[1].split()))
    assert app["LABEL"] == "app" and app["STATE"] == "connected"
    assert app["ADDRESS"] == status()["chardevs"][0]["address"]
    if "PEER" in shown:
        assert app["PEER"] == "socat[95311]"
    if "RX" in shown:
        assert (app["RX"], app["TX"]) == ("6B", "1.5K")


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
def test_at_80_columns_short_addresses_leave_room_for_the_peer_and_the_traffic(renderer):
    table = chardev_lines(RENDERERS[renderer](a_short_status(), 80))
    assert table[0].split() == ["LABEL", "ADDRESS", "STATE", "FRONTEND", "PEER", "RX", "TX"]
    assert table[1].split() == ["app", "unix:/tmp/app.sock", "connected", "echo", "socat[95311]", "6B", "1.5K"]
    assert table[2].split() == ["upstream-db", "tcp:127.0.0.1:5432", "connecting", "bridge=app", "-", "0B", "0B"]


def test_columns_give_way_least_wanted_first_and_each_row_stays_one_line():
    status = a_short_status()
    compact = render.rows(status, compact=True)
    for width in range(130, 24, -1):
        table = chardev_lines(render.plain(status, width).splitlines())
        shown = [column.lower() for column in table[0].split()]
        assert len(table) == 3 and all(len(line) <= width for line in table), (width, table)
        assert shown == [column for column in render.COLUMNS if column in shown]  # in table order
        assert {"label", "state"} <= set(shown) and ("rx" in shown) == ("tx" in shown)
        # A column left out while a less wanted one is shown did not fit in the
        # room the more wanted ones left.
        for n, group in enumerate(render.COLUMN_PRIORITY):
            if group[0] not in shown and any(later[0] in shown for later in render.COLUMN_PRIORITY[n + 1:]):
                need = sum(max(len(name), *(len(row[render.COLUMNS.index(name)]) for row in compact))
                           + len(render.GAP) for name in group)
                assert need > width - max(map(len, table)), (width, group)


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
def test_with_room_each_chardev_is_one_line_in_its_long_form(renderer):
    status = a_status(since="2026-11-26T01:16:13Z")
    lines = RENDERERS[renderer](status, 250)
    assert lines[2].split() == [c.upper() for c in render.COLUMNS]
    assert lines[3].split() == ["app", "unix:/run/fdmig-services/frontend/app.sock", "server", "connected",
                                "migrate", "echo", "8", "pid", "95311", "(socat)", "6", "B", "1.5", "KiB",
                                "2026-11-26T01:16:13Z"]
    assert len(lines) == 5


def test_in_a_pipe_without_a_width_every_row_is_one_line_with_every_column():
    lines = render.plain(a_status(), None).splitlines()
    assert len(lines) == 5 and lines[3].startswith("app  ") and "  pid 95311 (socat)  " in lines[3]
    assert lines[2].split() == [c.upper() for c in render.COLUMNS]


def test_an_address_wider_than_the_screen_gives_way_and_a_label_is_cut_at_the_edge_as_ps_cuts():
    path = "/run/" + "deep/" * 18 + "app.sock"
    lines = render.plain(a_status(path=path), 60).splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert "ADDRESS" in next(line for line in lines if line.startswith("not shown"))
    assert "…" not in "\n".join(lines)
    # Not even LABEL and STATE fit: the rows go on continuation lines, and the
    # cell wider than the screen is cut at its edge.
    status = a_status()
    status["chardevs"][0]["label"] = "a" * 70
    lines = render.plain(status, 60).splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert "a" * 59 + "…" in lines


@pytest.mark.parametrize("peer, pid, process, long, short", [
    ("unix:", 977, "socat", "pid 977 (socat)", "socat[977]"),  # an unnamed client socket
    ("unix:", 977, None, "pid 977", "pid 977"),  # gone before its name was read
    ("unix:/run/client.sock", 977, "socat", "unix:/run/client.sock pid 977 (socat)",
     "unix:/run/client.sock socat[977]"),
    ("unix:", None, None, "unix:", "unix:"),  # no pid to be had (another pid namespace)
    ("tcp:127.0.0.1:40000", None, None, "tcp:127.0.0.1:40000", "tcp:127.0.0.1:40000"),
    (None, None, None, "-", "-"),
])
def test_a_unix_peer_is_named_by_its_pid_and_process_not_its_empty_address(peer, pid, process, long, short):
    # Issue 21: an unnamed unix peer showed as `unix:`.
    status = a_status()
    status["chardevs"][0].update({"peer": peer, "peer-pid": pid, "peer-process": process})
    assert render.rows(status)[0][7] == long
    assert render.rows(status, compact=True)[0][7] == short


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
@pytest.mark.parametrize("name, hint", [("web", "fdmig attach --name web SPEC"), ("default", "fdmig attach SPEC")])
def test_an_instance_without_chardevs_says_so_and_how_to_add_one(renderer, name, hint):
    # Issue 21: the table's heading came out alone, with no row under it.
    status = dict(a_status(), name=name, chardevs=[])
    for width in (80, 250):
        lines = RENDERERS[renderer](status, width)
        assert lines[-1] == f"no chardevs; add one with: {hint}"
        assert not any("LABEL" in line for line in lines)
        assert lines[0].startswith(f"instance {name}  pid 9615")
    assert render.plain(status, None).splitlines()[-1] == f"no chardevs; add one with: {hint}"


def test_a_waiting_target_without_chardevs_does_not_offer_attach():
    status = dict(a_status(), state="inmigrate", chardevs=[])
    assert render.plain(status, None).splitlines()[-1] == "no chardevs"


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
    assert ("last migration: completed, 3 chardevs moved live with their TCP state (3.0 MiB queued to send, "
            "2.0 KiB to read), 1 reconnected, downtime 1.1 ms") in " ".join(render.header(status))


@pytest.mark.parametrize("migration, said", [
    # Issue 21: `cancelled, 0 chardev(s) moved: cancelled`.
    ({"status": "cancelled", "chardevs": 0, "error": "cancelled"}, "cancelled (no chardev moved)"),
    ({"status": "cancelled", "chardevs": 0, "error": "the instance is stopping"},
     "cancelled (no chardev moved): the instance is stopping"),
    ({"status": "failed", "chardevs": 0, "error": "the target closed the channel during table"},
     "failed (no chardev moved): the target closed the channel during table"),
    ({"status": "failed", "chardevs": 0, "error": "timed out after 5 s: no target listens on unix:/x"},
     "failed (no chardev moved): timed out after 5 s: no target listens on unix:/x"),
    ({"status": "completed", "chardevs": 1, "downtime-ms": 1.06, "error": None},
     "completed, 1 chardev moved, downtime 1.1 ms"),
    ({"status": "completed", "chardevs": 3, "downtime-ms": 0.5, "error": None},
     "completed, 3 chardevs moved, downtime 0.5 ms"),
    ({"status": "completed", "chardevs": 0, "downtime-ms": None, "error": None}, "completed, no chardev moved"),
    ({"status": "setup", "chardevs": 0, "error": None}, "setup (in progress)"),
    ({"status": "active", "chardevs": 0, "error": None}, "active (in progress)"),
    ({"status": "none", "chardevs": 0, "error": None}, "none"),
])
def test_the_last_migration_says_each_thing_once(migration, said):
    status = a_status()
    status["migration"] = {"downtime-ms": None, "total-ms": None, **migration}
    line = render.header(status)[1]
    assert line.endswith(f"last migration: {said}")
    assert "(s)" not in line and line.count(migration["status"]) == 1


# ----- the real `fdmig status` -------------------------------------------------------


def status_on_a_terminal(columns: int) -> list[str]:
    """`fdmig status` on a pseudo-terminal `columns` wide: the lines it drew."""
    return [line.rstrip() for line in on_a_terminal(["status"], columns).splitlines()]


def test_status_on_an_80_column_terminal_draws_each_chardev_on_one_line_with_its_peer(daemons, short_dir):
    daemons("serve", "--chardev", f"socket,id=app,path={short_dir}/app.sock,server=on,frontend=echo",
            "--chardev", f"socket,id=idle,path={short_dir}/idle.sock,server=on")
    me = f"{psutil.Process().name()}[{os.getpid()}]"
    with connect_unix(f"{short_dir}/app.sock") as peer:
        assert echoes(peer)
        lines = status_on_a_terminal(80)
        assert all(len(line) <= 80 for line in lines), "\n".join(lines)
        table = chardev_lines(lines)
        assert [line.split()[0] for line in table] == ["LABEL", "app", "idle"], "\n".join(lines)
        assert me in table[1].split() and "connected" in table[1].split()
        assert "unix:" not in table[0] + table[1].replace(f"unix:{short_dir}/app.sock", "")
        # In a pipe: every column, one row per line, the peer by pid and process.
        piped = run("status").stdout.splitlines()
        assert [line.split()[0] for line in piped[2:]] == ["LABEL", "app", "idle"]
        assert f"  pid {os.getpid()} ({psutil.Process().name()})  " in piped[3]


def test_status_of_an_instance_without_chardevs_says_how_to_add_one_and_that_works(daemons, short_dir):
    daemons("serve")
    lines = run("status").stdout.splitlines()
    assert lines[-1] == "no chardevs; add one with: fdmig attach SPEC" and len(lines) == 3
    assert status_on_a_terminal(80)[-1] == "no chardevs; add one with: fdmig attach SPEC"
    command = lines[-1].partition(": ")[2].split()[1:-1]  # what it says to run, SPEC filled in
    assert run(*command, f"socket,id=app,path={short_dir}/app.sock,server=on").returncode == 0
    assert run("status").stdout.splitlines()[3].split()[:4] == ["app", f"unix:{short_dir}/app.sock", "server",
                                                              "listening"]


def test_a_run_instance_shows_a_line_for_each_draining_generation():
    since, kill_at = 1796600000, 1796600090
    service = {"pid": 300, "state": "running", "ready": True, "status-text": None, "restarts": 2,
               "command": ["gunicorn"], "fdstore-max": 1024, "fdstore-refused": 0, "overlap": True,
               "draining": [{"pid": 100, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
                             "kill-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(kill_at))},
                            {"pid": 200, "since": None, "kill-at": None}]}
    lines = render.header(dict(a_status(), service=service, stored=[]))
    clock = time.strftime("%H:%M:%S", time.localtime(since))
    assert f"draining: pid 100, since {clock}, SIGKILL at " in "\n".join(lines)
    assert [line.split(",")[0] for line in lines if line.startswith("draining")] == ["draining: pid 100",
                                                                                    "draining: pid 200"]
