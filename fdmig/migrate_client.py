"""migrate-out as a control client: set capabilities, optionally spawn the target,
ask the source to migrate, and wait until the target serves and the source is gone.
SIGINT and SIGTERM cancel the migration (QMP migrate_cancel) and wait until the
source serves on; a spawned target that exits first fails it at once."""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import fdmig
from fdmig import lifecycle, paths, process, qmp
from fdmig.lifecycle import MigrationStatus
from fdmig.errors import FdmigError, NoInstanceError, TimeoutExpired

# Beyond the source's own timeout, how long we wait for it to exit and for the
# target to answer on the control path.
HANDOVER_GRACE = 10.0
# The statuses as the MIGRATION event and query-migrate spell them.
TERMINAL = {status.value for status in lifecycle.TERMINAL}
IN_PROGRESS = {status.value for status in lifecycle.IN_PROGRESS}
COMPLETED = MigrationStatus.COMPLETED.value


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while migrate-out waited."""


# Run as `python -P -c LAUNCH ROOT fdmig ARGS...` (ROOT: the package's), so that
# its command line reads `... fdmig migrate-in --name web` for ps and pgrep -f,
# and its name (comm) is fdmig, as a console script's is.
LAUNCH = ("import sys; sys.path.insert(0, sys.argv[1]); del sys.argv[1:3]; "
          "from fdmig import process; process.set_name('fdmig'); "
          "from fdmig.cli import main; main(prog_name='fdmig')")


def fdmig_command() -> list[str]:
    """This very fdmig: our interpreter, and the package this code was imported
    from (not whichever `fdmig` is first on PATH, nor one in the working directory)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fdmig.__file__)))
    return [sys.executable, "-P", "-c", LAUNCH, root, "fdmig"]


class Spawned:
    """A target started by `--spawn`: its own session, its stdout and stderr a pipe
    copied to our stderr (its last line kept) until it commits and takes up the
    source's own, its exit seen through a pidfd. No fd of ours goes to it: a
    script's $(fdmig migrate-out --spawn 2>&1) returns when we do."""

    def __init__(self, argv: list[str]):
        reader, writer = os.pipe()
        try:
            self.proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=writer,
                                         stderr=writer, env=dict(os.environ, **{paths.SPAWNED_ENV: "1"}))
        finally:
            os.close(writer)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.last_line = ""
        self._reader = reader
        self._copier = threading.Thread(target=self._copy, daemon=True)
        self._copier.start()

    def _copy(self) -> None:
        pending = b""
        while True:
            try:
                data = os.read(self._reader, 65536)
            except OSError:
                break
            if not data:
                break
            try:
                os.write(2, data)
            except OSError:
                pass
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.strip():
                    self.last_line = line.decode(errors="replace").strip()
        if pending.strip():
            self.last_line = pending.decode(errors="replace").strip()
        os.close(self._reader)

    def fileno(self) -> int:
        return self.pidfd

    def flush(self, timeout: float = 2.0) -> None:
        """Until what the target wrote before it took up the source's log is ours."""
        self._copier.join(timeout)

    def exit_reason(self) -> str:
        code = self.proc.wait()
        self._copier.join(2)
        status = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        line = f": {self.last_line}" if self.last_line else ""
        return f"the target (pid {self.proc.pid}) {status} before the commit{line}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close()

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def spawn_target(instance_args: list[str], address) -> Spawned:
    return Spawned(fdmig_command() + ["migrate-in", *instance_args, "--channel", address.uri])


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise Interrupted in the wait, once; while the
    cancellation runs, more of them are ignored."""
    def raise_interrupted(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)
    old = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


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


def _migrate_out(client, before, address, timeout, spawn, instance_args, announce, tls_creds, hooks, reconnect,
                 control_path, notes):
    """migrate_out's migration, once the capabilities asked for are set: the
    reply to `migrate` and the spawned target (or None)."""
    source_pid = before["pid"]
    target = None
    caps = {c["capability"]: c["state"] for c in client.execute("query-migrate-capabilities")}
    marked = [c["label"] for c in before["chardevs"] if c["support-local-migration"]]
    if address.tcp:
        unix = [c["label"] for c in before["chardevs"] if c["support-local-migration"]
                and not c["address"].startswith("tcp:")]
        if not caps.get("x-tcp-repair") and marked:
            notes.append(f"capability x-tcp-repair is off: {_some(marked)} will reconnect at the target "
                         "instead of moving live")
        elif unix:
            notes.append(f"{_some(unix)} will reconnect at the target: only TCP connections cross hosts")
    elif not caps.get("local-char-socket") and marked:
        notes.append(f"capability local-char-socket is off: {_some(marked)} will reconnect "
                     "instead of moving live")
    if spawn and address.tcp and caps.get("x-tcp-repair"):
        raise FdmigError("capability x-tcp-repair moves TCP connections to another host, but --spawn starts "
                         "the target on this one: start it there with fdmig migrate-in")
    try:
        if spawn:
            # A holder that keeps its fds in its manager's store has a successor that does.
            extra = (["--fdstore"] if before.get("fdstore") else []) + \
                (["--tls-creds", os.path.abspath(tls_creds)] if tls_creds else [])
            target = spawn_target(instance_args + extra, address)
        arguments = {"uri": address.uri, "x-fdmig-timeout": timeout}
        if tls_creds is not None:
            arguments["x-fdmig-tls-creds"] = os.path.abspath(tls_creds)
        for role, command in (hooks or {}).items():
            arguments[f"x-fdmig-{role}-cmd"] = command
        if reconnect:
            arguments["x-fdmig-reconnect"] = True
        default = not address.tcp and address.path == paths.channel_beside(control_path)
        hint = "".join(f" {shlex.quote(arg)}" for arg in instance_args +
                       ([] if default else ["--channel", address.uri]) +
                       (["--tls-creds", "DIR"] if address.tcp else []))
        data = _migrate(client, arguments, control_path,
                        source_pid, time.monotonic() + timeout + HANDOVER_GRACE, target, announce, notes, hint)
    except BaseException:
        if target is not None:
            target.stop()
        raise
    return data, target


def migrate_out(control_path, address, capabilities, timeout, spawn, instance_args, announce=None,
                tls_creds: str | None = None, hooks: dict | None = None, reconnect: bool = False) -> dict:
    """`announce(line)` is told, on a terminal, what the migration waits for.
    `reconnect`: marked chardevs that cannot move live reconnect instead of the
    migration being refused."""
    notes = []
    with qmp.connect(control_path) as client, interruptible():
        before = client.execute("x-fdmig-status")
        source_pid = before["pid"]
        # Set for this migration; a migration that does not happen leaves them as they were.
        turned_on = [c for c in capabilities if not before["capabilities"].get(c)]
        if capabilities:
            client.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": c, "state": True} for c in capabilities]})
        try:
            data, target = _migrate_out(client, before, address, timeout, spawn, instance_args, announce,
                                        tls_creds, hooks, reconnect, control_path, notes)
        except BaseException:
            if turned_on:
                try:
                    client.execute("migrate-set-capabilities",
                                   {"capabilities": [{"capability": c, "state": False} for c in turned_on]})
                except Exception:
                    pass  # the source has gone (or committed): nothing of ours to put back
            raise
    if target is not None:
        target.flush()
        target.close()
    target_info = data.get("x-fdmig-target") or {}
    deadline = time.monotonic() + HANDOVER_GRACE
    if not process.wait_exit_blocking(source_pid, deadline - time.monotonic()):
        raise TimeoutExpired(f"the source (pid {source_pid}) committed but has not exited")
    outcome = {"status": COMPLETED, "source-pid": source_pid, "target-pid": target_info.get("pid"),
               "chardevs": data.get("x-fdmig-chardevs"), "downtime-ms": None, "total-ms": None,
               "notes": notes}
    if address.tcp and target is None:
        # The target serves on its own host: what the source said is all there is here.
        live, fresh = data.get("x-fdmig-moved-live") or [], data.get("x-fdmig-reconnected") or []
        outcome.update({"downtime-ms": data.get("x-fdmig-downtime-ms"), "total-ms": data.get("x-fdmig-total-ms"),
                        "moved-live": live, "reconnected": fresh, "tcp-state": data.get("x-fdmig-tcp-state")})
        outcome["summary"] = (f"migrated to pid {target_info.get('pid')} on {address}: {len(live)} chardev(s) "
                              f"moved live with their TCP state, {len(fresh)} reconnect there; downtime "
                              f"{outcome['downtime-ms']} ms, total {outcome['total-ms']} ms")
    elif target_info.get("control", True):
        status = wait_target(control_path, source_pid, deadline)
        mig = status["migration"]
        outcome.update({"target-pid": status["pid"], "chardevs": mig["chardevs"],
                        "downtime-ms": mig["downtime-ms"], "total-ms": mig["total-ms"]})
        outcome["summary"] = (f"migrated {mig['chardevs']} chardev(s) live from pid {source_pid} to pid "
                              f"{status['pid']}: downtime {mig['downtime-ms']} ms, total {mig['total-ms']} ms")
    else:
        outcome["summary"] = (f"migrated {outcome['chardevs']} chardev(s) live from pid {source_pid} "
                              f"to pid {target_info.get('pid')}, which runs its own program now")
    return outcome


def _some(labels: list) -> str:
    """'N marked chardev(s) (a, b, ...)', at most five named."""
    return f"{len(labels)} marked chardev(s) ({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''})"


def _migrate(client, arguments, control_path, source_pid, deadline, target, announce, notes,
             instance_hint: str = "") -> dict:
    """Start the migration; the MIGRATION event's data once it completed. FdmigError
    (the source serving on) if it failed, was cancelled, or the spawned target
    exited first."""
    wake = [target] if target is not None else []
    failure = None
    try:
        client.execute("migrate", arguments)
        while True:
            try:
                event = client.wait_event({"MIGRATION", "X_FDMIG_MIGRATION_WAITING"}, deadline, wake=wake)
            except EOFError:
                # The source died. If it had sent everything, the target took over.
                if arguments["uri"].startswith("tcp:"):
                    raise FdmigError(f"the source (pid {source_pid}) died during the migration; whether the "
                                     "target took over, fdmig status on its host says") from None
                data = _after_source_died(control_path, source_pid)
                notes.append(f"the source (pid {source_pid}) died during the migration; "
                             "the target took over what it had sent")
                return data
            if event is None:  # the spawned target exited
                failure = target.exit_reason()
                data = _cancel(client)
                break
            data = event.get("data", {})
            if event["event"] == "X_FDMIG_MIGRATION_WAITING":
                if announce is not None:
                    who = f"the target (pid {target.proc.pid})" if target is not None else "a target"
                    how = "" if target is not None else f" (start one with: fdmig migrate-in{instance_hint})"
                    announce(f"waiting for {who} to listen on {data.get('channel')}{how}")
                continue
            if data.get("status") in TERMINAL:
                break
    except Interrupted as exc:
        failure = f"interrupted by {exc}"
        data = _cancel(client)
    if data["status"] == COMPLETED:
        if failure is not None:
            notes.append(f"{failure}, but too late: the migration had committed")
        return data
    reason = failure or data.get("x-fdmig-error") or data["status"]
    message = f"migration {data['status']}: {reason}; the source still serves every chardev"
    raise (TimeoutExpired if data.get("x-fdmig-timed-out") and failure is None else FdmigError)(message)


def _cancel(client) -> dict:
    """migrate_cancel, then the MIGRATION event that says how it ended: the source
    rolls back unless it had committed already."""
    deadline = time.monotonic() + HANDOVER_GRACE
    try:
        client.execute("migrate_cancel")
        status = client.execute("query-migrate").get("status", MigrationStatus.NONE.value)
        if status not in IN_PROGRESS:
            # It had ended (or never begun); its MIGRATION event, if any, came before our reply.
            ended = [e.get("data", {}) for e in client.events if e["event"] == "MIGRATION"]
            if ended and ended[-1].get("status") in TERMINAL:
                return ended[-1]
            return {"status": MigrationStatus.CANCELLED.value}
        while True:
            data = client.wait_event({"MIGRATION"}, deadline).get("data", {})
            if data.get("status") in TERMINAL:
                return data
    except (EOFError, FdmigError):
        raise FdmigError("the migration was being cancelled when the source closed its control "
                         "connection; see its log") from None


def _after_source_died(control_path: str, source_pid: int) -> dict:
    """A MIGRATION event's data as if the source had said how it ended."""
    deadline = time.monotonic() + HANDOVER_GRACE
    if not process.wait_exit_blocking(source_pid, deadline - time.monotonic()):
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
    return {"status": COMPLETED, "x-fdmig-chardevs": status["migration"]["chardevs"],
            "x-fdmig-target": {"pid": status["pid"], "control": True}}


def _refused(incoming_path: str, source_pid: int) -> bool:
    """Whether a target waiting at `incoming_path` has given up on that source."""
    try:
        with qmp.connect(incoming_path, timeout=2) as client:
            migration = client.execute("x-fdmig-status")["migration"]
    except (NoInstanceError, FdmigError, OSError):
        return False
    return migration.get("status") == MigrationStatus.FAILED.value and migration.get("source-pid") == source_pid
