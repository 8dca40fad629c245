"""Packaging: the lowest versions pyproject.toml admits for the runtime
dependencies are the versions .ci/run proves them with (.ci/floor.txt), and
.ci/run installs every Debian package a test asks for, then lets none skip."""

import re
import tomllib
from pathlib import Path

from tests.helpers import DEBIAN_PACKAGES, REQUIRE_TOOLS

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ROOT / ".ci" / "floor.txt"
CI_RUN = ROOT / ".ci" / "run"

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_VERSION = r"[0-9]+(?:\.[0-9]+)*"


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """A release number without its trailing zeros: 8.1 and 8.1.0 are one version."""
    parts = [int(part) for part in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def lower_bounds() -> dict[str, str]:
    """Each runtime dependency's `>=` bound in pyproject.toml."""
    bounds = {}
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        match = re.fullmatch(rf"\s*({_NAME})\s*(?:\[[^]]*\])?\s*([^;]*?)\s*(?:;.*)?", requirement)
        assert match, f"pyproject.toml: cannot read the dependency {requirement!r}"
        versions = [spec.strip()[2:].strip() for spec in match[2].split(",") if spec.strip().startswith(">=")]
        assert len(versions) == 1 and re.fullmatch(_VERSION, versions[0]), (
            f"pyproject.toml: {requirement!r} needs exactly one lower bound, NAME>=X.Y")
        bounds[canonical(match[1])] = versions[0]
    return bounds


def floor_pins() -> dict[str, str]:
    """The `NAME==X.Y.Z` lines of .ci/floor.txt (comments and blank lines skipped)."""
    pins = {}
    for line in FLOOR.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(rf"({_NAME})\s*==\s*({_VERSION})", line)
        assert match, f".ci/floor.txt: {line!r} is not a NAME==X.Y.Z pin"
        assert canonical(match[1]) not in pins, f".ci/floor.txt pins {match[1]} twice"
        pins[canonical(match[1])] = match[2]
    return pins


def test_floor_pins_every_runtime_dependency_and_nothing_else():
    bounds, pins = lower_bounds(), floor_pins()
    assert sorted(pins) == sorted(bounds), (
        f".ci/floor.txt pins {sorted(pins)}; pyproject.toml depends on {sorted(bounds)}")


def test_floor_pins_are_the_lower_bounds_pyproject_admits():
    bounds, pins = lower_bounds(), floor_pins()
    disagree = [f"{name}: pyproject.toml >={bounds[name]}, .ci/floor.txt =={pins[name]}"
                for name in sorted(set(bounds) & set(pins)) if release(bounds[name]) != release(pins[name])]
    assert not disagree, ("pyproject.toml's lower bounds and the floor .ci/run tests with disagree:\n"
                          + "\n".join(disagree))


def ci_installs() -> dict[str, str]:
    """Each `command -v PROGRAM >/dev/null || need+=(PACKAGE)` line of .ci/run."""
    return dict(re.findall(r"^command -v (\S+) >/dev/null \|\| need\+=\((\S+)\)$", CI_RUN.read_text(), re.M))


def test_ci_installs_the_package_of_every_program_a_test_needs():
    installs = ci_installs()
    wrong = [f"{program}: tests/helpers.py says {DEBIAN_PACKAGES[program]}, .ci/run installs {package}"
             for program, package in installs.items() if DEBIAN_PACKAGES.get(program, package) != package]
    assert not wrong, "\n".join(wrong)
    missed = sorted(set(DEBIAN_PACKAGES.values()) - set(installs.values()))
    assert not missed, f".ci/run does not install {missed}, which tests/helpers.py's DEBIAN_PACKAGES names"


def test_ci_turns_a_skip_for_a_missing_program_into_a_failure_before_any_test_runs():
    lines = CI_RUN.read_text().splitlines()
    required = lines.index(f"export {REQUIRE_TOOLS}=1")
    runs = [n for n, line in enumerate(lines) if "-m pytest" in line and not line.lstrip().startswith("#")]
    assert runs and all(n > required for n in runs), f".ci/run runs pytest before it sets {REQUIRE_TOOLS}=1"
