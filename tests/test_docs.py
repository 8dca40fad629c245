"""The documentation keeps up with the code: a man page for every command that
documents every option, pages that render without a warning, shell completion
that comes from the installed fdmig (`fdmig completion SHELL`, and loaders in
completions/ that ask it) and works in real bash, zsh and fish against a
running instance, and a README a newcomer reads through, whose examples run as
written."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import click
import pytest

from fdmig import __version__
from fdmig.chardev import STATES
from fdmig.cli import main
from fdmig.spec import _KEYS as SPEC_KEYS
from tests.helpers import needs, require, run

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
COMPLETIONS = ROOT / "completions"

# Page name -> click command: `fdmig` itself and one page per subcommand.
COMMAND_PAGES = {"fdmig": main, **{f"fdmig-{name}": command for name, command in main.commands.items()}}
ALL_PAGES = sorted(MAN.glob("*.[1-9]"))
COMPLETION_FILES = {"bash": "fdmig.bash", "zsh": "_fdmig", "fish": "fdmig.fish"}

# Also run against the lowest click, rich and psutil pyproject admits (.ci/floor.txt).
pytestmark = pytest.mark.cli


# ----- reading roff ----------------------------------------------------------

_ESCAPES = [
    (re.compile(r"\\f(\[[^]]*\]|\(..|.)"), ""),  # font changes: \fB \fI \fR \fP \f(CW \f[B]
    (re.compile(r"\\\((aq|dq|lq|rq|bu|ti|ha)"), lambda m: {"aq": "'", "dq": '"', "lq": '"', "rq": '"',
                                                         "bu": "*", "ti": "~", "ha": "^"}[m.group(1)]),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&:c|^%]"), ""),  # zero-width: \& \: \c \| \^ \%
    (re.compile(r"\\ "), " "),
]


def plain(roff: str) -> str:
    """Roff source text with escapes resolved, as a reader sees the words."""
    for pattern, replacement in _ESCAPES:
        roff = pattern.sub(replacement, roff)
    return roff


def sections(page: Path) -> dict[str, list[str]]:
    """The page's source lines by .SH section (comments dropped)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in page.read_text().splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith(".SH"):
            current = line[3:].strip().strip('"')
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def macro_args(text: str) -> list[str]:
    """Split a macro's arguments as troff does: at spaces, "quoted" ones whole,
    an escaped space (\\ ) inside an argument."""
    return [a[1:-1].replace('""', '"') if a.startswith('"') else a
            for a in re.findall(r'"(?:[^"]|"")*"|(?:\\.|[^\s\\])+', text)]


def line_text(line: str) -> str:
    """One source line as plain text: font macros applied (.BR joins its arguments
    with no space, .B with spaces), escapes resolved."""
    match = re.match(r"^\.(B|I|BR|RB|BI|IB|IR|RI)(?:\s+(.*))?$", line)
    if not match:
        return plain(line)
    args = macro_args(match.group(2) or "")
    return plain(("" if len(match.group(1)) == 2 else " ").join(args))


def tp_tags(lines: list[str]) -> list[str]:
    """The tag line of every .TP paragraph, as plain text."""
    return [line_text(tag) for before, tag in zip(lines, lines[1:]) if before.strip() == ".TP"]


def words_of(lines: list[str]) -> set[str]:
    return set(re.findall(r"[\w.=-]+", plain("\n".join(lines))))


def option_strings(command: click.Command, parent: click.Context | None = None) -> list[str]:
    """Every option string the command accepts, -h/--help included (from the group's
    context settings, which subcommands inherit)."""
    ctx = click.Context(command, info_name=command.name, parent=parent, **command.context_settings)
    names = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            names += param.opts + param.secondary_opts
    return names


# ----- (a) every command has a page, every option is documented ------------------

def test_every_subcommand_has_a_man_page():
    missing = [page for page in COMMAND_PAGES if not (MAN / f"{page}.1").is_file()]
    assert not missing, f"no man page for: {', '.join(missing)}"


def test_no_man_page_for_a_command_that_does_not_exist():
    pages = {p.stem for p in MAN.glob("fdmig*.1")}
    assert pages <= set(COMMAND_PAGES), f"pages without a command: {sorted(pages - set(COMMAND_PAGES))}"


@pytest.mark.parametrize("page", sorted(COMMAND_PAGES))
def test_man_page_documents_every_option_in_options(page):
    command = COMMAND_PAGES[page]
    parent = None if command is main else click.Context(main, info_name="fdmig", **main.context_settings)
    expected = option_strings(command, parent)
    assert "--help" in expected and "-h" in expected
    options = sections(MAN / f"{page}.1").get("OPTIONS")
    assert options is not None, f"{page}.1 has no OPTIONS section"
    documented = set()
    for tag in tp_tags(options):
        documented.update(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", tag))
    missing = [opt for opt in expected if opt not in documented]
    assert not missing, f"{page}.1 OPTIONS has no .TP entry for {', '.join(missing)}"
    unknown = sorted(documented - set(expected))
    assert not unknown, f"{page}.1 OPTIONS documents options the command lacks: {', '.join(unknown)}"


@pytest.mark.parametrize("page", sorted(p for p in COMMAND_PAGES if p != "fdmig"))
def test_man_page_synopsis_names_the_command_and_its_arguments(page):
    command = COMMAND_PAGES[page]
    synopsis = plain("\n".join(sections(MAN / f"{page}.1")["SYNOPSIS"]))
    assert f"fdmig {command.name}" in synopsis
    for param in command.params:
        if isinstance(param, click.Argument):
            for word in re.findall(r"[A-Z][A-Z_]+", param.metavar or param.name.upper()):
                assert word in synopsis, f"{page}.1 SYNOPSIS lacks the argument {word}"


def test_fdmig_page_documents_every_spec_key_state_and_exit_code():
    page = sections(MAN / "fdmig.1")
    keys = {tag.split("=")[0] for tag in tp_tags(page["CHARDEV SPECIFICATION"])}
    assert set(SPEC_KEYS) <= keys, f"SPEC keys not documented: {sorted(set(SPEC_KEYS) - keys)}"
    assert set(STATES) <= set(tp_tags(page["CHARDEV STATES"]))
    assert {"0", "1", "2", "3", "4"} <= set(tp_tags(page["EXIT STATUS"]))
    environment = " ".join(tp_tags(page["ENVIRONMENT"]))
    for variable in ("FDMIG_RUNTIME_DIR", "XDG_RUNTIME_DIR", "NOTIFY_SOCKET",
                     "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        assert variable in environment
    files = " ".join(tp_tags(page["FILES"]))
    for name in ("runtime-dir", "runtime-dir/name.sock", "runtime-dir/name.migrate.sock"):
        assert name in files


# ----- (b) pages render cleanly and have the sections a reader looks for ---------

def _render_command(page: Path) -> list[str] | None:
    if shutil.which("man"):
        return ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)]
    if shutil.which("groff"):
        return ["groff", "-ww", "-man", "-z", str(page)]
    return None


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page):
    command = _render_command(page)
    if command is None:
        require("man")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "MAN"))}
    env.update(LC_ALL="C.UTF-8", MANWIDTH="80")
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    assert result.stderr == "", f"{' '.join(command)} warns:\n{result.stderr}"


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.name)
def test_man_page_has_the_standard_sections(page):
    found = sections(page)
    if page.suffix == ".1":
        wanted = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "EXAMPLES", "SEE ALSO"]
    else:
        wanted = ["NAME", "DESCRIPTION", "EXAMPLES", "SEE ALSO"]
    missing = [name for name in wanted if name not in found]
    assert not missing, f"{page.name} lacks {', '.join(missing)}"
    names = [name for name in found if name in wanted]
    assert names == wanted, f"{page.name}: sections out of the usual order: {names}"


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.name)
def test_man_page_header_names_the_page_and_the_version(page):
    th = next(line for line in page.read_text().splitlines() if line.startswith(".TH "))
    title, section, _date, source, *_ = shlex.split(plain(th))[1:]
    assert (title, section) == (page.stem.upper(), page.suffix[1:])
    assert source == f"fdmig {__version__}", f"{page.name}: .TH says {source!r}; fdmig is {__version__}"


def test_man_pages_cross_reference_only_pages_that_exist():
    ours = {p.stem: p.suffix[1:] for p in ALL_PAGES}
    for page in ALL_PAGES:
        for name, section in re.findall(r"(fdmig[\w-]*)\((\d)\)", plain(page.read_text())):
            assert ours.get(name) == section, f"{page.name} refers to {name}({section}), which is not in man/"


# ----- (c) completion: the script comes from the installed fdmig -------------------

def _fdmig_shim(directory: Path) -> Path:
    """A `fdmig` for PATH that runs this interpreter's fdmig: the console script pip
    installed beside it, else the CLI through `python -c` under the same name."""
    script = Path(sysconfig.get_path("scripts")) / "fdmig"
    if os.access(script, os.X_OK):
        body = f'exec {shlex.quote(str(script))} "$@"\n'
    else:
        code = "from fdmig.cli import main; main(prog_name='fdmig')"
        body = f'exec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n'
    directory.mkdir(exist_ok=True)
    shim = directory / "fdmig"
    shim.write_text("#!/bin/sh\n" + body)
    shim.chmod(0o755)
    return shim


@pytest.fixture(scope="module")
def fdmig_bin(tmp_path_factory) -> Path:
    return _fdmig_shim(tmp_path_factory.mktemp("bin")).parent


def fdmig_says(args: list[str], fdmig_bin: Path, **env) -> str:
    """What the fdmig in fdmig_bin prints to stdout (it must exit 0)."""
    result = subprocess.run([str(fdmig_bin / "fdmig"), *args], env=dict(os.environ, **env),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_completions_folder_holds_only_loaders_that_ask_the_installed_fdmig():
    # Regression (issue 9): scripts generated with one click and committed here went
    # stale under another click, whose fish protocol differs.
    assert sorted(p.name for p in COMPLETIONS.iterdir()) == sorted(COMPLETION_FILES.values())
    for shell, name in COMPLETION_FILES.items():
        loader = (COMPLETIONS / name).read_text()
        assert f"fdmig completion {shell}" in loader, f"completions/{name} does not ask fdmig for its script"
        assert "_FDMIG_COMPLETE" not in loader, f"completions/{name} holds a copy of a generated script"


@pytest.mark.parametrize("shell", sorted(COMPLETION_FILES))
def test_completion_command_prints_clicks_script_for_fdmig(shell, fdmig_bin):
    printed = fdmig_says(["completion", shell], fdmig_bin)
    assert "_FDMIG_COMPLETE" in printed and "_fdmig_completion" in printed, printed
    # What click itself hands a shell that asks with the complete variable.
    assert printed.rstrip("\n") == fdmig_says([], fdmig_bin, _FDMIG_COMPLETE=f"{shell}_source").rstrip("\n")


def test_completion_command_names_the_shells_it_knows():
    result = run("completion", "tcsh")
    assert result.returncode == 2
    assert all(shell in result.stderr for shell in ("bash", "zsh", "fish")), result.stderr


_SYNTAX_CHECK = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}


@pytest.mark.parametrize("load", ["command", "loader"])
@pytest.mark.parametrize("shell", sorted(COMPLETION_FILES))
def test_completion_script_parses_in_its_shell(shell, load, fdmig_bin, tmp_path):
    require(shell)
    if load == "loader":
        script = COMPLETIONS / COMPLETION_FILES[shell]
    else:
        script = tmp_path / COMPLETION_FILES[shell]
        script.write_text(fdmig_says(["completion", shell], fdmig_bin))
    result = subprocess.run(_SYNTAX_CHECK[shell] + [str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, (
        f"{shell} cannot parse the {load}'s script (click {click_version()}):\n{result.stderr}")


def click_version() -> str:
    from importlib.metadata import version
    return version("click")


# ----- (d) completion works for real, in each shell, loaded either way -------------
# "loader": the file in completions/, as a user installs it; "command": the line
# the README gives for the shell's rc file.

def _shell_env(fdmig_bin: Path) -> dict:
    return dict(os.environ, PATH=f"{fdmig_bin}{os.pathsep}{os.environ.get('PATH', '')}")


def bash_complete(words: list[str], fdmig_bin: Path, load: str = "loader", line: str | None = None) -> list[str]:
    """Load fdmig's completion in a real bash, complete `words` (the last one is the
    word under the cursor, split as bash splits them) of `line` (the words joined
    by spaces unless given) and return what bash would offer."""
    script = "\n".join([
        f"source {shlex.quote(str(COMPLETIONS / 'fdmig.bash'))}" if load == "loader"
        else 'eval "$(fdmig completion bash)"',
        "complete -p fdmig >&2",
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
        f"COMP_CWORD={len(words) - 1}",
        f"COMP_LINE={shlex.quote(' '.join(words) if line is None else line)}",
        "COMP_POINT=${#COMP_LINE}",
        "COMPREPLY=()",
        "_fdmig_completion fdmig",
        'printf "%s\\n" "${COMPREPLY[@]}"',
    ])
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=_shell_env(fdmig_bin),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "_fdmig_completion" in result.stderr, f"the script registered no completion: {result.stderr}"
    return [line for line in result.stdout.splitlines() if line]


# compadd and _describe work only inside a completion widget, which needs a
# terminal; these stand-ins print what they are asked to offer instead.
_ZSH_OFFER = r"""
compadd() { local a; for a; do [[ ${(Pt)a} == array* ]] && print -rl -- "${(@P)a}"; done; return 0 }
_describe() { local a; for a; do [[ ${(Pt)a} == array* ]] && print -rl -- "${(@)${(@P)a}%%:*}"; done; return 0 }
"""


def zsh_complete(words: list[str], fdmig_bin: Path, load: str = "loader") -> list[str]:
    """Load fdmig's completion in a real zsh with compinit (the loader autoloaded
    from $fpath), run the function compinit calls for fdmig with `words` (the last
    one under the cursor) and return what it offers."""
    script = "\n".join([
        f"fpath=({shlex.quote(str(COMPLETIONS))} $fpath)" if load == "loader" else "",
        "autoload -U compinit && compinit -u -D",
        'eval "$(fdmig completion zsh)"' if load == "command" else "",
        'print -r -- "completer=$_comps[fdmig]" >&2',
        _ZSH_OFFER,
        f"words=({' '.join(shlex.quote(w) for w in words)})",
        f"CURRENT={len(words)}",
        '"$_comps[fdmig]"',
    ])
    result = subprocess.run(["zsh", "-f", "-c", script], env=_shell_env(fdmig_bin),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    expected = "completer=_fdmig" if load == "loader" else "completer=_fdmig_completion"
    assert expected in result.stderr.splitlines(), f"compinit did not take fdmig's completion: {result.stderr}"
    return [line for line in result.stdout.splitlines() if line]


def fish_complete(line: str, fdmig_bin: Path, load: str = "loader") -> list[str]:
    """What a real fish offers for the command line `line` with fdmig's completion
    loaded (the loader autoloaded from fish_complete_path); values only,
    descriptions dropped."""
    if load == "loader":
        setup = f"set -p fish_complete_path {shlex.quote(str(COMPLETIONS))}"
    else:
        setup = "fdmig completion fish | source"
    script = f"{setup}; complete -C {shlex.quote(line)}"
    result = subprocess.run(["fish", "--no-config", "-c", script], env=_shell_env(fdmig_bin),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return [line.split("\t")[0] for line in result.stdout.splitlines() if line]


def _serve_app_and_db(daemons, short_dir):
    daemons("serve", "--chardev", f"id=app,path={short_dir}/app.sock,server=on",
            "--chardev", f"id=db,path={short_dir}/db.sock,server=on", ready=False)
    result = run("status", "--wait", "db=listening", "--timeout", "10", timeout=20)
    assert result.returncode == 0, result.stderr


@needs("bash")
@pytest.mark.parametrize("load", ["loader", "command"])
def test_bash_completion_offers_subcommands(fdmig_bin, runtime_dir, load):
    assert bash_complete(["fdmig", "det"], fdmig_bin, load) == ["detach"]


@needs("bash")
@pytest.mark.parametrize("load", ["loader", "command"])
def test_bash_completion_offers_labels_and_instance_name_of_running_instance(
        daemons, short_dir, runtime_dir, fdmig_bin, load):
    _serve_app_and_db(daemons, short_dir)
    assert bash_complete(["fdmig", "detach", ""], fdmig_bin, load) == ["app", "db"]
    assert bash_complete(["fdmig", "detach", "--name", ""], fdmig_bin, load) == ["default"]


@needs("bash")
def test_bash_completion_goes_on_past_a_spec_s_first_key(fdmig_bin, runtime_dir):
    # bash splits the word under the cursor at '=': it replaces what follows the
    # last one, so that is what is offered, and a key's '=' or a backend's ','
    # stays in what it offers.
    line = "fdmig serve --chardev socket,id=app,pa"
    assert bash_complete(["fdmig", "serve", "--chardev", "socket,id", "=", "app,pa"], fdmig_bin,
                         line=line) == ["app,path="]
    line = "fdmig run --chardev udp,id=dns,port=53,localp"
    assert bash_complete(["fdmig", "run", "--chardev", "udp,id", "=", "dns,port", "=", "53,localp"],
                         fdmig_bin, line=line) == ["53,localport="]
    assert bash_complete(["fdmig", "serve", "--chardev", "socket,i"], fdmig_bin) == ["socket,id="]
    assert bash_complete(["fdmig", "attach", "se"], fdmig_bin) == ["serial,"]


@needs("zsh")
@pytest.mark.parametrize("load", ["loader", "command"])
def test_zsh_completion_offers_subcommands_and_labels_of_running_instance(
        daemons, short_dir, runtime_dir, fdmig_bin, load):
    assert zsh_complete(["fdmig", "det"], fdmig_bin, load) == ["detach"]
    _serve_app_and_db(daemons, short_dir)
    assert zsh_complete(["fdmig", "detach", ""], fdmig_bin, load) == ["app", "db"]
    assert zsh_complete(["fdmig", "detach", "--name", ""], fdmig_bin, load) == ["default"]


def test_wheel_installs_every_man_page_under_share_man(tmp_path):
    import zipfile
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path), str(repo)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("fdmig-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    pages = sorted(p.name for p in (repo / "man").iterdir() if p.suffix in (".1", ".7"))
    for page in pages:
        section = page.rsplit(".", 1)[1]
        assert any(n.endswith(f".data/data/share/man/man{section}/{page}") for n in names), page


@needs("fish")
@pytest.mark.parametrize("load", ["loader", "command"])
def test_fish_completion_offers_subcommands_and_labels_of_running_instance(
        daemons, short_dir, runtime_dir, fdmig_bin, load):
    # Regression: click 8.4.0 and 8.4.1's own fish script cannot run (pallets/click#3502).
    assert fish_complete("fdmig det", fdmig_bin, load) == ["detach"]
    _serve_app_and_db(daemons, short_dir)
    assert fish_complete("fdmig detach ", fdmig_bin, load) == ["app", "db"]
    assert fish_complete("fdmig detach --name ", fdmig_bin, load) == ["default"]


# ----- (e) the README: a newcomer's document, whose examples run as written ----------

README = ROOT / "README.md"
# The quick start: one command to see it work, one to test it, each one line.
QUICK_START = [
    "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/fdmig demo",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest",
]


def readme_section(heading: str) -> str:
    """The text under the README's `## heading`, up to the next heading of that level."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no section '## {heading}'"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_readme_is_short_enough_to_read_through():
    lines = README.read_text().splitlines()
    assert len(lines) <= 400, f"README.md has {len(lines)} lines; at most 400"
    performance = readme_section("Performance").rstrip("\n").splitlines()
    assert len(performance) + 1 <= 60, f"README's Performance has {len(performance) + 1} lines; at most 60"


def test_readme_first_screen_shows_the_quick_start_verbatim_each_command_one_line():
    first_screen = README.read_text().splitlines()[:40]
    for command in QUICK_START:
        assert command in first_screen, f"the README's first 40 lines lack, as a line of its own: {command}"


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert QUICK_START[1] in ci, f".ci/run does not run the README's test command: {QUICK_START[1]}"


def test_readme_refers_only_to_man_pages_that_exist_and_names_the_new_ones():
    text = README.read_text()
    ours = {p.stem: p.suffix[1:] for p in ALL_PAGES}
    for name, section in re.findall(r"(fdmig[\w-]*)\((\d)\)", text):
        assert ours.get(name) == section, f"README refers to {name}({section}), which is not in man/"
    for page in ("fdmig-performance(7)", "fdmig-systemd(7)", "fdmig(1)"):
        assert page in text


def test_readme_walk_through_starts_no_target_that_dies_with_its_terminal():
    # Regression (issue 21): `fdmig migrate-in &` in a terminal is killed with it (SIGHUP).
    text = README.read_text()
    assert not re.search(r"migrate-in[^\n]*&\s*$", text, re.M), "a target started in the background of a shell"
    assert "fdmig migrate-out --spawn" in text and "fdmig stop" in text and "fdmig list" in text


def test_readme_tells_a_newcomer_what_the_examples_assume():
    # Regression: a new user's report. The quick start installs into .venv, and
    # the rest says `fdmig`; server.py is run as ./server.py by `run --help`;
    # the runtime dir of root; a `fdmig run` that dies with its terminal; gunicorn
    # saying READY=1 before its workers import the application.
    quick_start = readme_section("Quick start")
    assert ". .venv/bin/activate" in quick_start
    section = readme_section("Keep your program's connections across its restarts")
    (program,) = [block for block in code_blocks(section, "python") if "# server.py" in block]
    assert program.startswith("#!/usr/bin/env python3\n")
    assert "chmod +x server.py" in section
    assert "SIGHUP" in section and "setsid -f fdmig run" in section and "fdmig-systemd(7)" in section
    (gunicorn,) = [line for line in section.splitlines() if line.startswith("| gunicorn |")]
    assert "--notify" in gunicorn and "--ready-delay 1" in gunicorn and "--preload" in gunicorn
    text = README.read_text()
    for directory in ("$FDMIG_RUNTIME_DIR", "$XDG_RUNTIME_DIR/fdmig", "/run/fdmig", "/tmp/fdmig-UID"):
        assert directory in text, f"README does not name the runtime dir {directory}"


@pytest.mark.timeout(120)
def test_readme_server_py_loses_no_record_of_fast_clients_through_restarts(daemons, runtime_dir, tmp_path):
    """The README's server.py under the README's own `fdmig run` line: fast clients
    stream through ten restarts, and every record comes back once, in order. A
    server killed by SIGTERM between its recv and its sendall (the README's before
    issue 21) lost a record in about one restart of six."""
    from tests.helpers import Stream, free_port, status_of
    section = readme_section("Keep your program's connections across its restarts")
    (program,) = [block for block in code_blocks(section, "python")
                  if block.startswith("#!/usr/bin/env python3\n# server.py")]
    (server := tmp_path / "server.py").write_text(program)
    (line,) = [line for block in code_blocks(section, "sh") for line in block.splitlines()
               if line.startswith("fdmig run ")]
    words = shlex.split(line.split("#")[0])
    assert words[-3:] == ["--", "python3", "server.py"], words
    port = free_port()
    options = [re.sub(r"port=\d+", f"port={port}", word) for word in words[2:-3]]
    name = options[options.index("--name") + 1]
    daemon = daemons("run", *options, "--", sys.executable, str(server), cwd=tmp_path)

    streams = [Stream(socket.create_connection(("127.0.0.1", port), timeout=10)) for _ in range(3)]
    control = os.path.join(runtime_dir, f"{name}.sock")
    try:
        for stream in streams:
            stream.wait_echoed(100)
        pids = {status_of(control)["service"]["pid"]}
        for _ in range(10):
            result = run("restart", "--name", name, timeout=60)
            assert result.returncode == 0, result.stderr
            pids.add(status_of(control)["service"]["pid"])
            for stream in streams:  # the new program echoes, and nothing before it was lost
                stream.wait_echoed(stream.sent + 1)
        assert len(pids) == 11
        assert len(status_of(control)["stored"]) == 3
        assert all(stream.finish() > 100 for stream in streams)
    except AssertionError as failure:
        raise AssertionError(f"{failure}\nfdmig run's log:\n{daemon.stderr()[-4000:]}") from None
