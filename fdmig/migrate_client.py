"""migrate-out as a control client: set capabilities, optionally spawn the target,
ask the source to migrate, and wait until the target serves and the source is gone."""

import os
import shutil
import subprocess
import sys
import time

from fdmig import paths, qmp
from fdmig.errors import FdmigError, NoInstanceError, TimeoutExpired

# Beyond the source's own timeout, how long we wait for it to exit and for the
# target to answer on the control path.
HANDOVER_GRACE = 10.0


def fdmig_command() -> list[str]:
    """The fdmig found on PATH (a freshly installed version takes over), else ours."""
    found = shutil.which("fdmig")
    return [found] if found else [sys.executable, "-m", "fdmig"]


def spawn_target(instance_args: list[str], channel_path: str) -> subprocess.Popen:
    argv = fdmig_command() + ["migrate-in", *instance_args, "--channel", f"unix:{channel_path}"]
    # Its own session, our stderr: under systemd its log reaches the journal. Its
    # stdout is our stderr too (it prints nothing there), so that a script's
    # $(fdmig migrate-out --spawn --json) returns when we do, not when it exits.
    return subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno())


def wait_exit(pid: int, deadline: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        import select
        return bool(select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0])
    finally:
        os.close(fd)


def wait_target(control_path: str, source_pid: int, deadline: float) -> dict:
    """The target's status once it answers on the control path."""
    while True:
        try:
            with qmp.connect(control_path, timeout=2) as client:
                status = client.execute("x-fdmig-status")
            if status["pid"] != source_pid:
                return status
        except (NoInstanceError, FdmigError, OSError):
            pass
        if time.monotonic() >= deadline:
            raise TimeoutExpired(f"the target did not answer on {control_path} in time")
        time.sleep(0.02)  # the target binds the path right after it resumes


def migrate_out(control_path, channel_path, capabilities, timeout, spawn, instance_args) -> dict:
    notes = []
    target_proc = None
    with qmp.connect(control_path) as client:
        before = client.execute("x-fdmig-status")
        source_pid = before["pid"]
        if capabilities:
            client.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": c, "state": True} for c in capabilities]})
        caps = {c["capability"]: c["state"] for c in client.execute("query-migrate-capabilities")}
        marked = [c["label"] for c in before["chardevs"] if c["support-local-migration"]]
        if not caps.get("local-char-socket") and marked:
            notes.append(f"capability local-char-socket is off: {len(marked)} marked chardev(s) "
                         f"({', '.join(marked[:5])}{', ...' if len(marked) > 5 else ''}) will reconnect "
                         "instead of moving live")
        if spawn:
            target_proc = spawn_target(instance_args, channel_path)
        try:
            client.execute("migrate", {"uri": f"unix:{channel_path}", "x-fdmig-timeout": timeout})
            deadline = time.monotonic() + timeout + HANDOVER_GRACE
            while True:
                try:
                    event = client.wait_event({"MIGRATION"}, deadline)
                except EOFError:
                    # The source died. If it had sent everything, the target took over.
                    data = _after_source_died(control_path, source_pid)
                    notes.append(f"the source (pid {source_pid}) died during the migration; "
                                 "the target took over what it had sent")
                    break
                data = event.get("data", {})
                if data.get("status") in ("completed", "failed", "cancelled"):
                    break
        except BaseException:
            _stop(target_proc)
            raise
    if data["status"] != "completed":
        _stop(target_proc)
        reason = data.get("x-fdmig-error") or data["status"]
        message = f"migration {data['status']}: {reason}; the source still serves every chardev"
        raise (TimeoutExpired if data.get("x-fdmig-timed-out") else FdmigError)(message)
    target = data.get("x-fdmig-target", {})
    deadline = time.monotonic() + HANDOVER_GRACE
    if not wait_exit(source_pid, deadline):
        raise TimeoutExpired(f"the source (pid {source_pid}) committed but has not exited")
    outcome = {"status": "completed", "source-pid": source_pid, "target-pid": target.get("pid"),
               "chardevs": data.get("x-fdmig-chardevs"), "downtime-ms": None, "total-ms": None,
               "notes": notes}
    if target.get("control", True):
        status = wait_target(control_path, source_pid, deadline)
        mig = status["migration"]
        outcome.update({"target-pid": status["pid"], "chardevs": mig["chardevs"],
                        "downtime-ms": mig["downtime-ms"], "total-ms": mig["total-ms"]})
        outcome["summary"] = (f"migrated {mig['chardevs']} chardev(s) live from pid {source_pid} to pid "
                              f"{status['pid']}: downtime {mig['downtime-ms']} ms, total {mig['total-ms']} ms")
    else:
        outcome["summary"] = (f"migrated {outcome['chardevs']} chardev(s) live from pid {source_pid} "
                              f"to pid {target.get('pid')}, which runs its own program now")
    return outcome


def _after_source_died(control_path: str, source_pid: int) -> dict:
    """A MIGRATION event's data as if the source had said how it ended."""
    deadline = time.monotonic() + HANDOVER_GRACE
    if not wait_exit(source_pid, deadline):
        raise FdmigError("the source closed its control connection before the migration ended")
    lost = FdmigError(f"the source (pid {source_pid}) died during the migration, before the target "
                      "had everything: its connections are lost")
    while True:
        try:
            status = wait_target(control_path, source_pid, min(deadline, time.monotonic() + 0.1))
            break
        except TimeoutExpired:
            if time.monotonic() >= deadline or _refused(paths.incoming_beside(control_path), source_pid):
                raise lost from None
    return {"status": "completed", "x-fdmig-chardevs": status["migration"]["chardevs"],
            "x-fdmig-target": {"pid": status["pid"], "control": True}}


def _refused(incoming_path: str, source_pid: int) -> bool:
    """Whether a target waiting at `incoming_path` has given up on that source."""
    try:
        with qmp.connect(incoming_path, timeout=2) as client:
            migration = client.execute("x-fdmig-status")["migration"]
    except (NoInstanceError, FdmigError, OSError):
        return False
    return migration.get("status") == "failed" and migration.get("source-pid") == source_pid


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
