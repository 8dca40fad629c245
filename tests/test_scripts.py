"""The scripts of the README and the man pages, run exactly as a user would
paste them."""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import needs

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
MAN = os.path.join(os.path.dirname(__file__), "..", "man")


def readme_block(heading: str) -> str:
    with open(README) as f:
        text = f.read()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def man_example(page: str, first_line: str) -> str:
    """The example of man/`page` (an .EX block) that begins with `first_line`, as
    a reader copies it from the rendered page."""
    from tests.test_docs import plain
    with open(os.path.join(MAN, page)) as f:
        blocks = re.findall(r"^\.EX\n(.*?)^\.EE\n", f.read(), re.S | re.M)
    (block,) = [block for block in blocks if block.startswith(first_line)]
    return plain(block)


@needs("jq", "socat")
def test_readme_smoke_script_passes(tmp_path):
    script = tmp_path / "smoke.sh"
    script.write_text(readme_block("Use in scripts"))
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("true") == 3


@needs("ip", "arping", "openssl")
def test_man_page_walk_through_removes_its_namespaces_when_a_step_fails(tmp_path):
    # Regression: its EXIT trap ran under set -e, and stopped at `kill` of a
    # target not started yet, leaving every namespace behind.
    from tests import netns
    why = netns.unavailable()
    if why is not None:
        pytest.skip(why)
    script = tmp_path / "walk.sh"
    script.write_text(man_example("fdmig-migrate-out.1", "set \\-e\nwork=$(mktemp"))
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "fdmig").write_text("#!/bin/sh\necho fdmig is broken here >&2\nexit 3\n")
    (broken / "fdmig").chmod(0o755)
    env = dict(os.environ, PATH=f"{broken}:{os.environ['PATH']}")
    env.pop("FDMIG_RUNTIME_DIR", None)
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "fdmig is broken here" in result.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"^fdmig-(sw|c|a|b)\b", left, re.M), left


@needs("ip", "arping", "openssl")
def test_man_page_walk_through_moves_a_live_tcp_connection_between_two_namespaces(tmp_path):
    """fdmig-migrate-out(1)'s cross-host walk-through, pasted into sh as root: the
    client streams through the migration and counts every record back."""
    from tests import netns
    why = netns.unavailable()
    if why is not None:
        pytest.skip(why)
    script = tmp_path / "walk.sh"
    script.write_text(man_example("fdmig-migrate-out.1", "set \\-e\nwork=$(mktemp"))
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    env.pop("FDMIG_RUNTIME_DIR", None)
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=90, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chardev(s) moved live with their TCP state, 0 reconnect there" in result.stdout
    assert re.search(r"client: \d{3,} records, each echoed once and in order", result.stdout), result.stdout
    assert "app" in result.stdout and "connected" in result.stdout
