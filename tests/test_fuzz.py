"""The atheris harnesses in tests/fuzz: the committed corpus replayed in-process,
and a bounded fuzz run of each harness.

The fuzz runs take FDMIG_FUZZ_SECONDS each (default 20) over a copy of the
committed corpus in tmp_path, so the repository is never modified. A harness
that exits non-zero found a crash (or a hang, or ran out of memory): the test
fails with the crashing input's path and the traceback. See tests/fuzz/README.md
for long runs.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import atheris
except ImportError:
    atheris = None

FUZZ_DIR = Path(__file__).parent / "fuzz"
ROOT = Path(__file__).parent.parent
HARNESSES = ("wire", "qmp", "tcpstate")
SECONDS = int(os.environ.get("FDMIG_FUZZ_SECONDS") or 20)
# libFuzzer stops at -max_total_time; the margin covers interpreter start-up, the
# first pass over the corpus and writing the stats.
SUBPROCESS_TIMEOUT = SECONDS + 90

needs_atheris = pytest.mark.skipif(atheris is None, reason="atheris is not installed (pip install atheris)")


def load_harness(name: str):
    """tests/fuzz/fuzz_<name>.py as a module: importing it does not start the fuzzer."""
    spec = importlib.util.spec_from_file_location(f"fdmig_fuzz_{name}", FUZZ_DIR / f"fuzz_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus_files(name: str) -> list[Path]:
    return sorted(p for p in (FUZZ_DIR / "corpus" / name).iterdir() if p.is_file())


def run_fuzzer(script: Path, corpus: Path, artifacts: Path, seconds: int, timeout: float):
    """Runs one harness under atheris; returns (exit code, its output)."""
    cmd = [sys.executable, str(script), str(corpus),
           f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048",
           f"-artifact_prefix={artifacts}{os.sep}", "-print_final_stats=1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                          cwd=artifacts.parent, env=env)
    return proc.returncode, proc.stdout.decode(errors="replace")


def summary(output: str) -> str:
    """The lines worth keeping from libFuzzer's output: coverage, rate, corpus."""
    keep = [line for line in output.splitlines()
            if line.startswith(("#", "stat::")) and ("INITED" in line or "DONE" in line or "stat::" in line)]
    return "\n".join(keep)


def crash_report(output: str, artifacts: Path) -> str:
    inputs = sorted(artifacts.iterdir())
    lines = [f"crashing input: {path} ({path.stat().st_size} bytes): {path.read_bytes()[:256].hex()}"
             for path in inputs] or ["no crashing input was written"]
    # From atheris' "=== Uncaught Python exception: ===" to the end, else the tail.
    start = output.find("=== Uncaught Python exception")
    tail = output[start:] if start >= 0 else "\n".join(output.splitlines()[-60:])
    return "\n".join(lines) + "\n" + tail


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", HARNESSES)
def test_the_committed_corpus_replays_cleanly(name):
    harness = load_harness(name)
    files = corpus_files(name)
    assert files, f"tests/fuzz/corpus/{name} is empty"
    for path in files:
        try:
            harness.TestOneInput(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path} ({path.stat().st_size} bytes) fails: {exc!r}") from exc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", HARNESSES)
def test_the_seeds_are_in_the_committed_corpus(name):
    """The seed generator (--make-seeds) and the committed seeds agree."""
    harness = load_harness(name)
    committed = {p.name: p.read_bytes() for p in corpus_files(name)}
    for seed_name, data, *_ in harness.seeds():
        assert committed.get(f"seed-{seed_name}") == data, f"seed-{seed_name}: rerun --make-seeds"


@needs_atheris
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", HARNESSES)
def test_the_pure_python_provider_matches_atheris(name):
    """Replaying without atheris reads each input as the fuzzer did."""
    import random

    harness = load_harness(name)
    rng = random.Random(1234)
    ranges = [(0, 0), (0, 1), (0, 3), (1, 256), (0, 511), (0, 9), (1, 300), (-5, 5), (0, 1 << 20), (0, (1 << 40) - 1)]
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(0, 40))
        ours, theirs = harness.PyDataProvider(data), atheris.FuzzedDataProvider(data)
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.3:
                count = rng.randrange(0, 10)
                assert ours.ConsumeBytes(count) == theirs.ConsumeBytes(count)
            else:
                lo, hi = rng.choice(ranges)
                assert ours.ConsumeIntInRange(lo, hi) == theirs.ConsumeIntInRange(lo, hi)
            assert ours.remaining_bytes() == theirs.remaining_bytes()


@needs_atheris
@pytest.mark.timeout(SUBPROCESS_TIMEOUT + 30)
@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz_for_a_bounded_time(name, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ_DIR / "corpus" / name, corpus)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    code, output = run_fuzzer(FUZZ_DIR / f"fuzz_{name}.py", corpus, artifacts, SECONDS, SUBPROCESS_TIMEOUT)
    print(f"fuzz_{name}.py, {SECONDS} s:\n{summary(output)}")
    if code != 0:
        pytest.fail(f"fuzz_{name}.py exited {code}\n{crash_report(output, artifacts)}", pytrace=False)
    assert "DONE" in output, output[-2000:]
