"""An instance's lifecycle: its run state and its migration's status, named as
QEMU's query-status and query-migrate name them, with the one table of what may
follow what. `Lifecycle.migration_to` is the only way either changes, and it
emits what follows from a change: the MIGRATION event, sd_notify STATUS=, the
`migration` object of `status`.

Light on imports: the CLI and the renderer use the names without the daemon."""

import enum


class RunState(enum.Enum):
    INMIGRATE = "inmigrate"  # a target, waiting for its migration
    RUNNING = "running"
    POSTMIGRATE = "postmigrate"  # a source whose chardevs are the target's now


class MigrationStatus(enum.Enum):
    NONE = "none"
    SETUP = "setup"  # the source: connecting, sending its table, until ACCEPT
    ACTIVE = "active"  # the precopy and the downtime; on a target, a source is in session
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_M = MigrationStatus
IN_PROGRESS = frozenset({_M.SETUP, _M.ACTIVE})
TERMINAL = frozenset({_M.COMPLETED, _M.FAILED, _M.CANCELLED})

# status -> the statuses that may follow it. A source starts at SETUP; a target
# goes straight to ACTIVE when a source connects, and back to it from FAILED
# when the next one does.
MIGRATION_TRANSITIONS: dict[MigrationStatus, frozenset] = {
    _M.NONE: frozenset({_M.SETUP, _M.ACTIVE}),
    _M.SETUP: frozenset({_M.ACTIVE, _M.FAILED, _M.CANCELLED}),
    _M.ACTIVE: frozenset({_M.COMPLETED, _M.FAILED, _M.CANCELLED}),
    _M.COMPLETED: frozenset({_M.SETUP}),  # a target that took over may migrate on
    _M.FAILED: frozenset({_M.SETUP, _M.ACTIVE}),
    _M.CANCELLED: frozenset({_M.SETUP, _M.ACTIVE}),
}

# (run state, migration status reached) -> the run state that follows. A completed
# migration ends the source's run and begins the target's; nothing else moves it.
RUN_TRANSITIONS: dict[tuple[RunState, MigrationStatus], RunState] = {
    (RunState.RUNNING, _M.COMPLETED): RunState.POSTMIGRATE,
    (RunState.INMIGRATE, _M.COMPLETED): RunState.RUNNING,
}

# The migration object's fields, in the order `status --json` has always shown them.
_FIELDS = {"chardevs": 0, "downtime-ms": None, "total-ms": None, "setup-ms": None, "error": None}
# ... and those of a migration over a TCP channel: the chardevs that moved live
# with their TCP state (x-tcp-repair), those opened afresh, the bytes moved.
REMOTE_FIELDS = ("moved-live", "reconnected", "tcp-state")


class TransitionError(Exception):
    """A transition the table does not allow: a bug in fdmig, never the user's."""


class Lifecycle:
    """`emit(name, data)` sends a QMP event to every control client; `notify(*lines)`
    is sd_notify. Both are the instance's, so this module does no I/O."""

    def __init__(self, incoming: bool, emit, notify):
        self.run_state = RunState.INMIGRATE if incoming else RunState.RUNNING
        self.status = MigrationStatus.NONE
        self._fields = dict(_FIELDS)
        self._emit = emit
        self._notify = notify

    @property
    def migrating(self) -> bool:
        """Whether a migration is in progress: the one answer control's gates ask."""
        return self.status in IN_PROGRESS

    def info(self) -> dict:
        """The `migration` object of `status` (and query-migrate's x-fdmig)."""
        return {"status": self.status.value, **self._fields}

    def get(self, key: str):
        return self._fields.get(key)

    def migration_to(self, status: MigrationStatus, **fields) -> None:
        """Move the migration to `status`, set `fields` (snake_case for kebab-case
        keys), move the run state if that follows, and say so."""
        if status not in MIGRATION_TRANSITIONS[self.status]:
            raise TransitionError(f"migration {self.status.value} -> {status.value}")
        self.status = status
        for key, value in fields.items():
            self._fields[key.replace("_", "-")] = value
        self.run_state = RUN_TRANSITIONS.get((self.run_state, status), self.run_state)
        data = {"status": status.value}
        if status in TERMINAL:
            # fdmig's additions, for a migrate-out that cannot query afterwards.
            data.update({"x-fdmig-error": self._fields.get("error"),
                         "x-fdmig-timed-out": self._fields.get("error-class") == "timeout",
                         "x-fdmig-chardevs": self._fields.get("chardevs"),
                         "x-fdmig-downtime-ms": self._fields.get("downtime-ms"),
                         "x-fdmig-total-ms": self._fields.get("total-ms"),
                         "x-fdmig-target": self._fields.get("target")})
            for key in REMOTE_FIELDS:  # a migration over TCP: what moved live, what reconnects
                if self._fields.get(key) is not None:
                    data[f"x-fdmig-{key}"] = self._fields[key]
        self._emit("MIGRATION", data)
        self._notify(f"STATUS=migration {status.value}")
