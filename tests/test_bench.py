"""The benchmark runs end to end at a tiny size: no timing is asserted, only that
every figure is produced and written where the README says."""

import json
import subprocess
import sys

import pytest

from tests import netns
from tests.bench import handoff, s6
from tests.helpers import present


@pytest.mark.timeout(300)
def test_quick_benchmark_writes_its_table_json_and_figures(tmp_path):
    # The baselines from Debian packages are measured where they are installed (in CI, always).
    socat, haproxy, s6_tools = present("socat"), present("haproxy"), present(*s6.PROGRAMS)
    crosshost = present(*netns.PROGRAMS, "openssl") and netns.unavailable() is None
    result = subprocess.run([sys.executable, "-m", "tests.bench", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr
    assert "| chardevs | downtime (instance)" in result.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [row["n"] for row in data["handoff"]] == [1, 10]
    for row in data["handoff"]:
        assert row["downtime-ms"] > 0 and row["peer-pause-ms"] > 0 and row["floor-ms"] > 0
    assert data["bridge"]["fdmig-mib-s"] > 0 and data["reconnect-ms"] > 0
    # Each other backend moved live, its far ends timing their pause, beside its kernel floor.
    assert [row["backend"] for row in data["backends"]] == ["pty", "serial", "pipe", "udp", "file"]
    for row in data["backends"]:
        assert row["downtime-ms"] > 0 and row["floor-ms"] > 0
        assert (row["peer-pause-ms"] is None) == (row["backend"] == "file"), row
    assert "| backend | chardevs | downtime |" in result.stdout
    for row in (data["handoff"][-1], data["busy"][-1]):  # the status calls, idle and streaming peers
        assert row["status-pause-ms"] > 0 and row["status-quiet-pause-ms"] > 0 and row["status-parse-ms"] > 0
    assert "| chardevs | peers streaming | longest peer pause, 3 status calls |" in result.stdout
    # A mix of streaming and idle peers, each handoff's longest pause laid against what the
    # instances did meanwhile (fdmig.marks): both sides of every migration marked their steps.
    [mix] = data["mixed"]
    assert (mix["n"], mix["streaming"]) == (10, 2) and len(mix["where"]) == 2
    assert {"source table", "source quiesced", "target transfer to released", "target thaw"} <= set(mix["marked"])
    assert all(where["gap-ms"] > 0 for where in mix["where"])
    assert "| chardevs | streaming | downtime | longest pause |" in result.stdout
    if socat:
        assert data["bridge"]["socat-mib-s"] > 0
    if haproxy:
        assert data["bridge"]["haproxy-mib-s"] > 0
    if s6_tools:
        assert all(row["s6-ms"] > 0 for row in data["handoff"]), data["handoff"]
    assert set(data["startup-ms"]) == {"python3 -c pass", "fdmig --version", "fdmig status"}
    assert (tmp_path / "bench.md").read_text().startswith("Machine:")
    if crosshost:
        # Two connections: one peer doing ping-pong, one streaming.
        [row] = data["crosshost"]
        assert row["n"] == 2 and row["downtime-ms"] > 0 and row["reconnect-pause-ms"] > 0
        assert row["peer-pause-ms"] > 0 and row["stream-pause-ms"] > 0


def test_a_pause_is_laid_against_the_spans_it_overlaps(tmp_path):
    marks = tmp_path / "marks"
    marks.write_text("10.000 10.004 7 precopy\n10.003 10.010 8 target thaw\n10.020 10.030 7 gc0\n")
    where = handoff.what_ran(str(marks), (10.002, 10.012))
    assert where["gap-ms"] == 10.0
    assert list(where["spans"]) == ["target thaw", "precopy"]  # most covered first
    assert where["spans"]["target thaw"] == pytest.approx(7.0) and where["spans"]["precopy"] == pytest.approx(2.0)
