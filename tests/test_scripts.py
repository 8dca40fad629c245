"""The README's script for CI, run exactly as a user would paste it."""

import os
import re
import shutil
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_block(heading: str) -> str:
    with open(README) as f:
        text = f.read()
    section = text.split(f"#{'##' if heading.startswith('Live TCP') else '#'} {heading}\n", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not (shutil.which("jq") and shutil.which("socat")), reason="needs jq and socat")
def test_readme_smoke_script_passes(tmp_path):
    script = tmp_path / "smoke.sh"
    script.write_text(readme_block("Use in scripts"))
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("true") == 3


def test_readme_walk_through_moves_a_live_tcp_connection_between_two_namespaces(tmp_path):
    """The README's cross-host walk-through, pasted into sh as root: the client
    streams through the migration and counts every record back."""
    from tests import netns
    why = netns.unavailable()
    if why is not None or shutil.which("openssl") is None:
        pytest.skip(why or "needs openssl")
    script = tmp_path / "walk.sh"
    script.write_text(readme_block("Live TCP connections to another host: `x-tcp-repair`"))
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    env.pop("FDMIG_RUNTIME_DIR", None)
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=90, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chardev(s) moved live with their TCP state, 0 reconnect there" in result.stdout
    assert re.search(r"client: \d{3,} records, each echoed once and in order", result.stdout), result.stdout
    assert "app" in result.stdout and "connected" in result.stdout
