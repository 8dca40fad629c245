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
    section = text.split(f"## {heading}\n", 1)[1]
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
