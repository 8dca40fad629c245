"""What a new user meets (issue 9, part 6): one-line messages that name what was
wrong and what is accepted, `status` that reads at 80 columns and that finds a
waiting migration target, a watch that ends quietly, a demo whose numbers add
up, and commands that start without the machinery they do not use."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from fdmig import demo
from tests.helpers import FDMIG, connect_unix, on_a_terminal, recv_exactly, run, run_many, wait_state
from tests.test_docs import MAN, line_text, sections

pytestmark = pytest.mark.cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def echo_server(path: str, label: str = "app") -> str:
    return f"socket,id={label},path={path},server=on,frontend=echo"


# ----- click's own usage errors: one `fdmig: ...` line, exit 2 --------------------------

# Issue 9: these printed click's `Usage: ... Try 'fdmig serve --help'` block and
# `Error: Invalid value for '--capability': ...` over four lines.
OPTION_MISTAKES = {
    "capability typo": (["serve", "--capability", "local-char-sockt"],
                        "fdmig: --capability: 'local-char-sockt' is not known; accepted: local-char-socket"),
    "timeout 0": (["migrate-out", "--timeout", "0"],
                  "fdmig: --timeout: 0 is out of range; accepted: a number greater than 0"),
    "timeout not a number": (["migrate-in", "--timeout", "soon"],
                             "fdmig: --timeout: 'soon' is not a number; accepted: a number greater than 0"),
    "negative wait timeout": (["status", "--wait", "a=listening", "--timeout", "-1"],
                              "fdmig: --timeout: -1 is out of range; accepted: a number, 0 or more"),
    "demo migrations 0": (["demo", "--migrations", "0"],
                          "fdmig: --migrations: 0 is out of range; accepted: 1 to 1000"),
    # Issue 21: "Did you mean '--json'?; see", and the choices over four lines.
    "unknown option": (["status", "--jsn"], "fdmig: no such option"),
    "unknown command": (["statu"], "fdmig: no such command 'statu'"),
    "missing argument": (["attach"], "fdmig: missing argument 'SPEC'; see 'fdmig attach --help'"),
    "missing choice": (["completion"], "fdmig: missing argument SHELL; accepted: bash, zsh, fish"),
}


def test_a_mistyped_option_is_answered_with_the_nearest_in_one_clause(runtime_dir):
    # Issue 21: "Did you mean '--json'?; see".
    result = run("status", "--jsn")
    assert result.returncode == 2
    assert re.fullmatch(r"fdmig: no such option:? '?--jsn'? \(did you mean '?--json'?\?\); "
                        r"see 'fdmig status --help'\n", result.stderr), result.stderr


def test_help_fits_80_columns_names_every_command_whole_and_ends_with_examples(runtime_dir, monkeypatch):
    # Issue 21: summaries cut with "...", a word broken across lines, no examples anywhere.
    from fdmig.cli import main
    commands = sorted(main.commands)
    monkeypatch.setenv("COLUMNS", "80")
    results = run_many([[command, "--help"] for command in commands] + [["--help"]])
    for command, result in zip(commands + ["fdmig"], results):
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), f"{command}: {[l for l in lines if len(l) > 80]}"
        assert "Example" in result.stdout, f"{command} --help shows no example"
        assert not re.search(r"[a-z]-$", "\n".join(lines), re.M), f"{command}: a word broken across lines"
    listing = results[-1].stdout.split("Commands:")[1]
    assert "..." not in listing, listing
    assert set(re.findall(r"^  (\S+)", listing, re.M)) == set(commands)


def test_option_errors_are_one_fdmig_line_and_exit_2(runtime_dir):
    results = run_many([args for args, _ in OPTION_MISTAKES.values()])
    failures = []
    for (case, (_, expected)), result in zip(OPTION_MISTAKES.items(), results):
        lines = result.stderr.splitlines()
        if not (result.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected)
                and not result.stdout):
            failures.append(f"{case}: exit {result.returncode}, stderr {result.stderr!r}")
    assert not failures, "\n".join(failures)


# ----- attach: the label in use, the fd the user gave -----------------------------

def test_attach_of_a_label_in_use_exits_2_as_its_man_page_says(daemons, short_dir):
    # Issue 9: fdmig-attach(1) listed a duplicate label under exit 1; the code exits 2.
    daemons("serve", "--chardev", echo_server(f"{short_dir}/a.sock"))
    result = run("attach", f"id=app,path={short_dir}/b.sock,server=on")
    assert result.returncode == 2
    assert result.stderr == "fdmig: chardev app: id: duplicate label 'app'; each chardev needs its own id\n"
    exit_status = paragraphs(sections(MAN / "fdmig-attach.1")["EXIT STATUS"])
    assert "label already in use" in exit_status["2"] and "label" not in exit_status["1"]


def paragraphs(lines: list[str]) -> dict[str, str]:
    """A section's .TP paragraphs: tag -> text."""
    found: dict[str, list[str]] = {}
    body = None
    for before, line in zip([""] + lines, lines):
        if line == ".TP":
            continue
        if before == ".TP":
            body = found.setdefault(line_text(line), [])
        elif body is not None:
            body.append(line_text(line))
    return {tag: " ".join(text) for tag, text in found.items()}


def test_attach_fd_messages_name_the_fd_the_user_gave(daemons, short_dir):
    # Issue 9: `attach id=x,fd=0` said `fd 11 is not a socket`: the number the
    # instance got the descriptor under, which the user never saw.
    daemons("serve")
    with open(os.devnull) as null:
        not_a_socket = run("attach", "id=x,fd=0", stdin=null)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = theirs.fileno()
        connected_as_server = run("attach", f"id=y,fd={fd},server=on", pass_fds=(fd,))
    assert not_a_socket.returncode == 1
    assert not_a_socket.stderr == "fdmig: chardev x: fd 0 is not a socket; accepted: a stream socket\n"
    assert connected_as_server.returncode == 1
    assert connected_as_server.stderr == (f"fdmig: chardev y: fd {fd} is a connected socket; "
                                          "accepted with server=off\n")
    assert run("status", "--json").stdout.count('"label"') == 0  # nothing was added, nothing left behind


# ----- status: a waiting target, 80 columns, Ctrl-C ---------------------------------------

def test_status_of_a_name_only_a_waiting_target_holds_shows_the_target(daemons, short_dir, runtime_dir):
    # Issue 9: `status --name web` said "no instance answers" (exit 3) while
    # `migrate-in --name web` waited, answering beside the control path.
    target = daemons("migrate-in", "--name", "web", "--chardev",
                     f"socket,id=app,path={short_dir}/app.sock,server=on,local-incoming=on", ready=False)
    target.notify.wait_for("STATUS", f"waiting for a migration on unix:{runtime_dir}/web.migrate.sock",
                           alive=lambda: target.proc.poll() is None)
    table, as_json = run_many([["status", "--name", "web"], ["status", "--name", "web", "--json"]])
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"instance web  pid {target.pid}  state inmigrate")
    assert re.search(r"^app +unix:\S+app.sock +server +awaiting-incoming ", table.stdout, re.M), table.stdout
    assert as_json.returncode == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    assert (status["pid"], status["state"]) == (target.pid, "inmigrate")
    assert [(c["label"], c["state"]) for c in status["chardevs"]] == [("app", "awaiting-incoming")]
    nobody = run("status", "--name", "other")
    assert nobody.returncode == 3 and nobody.stderr == f"fdmig: no instance answers at {runtime_dir}/other.sock\n"


def test_status_on_an_80_column_terminal_is_readable(daemons, short_dir, runtime_dir):
    # Issue 9: ADDRESS, PEER and SINCE were cut to `ADDRE…` and the peer wrapped
    # over four lines.
    path = f"{short_dir}/frontend-app.sock"
    daemons("serve", "--capability", "local-char-socket",
            "--chardev", echo_server(path) + ",support-local-migration=on",
            "--chardev", f"socket,id=metrics,path={short_dir}/metrics.sock,server=on,frontend=sink")
    with connect_unix(path) as peer:
        peer.sendall(b"ping")
        assert recv_exactly(peer, 4) == b"ping"
        screen = on_a_terminal(["status"], 80)
    lines = screen.splitlines()
    assert all(len(line) <= 80 for line in lines), screen
    assert "…" not in screen, screen
    shown = screen.split()
    for word in ("LABEL", "ADDRESS", "STATE", "PEER", f"unix:{path}", "connected", f"unix:{short_dir}/metrics.sock"):
        assert word in shown, f"{word!r} is not shown whole:\n{screen}"
    assert any(word.endswith(f"[{os.getpid()}]") for word in shown), screen  # the peer: this test's process
    # Issue 21: one line per chardev; the columns left out to make room are named.
    rows = [line for line in lines if line.startswith(("app ", "metrics "))]
    assert [row.split()[:3] for row in rows] == [["app", f"unix:{path}", "connected"],
                                                 ["metrics", f"unix:{short_dir}/metrics.sock", "listening"]], screen
    assert any(line.startswith("not shown:") and "--json" in line for line in lines), screen


def test_ctrl_c_ends_status_watch_with_exit_0_and_no_aborted(daemons):
    # Issue 9: Ctrl-C ended `status --watch` with click's `Aborted!` and exit 1.
    daemons("serve", "--name", "web")
    watch = subprocess.Popen(FDMIG + ["status", "--name", "web", "--watch"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert watch.stdout.readline().startswith("instance web")  # it is watching
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=10)
    finally:
        watch.kill()
    assert watch.returncode == 0 and "Aborted" not in err, err


# ----- the demo's numbers ---------------------------------------------------------------

class HookedSocket:
    """The demo peer's socket, with a hook at the points that decide its numbers:
    sendall() returns only once its record has come back and been counted (the
    moment the demo showed `echoed` above `sent`), and recv() may hold the stream
    once, a pause of `stall` seconds."""

    def __init__(self, peer: demo.Peer, stall_at: int | None = None, stall: float = 0.0):
        self.sock, self.peer = peer.sock, peer
        self.stall_at, self.stall = stall_at, stall
        self.counts_after_echo: list[tuple[int, int]] = []  # (sent, echoed)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)
        record = int(data)
        deadline = time.monotonic() + 10
        while self.peer.echoed <= record and time.monotonic() < deadline and not self.peer._closing:
            time.sleep(0.0005)
        echoed = self.peer.echoed
        self.counts_after_echo.append((self.peer.sent, echoed))

    def recv(self, size: int) -> bytes:
        if self.stall_at is not None and self.peer.echoed >= self.stall_at:
            self.stall_at = None
            time.sleep(self.stall)
        return self.sock.recv(size)

    def shutdown(self, how) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


def hooked_peer(path: str, **hook) -> tuple[demo.Peer, HookedSocket]:
    peer = demo.Peer(path)
    hooked = peer.sock = HookedSocket(peer, **hook)
    peer.start()
    return peer, hooked


def wait_echoed(peer: demo.Peer, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while peer.echoed < n:
        assert time.monotonic() < deadline and peer.bad is None, peer.bad
        time.sleep(0.005)


def test_demo_never_counts_more_echoed_than_sent(daemons, short_dir):
    # Issue 9: a row read `echoed 1508639` and `sent 1508638`: `sent` moved only
    # after sendall() returned, and the echo can be back and counted before that.
    path = f"{short_dir}/app.sock"
    daemons("serve", "--chardev", echo_server(path))
    peer, hooked = hooked_peer(path)
    wait_echoed(peer, 50)
    peer.finish()
    assert peer.bad is None and not peer.eof
    assert len(hooked.counts_after_echo) >= 50
    above = [(sent, echoed) for sent, echoed in hooked.counts_after_echo if echoed > sent]
    assert not above, f"echoed above sent: {above[:5]}"
    sent, echoed = peer.counts()
    assert sent == echoed == peer.sent


def test_demo_longest_pause_is_per_migration_not_the_run_so_far(daemons, short_dir):
    # Issue 9: each row showed the longest pause of the whole run so far.
    path = f"{short_dir}/app.sock"
    daemons("serve", "--chardev", echo_server(path))
    peer, _ = hooked_peer(path, stall_at=20, stall=0.3)
    try:
        wait_echoed(peer, 40)
        first = peer.take_pause()  # the window with the stall
        start = peer.echoed
        wait_echoed(peer, start + 40)
        second = peer.take_pause()  # a window without one
    finally:
        peer.finish()
    assert first >= 0.3 and second < 0.3, (first, second)
    assert peer.longest_pause >= 0.3  # the summary's number: the run's longest


# ----- start-up: only what the command needs ------------------------------------------

def imported_modules(args, **kwargs) -> tuple[subprocess.CompletedProcess, set[str]]:
    result = subprocess.run([FDMIG[0], "-X", "importtime", *FDMIG[1:], *args], capture_output=True, text=True,
                            timeout=30, **kwargs)
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return result, modules


def test_status_wait_and_channel_parsing_import_neither_the_chardev_module_nor_asyncio(runtime_dir):
    # Issue 9: `status --wait` imported fdmig.chardev for its state names (+35 ms)
    # and `--channel` the asyncio channel module to parse a URI (+47 ms).
    waited, waited_modules = imported_modules(["status", "--wait", "app=listening", "--timeout", "0.1"])
    assert waited.returncode == 4 and "timed out" in waited.stderr
    channel, channel_modules = imported_modules(["migrate-in", "--channel", "tcp:host:1"])
    assert channel.returncode == 2 and "--channel" in channel.stderr
    for modules in (waited_modules, channel_modules):
        assert "fdmig.spec" in modules  # the measurement works
        heavy = {m for m in modules if m in ("asyncio", "fdmig.chardev", "fdmig.migration.channel", "fdmig.daemon")}
        assert not heavy, heavy


def test_wait_accepts_every_chardev_state_and_names_them_when_wrong(daemons, short_dir):
    daemons("serve", "--chardev", echo_server(f"{short_dir}/a.sock"))
    wait_state("app", "listening")
    result = run("status", "--wait", "app=listen")
    assert result.returncode == 2
    assert result.stderr == ("fdmig: --wait: state 'listen' is not known; accepted: listening, connecting, "
                             "connected, disconnected, awaiting-incoming, migrating, migrated, closed\n")


def test_a_command_that_is_not_executable_is_called_so_not_missing(short_dir, runtime_dir):
    # Regression: `fdmig run -- ./app.py` of a file without +x said "not found".
    script = os.path.join(short_dir, "app.py")
    with open(script, "w") as f:
        f.write("print('hi')\n")
    result = run("run", "--", script)
    assert result.returncode == 2
    assert "is not executable" in result.stderr and f"python3 {script}" in result.stderr, result.stderr
    missing = run("migrate-in", "--exec", "--", os.path.join(short_dir, "nothing"))
    assert missing.returncode == 2 and "not found" in missing.stderr, missing.stderr


def test_after_the_double_dash_completion_offers_paths(runtime_dir):
    # Issue 21: `fdmig run -- <TAB>` completed nothing.
    for words in ("fdmig run -- ./se", "fdmig run --name web -- python3 ./se", "fdmig migrate-in --exec -- ./se"):
        env = dict(os.environ, _FDMIG_COMPLETE="bash_complete", COMP_WORDS=words,
                   COMP_CWORD=str(len(words.split()) - 1))
        done = subprocess.run(FDMIG, env=env, capture_output=True, text=True, timeout=30)
        assert done.stdout.split() == ["file,./se"], (words, done.stdout, done.stderr)


def test_a_spec_completes_its_backend_then_that_backend_s_keys(runtime_dir):
    # Issue 23: every backend is offered where a SPEC goes, then the keys it takes.
    cases = {"fdmig attach p": ["pty,", "pipe,"],
             "fdmig serve --chardev se": ["serial,"],
             "fdmig run --chardev udp,id=dns,localp": ["udp,id=dns,localport="],
             "fdmig migrate-in --chardev pty,id=con,local-": ["pty,id=con,local-incoming="]}
    for words, offered in cases.items():
        env = dict(os.environ, _FDMIG_COMPLETE="bash_complete", COMP_WORDS=words,
                   COMP_CWORD=str(len(words.split()) - 1))
        done = subprocess.run(FDMIG, env=env, capture_output=True, text=True, timeout=30)
        assert done.stdout.split() == [f"plain,{item}" for item in offered], (words, done.stdout, done.stderr)
