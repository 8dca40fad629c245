"""The shell commands a migration runs to move its connections' address
(--release-cmd, --claim-cmd, --reclaim-cmd): run as the instance runs them,
the loop serving meanwhile."""

import asyncio
import logging
import time

import pytest

from fdmig import process
from fdmig.migration import repair


def run_hook(command: str):
    return asyncio.run(repair.hook("--claim-cmd", command))


def test_a_hook_s_output_goes_to_the_log_both_streams(caplog):
    with caplog.at_level(logging.INFO, logger="fdmig"):
        run_hook("echo out; echo err >&2")
    assert "--claim-cmd: out" in caplog.text and "--claim-cmd: err" in caplog.text
    assert "--claim-cmd done: echo out; echo err >&2" in caplog.text


@pytest.mark.parametrize("command, why", [("echo no route >&2; exit 3", "exit status 3"),
                                          ("kill -TERM $$", "signal 15")])
def test_a_failing_hook_says_how_it_ended_and_its_last_line(command, why):
    with pytest.raises(repair.HookFailed) as failed:
        run_hook(command)
    assert str(failed.value).startswith(f"--claim-cmd failed ({why})")
    if "exit 3" in command:
        assert str(failed.value).endswith(": no route")


@pytest.mark.timeout(20)
def test_a_hook_that_outlasts_its_time_is_killed_and_named(monkeypatch):
    monkeypatch.setattr(repair, "HOOK_TIMEOUT", 0.3)
    began = time.monotonic()
    with pytest.raises(repair.HookFailed, match=r"--claim-cmd did not finish within 0.3 s: sleep 30"):
        run_hook("sleep 30")
    assert time.monotonic() - began < 5


@pytest.mark.timeout(20)
def test_a_hook_is_done_when_its_shell_exits_whatever_it_left_running():
    # A child left in the background holds the output pipe open: reading it to
    # its end would wait out the child.
    began = time.monotonic()
    run_hook("sleep 10 & echo started")
    assert time.monotonic() - began < 5


def test_a_hook_s_output_is_kept_to_its_end_and_bounded():
    async def main():
        return await process.shell("head -c 300000 /dev/zero | tr '\\0' x; echo; echo last", 10)
    code, output = asyncio.run(main())
    assert code == 0 and output.endswith(b"x\nlast\n") and len(output) == process.OUTPUT_LIMIT


def test_the_loop_serves_while_a_hook_runs():
    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        ticker = asyncio.create_task(tick())
        await repair.hook("--release-cmd", "sleep 0.3")
        ticker.cancel()
        return ticks
    assert asyncio.run(main()) >= 10
