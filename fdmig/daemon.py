"""The instance: owns the chardevs, serves the control socket, runs migrations.

Everything runs on one asyncio loop; signal handlers only set an event and the loop
acts on it (gunicorn's and aiohttp's way of shutting down).
"""

import asyncio
import gc
import logging
import os
import resource
import signal
import time
from collections.abc import AsyncIterator

from fdmig import (__version__, frontends, instances, keeper, marks, pacing, paths, presentation, qmp, spec as specs,
                   systemd, tcprepair)
from fdmig.keeper import Keeper
from fdmig.chardev import Chardev, quiesce_all, resume_all
from fdmig.errors import FdmigError
from fdmig.lifecycle import Lifecycle, MigrationStatus, RunState

log = logging.getLogger("fdmig")
CAPABILITIES = ("local-char-socket", "x-tcp-repair")
# Each stops an instance cleanly (a closed terminal's SIGHUP too), exit status 0,
# as QEMU's "terminating on signal" and as systemd counts them (a clean stop).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Chardev rows made and sent at a time (a tenth of a millisecond or two), paced
# (fdmig.pacing): a status of 5000 chardevs takes some 50 ms so.
STATUS_SLICE = 128
# Rows framed a piece at a time after a migration's takeover: framing one costs
# some 15 us, so a piece of STATUS_SLICE was 2 ms under the target's first turns.
FRAME_SLICE = 32


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _rows_in_slices(chardevs: list) -> AsyncIterator[str]:
    """The status rows' JSON array, a slice at a time, paced (fdmig.pacing): the
    rows of thousands of chardevs take milliseconds, a pause their peers would
    see."""
    yield "["
    for start in range(0, len(chardevs), STATUS_SLICE):
        began = time.monotonic()
        rows = ", ".join(map(presentation.row_json, chardevs[start: start + STATUS_SLICE]))
        yield ", " + rows if start else rows
        if start + STATUS_SLICE < len(chardevs):
            await pacing.yield_after(began, "status rows")
    yield "]"


async def _open_fds(me) -> int:
    # Linux gives the count as the size of /proc/self/fd since 6.2: one stat. A
    # listing of thousands takes milliseconds; in a thread, as before such a
    # kernel, it still contends with the loop for the GIL at every entry.
    count = os.stat("/proc/self/fd").st_size
    return count or await asyncio.to_thread(me.num_fds)


class Instance:
    def __init__(self, name: str, control_path: str, capabilities=(), incoming: bool = False,
                 fdstore: bool = False):
        self.name = name
        self.control_path = control_path
        self.capabilities = {cap: cap in capabilities for cap in CAPABILITIES}
        self.lifecycle = Lifecycle(incoming, self.emit, systemd.notify)
        self.chardevs: dict[str, Chardev] = specs.Held()  # keeps the index of their addresses
        self.named_fds: dict[str, int] = {}  # getfd store, as QEMU's monitor keeps one
        self.listen_fds: dict[str, list[int]] = {}
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.stop_reason: str | None = None  # "SIGTERM", "QMP quit ...": what asked the instance to stop
        self.control = None  # control.ControlServer
        self.poller = None  # poller.Poller, made on the loop
        self.exit_code = 0
        self.handed_over = False  # after a migration's commit: our paths are the target's
        self.frozen = False  # inside a migration's downtime (freeze, thaw)
        self.outgoing = None  # the source session of a migration, while it runs
        self.keeper = Keeper() if fdstore else None  # --fdstore: our fds in our manager's store
        self.tls_creds: str | None = None  # a target's --tls-creds, for a TCP channel
        self.hooks: dict[str, str] = {}  # a target's --claim-cmd ("claim") and --release-cmd ("release")
        self.service = None  # a `run` instance's fdmig.service.Service
        self.store = None  # ... and its fdmig.fdstore.FdStore
        self._outgoing_task: asyncio.Task | None = None
        self._framing: asyncio.Task | None = None  # a target's frame_rows(), held (a task is weakly referenced)
        self._announced = False  # READY=1 sent to our own manager
        self._status_scheduled = False
        self._status_sent = ""
        self.incoming_specs: list = []  # a target's own chardevs, until they exist
        self.incoming_channel: asyncio.Future | None = None  # a target's channel path

    # ----- chardevs ----------------------------------------------------------

    def check_new(self, spec) -> None:
        """Rules a chardev-add must pass against what the instance already holds."""
        # Specs by label only when a bridge needs them: building the map for every
        # add would make a start with thousands of chardevs quadratic.
        held = {label: c.spec for label, c in self.chardevs.items()} if spec.bridge else self.chardevs
        specs.check_fits(spec, held, incoming=self.run_state is RunState.INMIGRATE, addresses=self.chardevs.addresses)

    async def check_free(self, spec) -> None:
        """The rule across instances (fdmig.instances), here and not only in the
        CLI's attach: a client speaking QMP itself must not take another
        instance's address either. In a thread: it asks every instance of the
        runtime dir, this one too, for its status, and the loop serves on
        meanwhile (so the caller checks again what may have changed)."""
        self.check_new(spec)
        await asyncio.to_thread(instances.check_free, [spec], self.name)

    async def add_chardev(self, spec) -> Chardev:
        self.check_new(spec)
        return await self.open_registered(self.register(spec))

    def register(self, spec, frame: bool = True) -> Chardev:
        """Create and wire a chardev without opening it (its bridge partner, if
        any, must be registered already). `frame`: its status row's JSON made
        now, not in the first status; a migration's target stages thousands
        while the source's peers want the CPU, and frames them later (frame_rows)."""
        chardev = Chardev(spec, self._chardev_changed, self.poller)
        self._wire(chardev, frame)
        self.chardevs[spec.id] = chardev
        return chardev

    async def open_registered(self, chardev: Chardev) -> Chardev:
        spec = chardev.spec
        adopted_fd = None
        try:
            if spec.kind in ("fd", "fdname"):
                adopted_fd = self._take_fd(spec)
            await chardev.open(adopted_fd, self._saved_fds(spec.id))
        except BaseException:
            self._unwire(chardev)
            del self.chardevs[spec.id]
            # A passed fd (getfd, socket activation) is ours to close; a bare number
            # that failed its checks may be anything, even one of our own, so not that.
            if adopted_fd is not None and not spec.fd_is_number and chardev.fd is None:
                os.close(adopted_fd)
            raise
        log.info("chardev %s: %s (%s)", spec.id, chardev.spec.described, chardev.state.value)
        self.report_status()
        return chardev

    def _saved_fds(self, label: str) -> tuple:
        """With --fdstore, the (listener, connection) fds of `label` that our manager
        kept for us from an earlier life and passed back by LISTEN_FDNAMES."""
        if self.keeper is None:
            return None, None
        return tuple((self.listen_fds.get(name) or [None]).pop(0) for name in keeper.names(label))

    def _take_fd(self, spec) -> int:
        if spec.kind == "fdname":
            fds = self.listen_fds.get(spec.fdname)
            if not fds:
                have = ", ".join(sorted(self.listen_fds)) or "none"
                raise FdmigError(f"chardev {spec.id}: no socket-activation fd named '{spec.fdname}' "
                                 f"(LISTEN_FDNAMES has: {have})")
            return fds.pop(0)
        if spec.fd_is_number:
            return int(spec.fd)
        if spec.fd not in self.named_fds:
            raise FdmigError(f"chardev {spec.id}: File descriptor named '{spec.fd}' not found "
                             "(pass one with getfd first)")
        return self.named_fds.pop(spec.fd)

    def _wire(self, chardev: Chardev, frame: bool = True) -> None:
        spec = chardev.spec
        reframe = presentation.frame_row if frame else presentation.forget_row
        if spec.bridge:
            partner = self.chardevs[spec.bridge]
            chardev.frontend = frontends.Bridge(chardev, partner)
            partner.frontend = frontends.Bridge(partner, chardev)
            chardev.feeders.append(partner)
            partner.feeders.append(chardev)
            partner.update_io()
            reframe(partner)
        else:
            chardev.frontend = frontends.make(chardev)
        reframe(chardev)

    def _unwire(self, chardev: Chardev) -> None:
        if chardev.spec.bridge and chardev.spec.bridge in self.chardevs:
            partner = self.chardevs[chardev.spec.bridge]
            partner.frontend = frontends.Hold(partner)
            partner.feeders.remove(chardev)
            partner.update_io()
            presentation.frame_row(partner)

    async def frame_rows(self) -> None:
        """Frame the status rows not framed yet (a migration's staged chardevs),
        FRAME_SLICE at a time, paced: a status would frame them itself, while
        every peer waits on the slices."""
        def frame(chardevs) -> None:
            for chardev in chardevs:
                if chardev.row_frame is None:  # a status between two slices may have framed it
                    presentation.frame_row(chardev)
        await pacing.in_slices([c for c in self.chardevs.values() if c.row_frame is None], FRAME_SLICE, frame,
                               "status framing")

    def bridged_by(self, label: str) -> str | None:
        for other in self.chardevs.values():
            if other.spec.bridge == label:
                return other.label
        return None

    def remove_chardev(self, label: str) -> None:
        chardev = self.chardevs.get(label)
        if chardev is None:
            raise FdmigError(f"Chardev '{label}' not found")
        user = self.bridged_by(label)
        if user is not None:
            raise FdmigError(f"Chardev '{label}' is busy: chardev '{user}' bridges to it; detach '{user}' first")
        self._unwire(chardev)
        del self.chardevs[label]
        chardev.close()
        if self.keeper is not None:
            self.keeper.forget(label)
        log.info("chardev %s: removed", label)
        self.report_status()

    def _chardev_changed(self, chardev: Chardev) -> None:
        if self.frozen:
            return  # thousands of chardevs change at once; MIGRATION events say it
        if self.keeper is not None and chardev.label in self.chardevs:
            self.keeper.sync(chardev)
        self.emit("X_FDMIG_CHARDEV_STATE", {"label": chardev.label, "state": chardev.state.value})
        self.report_status()

    def emit(self, name: str, data: dict | None = None) -> None:
        """A QMP event to every control client."""
        if self.control is not None:
            self.control.broadcast(name, data)

    @property
    def run_state(self) -> RunState:
        return self.lifecycle.run_state

    # ----- migration ---------------------------------------------------------

    def freeze(self, quiesce: bool) -> None:
        """The downtime begins: nothing is read, written or accepted (the poller
        paused), no collection pause, no per-chardev event. `quiesce`: every
        chardev remembers where it stands, to resume there."""
        gc.disable()
        self.frozen = True
        self.poller.pause()
        if self.service is not None:
            self.service.hear(False)
        if quiesce:
            quiesce_all(self.chardevs.values())

    def thaw(self, first=()) -> float:
        """The downtime ends: every quiesced chardev resumes, all at one instant,
        which this returns (time.monotonic()). Taken before the collector is on
        again: its first collection comes at the next allocation."""
        resume_all(self.chardevs.values())
        self.poller.resume(first)  # fds in `first` watched before the rest, in that order
        if self.service is not None:
            self.service.hear(True)
        self.frozen = False
        resumed_at = time.monotonic()
        gc.enable()
        self.report_status()
        return resumed_at

    def migrate(self, address, timeout: float | None, abandoned: asyncio.Event | None,
                tls_creds: str | None = None, hooks: dict | None = None, reconnect: bool = False) -> None:
        """Start a migration to the target at `address` (QMP `migrate`); its outcome
        comes as MIGRATION events. Refused, as QEMU's blockers refuse, if it would
        lose a chardev, or make a marked chardev's peer reconnect unless
        `reconnect` says that is wanted. `hooks`: over TCP, the shell commands
        that move the service address ("release", "reclaim")."""
        from fdmig.migration import source
        if self.service is not None and self.service.restart_under_way:
            raise FdmigError("a restart of the service is under way: migrate once it has ended (fdmig restart "
                             "returns then)")
        if address.tcp:
            if self.capabilities["local-char-socket"]:
                raise FdmigError("capability local-char-socket passes fds, which cannot cross hosts: turn it off "
                                 "for a TCP channel (every chardev is opened afresh at the target and its peers "
                                 "reconnect), and move TCP connections live with capability x-tcp-repair")
            if tls_creds is None:
                raise FdmigError(f"a TCP channel needs TLS credentials (--tls-creds DIR): {address} refused")
            if self.capabilities["x-tcp-repair"] and not tcprepair.capable():
                raise FdmigError("capability x-tcp-repair needs CAP_NET_ADMIN (TCP_REPAIR), which this instance lacks")
        else:
            if self.capabilities["x-tcp-repair"]:
                raise FdmigError("capability x-tcp-repair moves TCP connections to another host, over a TCP "
                                 "channel; over a unix channel, local-char-socket moves them")
            if hooks:
                raise FdmigError("--release-cmd and --reclaim-cmd move the service address to another host: "
                                 "they are for a TCP channel")
        with marks.spanning("migrate blockers"):
            blocked = source.blockers(self, remote=address.tcp, reconnect=reconnect)
        if blocked:
            raise FdmigError("migration refused, it would lose chardevs: " + "; ".join(blocked))
        self.lifecycle.migration_to(MigrationStatus.SETUP, chardevs=0, error=None, downtime_ms=None,
                                    total_ms=None, setup_ms=None, moved_live=None, reconnected=None, tcp_state=None)
        self.outgoing = source.SourceSession(self, address, timeout, abandoned, tls_creds, hooks)
        self._outgoing_task = asyncio.ensure_future(self._migrate(self.outgoing))

    async def _migrate(self, session) -> None:
        try:
            handed_over = await session.run()
        except Exception:
            log.exception("migration: internal error after the commit")
            handed_over = True  # the target holds every connection: never two readers
        finally:
            self.outgoing = None
        if handed_over:
            # Our paths are the target's now: let go of them, and stop.
            self.control.close(unlink=False, flush=True)
            self.handed_over = True
            self.stopping.set()

    def cancel_migration(self) -> None:
        """QMP migrate_cancel: roll back, unless the commit has happened or the
        rollback has begun (a cancel inside its --reclaim-cmd would leave every
        chardev quiesced)."""
        if self.outgoing is not None and not self.outgoing.committed and not self.outgoing.aborting:
            self._outgoing_task.cancel()

    # ----- reporting ---------------------------------------------------------

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for chardev in self.chardevs.values():
            counts[chardev.state.value] = counts.get(chardev.state.value, 0) + 1
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no chardevs"
        return f"{self.run_state.value}: {states}"

    def report_status(self) -> None:
        """STATUS= for systemd, at most once per loop iteration and only on change:
        a migration of 10,000 chardevs changes state 20,000 times in a few ms."""
        if not os.environ.get("NOTIFY_SOCKET") or self._status_scheduled:
            return
        self._status_scheduled = True
        asyncio.get_running_loop().call_soon(self._send_status)

    def _send_status(self) -> None:
        self._status_scheduled = False
        summary = self.summary()
        if summary != self._status_sent:
            self._status_sent = summary
            systemd.notify(f"STATUS={summary}")

    async def status(self) -> dict:
        """x-fdmig-status: the instance, its migration and its chardevs (their
        rows a qmp.Streamed: the one caller sends it over QMP as they are made)."""
        import psutil
        me = psutil.Process()
        if self.run_state is RunState.INMIGRATE:
            rows = [presentation.pending_row(spec) for spec in self.incoming_specs]
        else:
            rows = qmp.Streamed(_rows_in_slices(list(self.chardevs.values())))
        return {
            "name": self.name,
            "pid": os.getpid(),
            "state": self.run_state.value,
            "version": __version__,
            "uptime-s": round(time.time() - self.started, 3),
            "rss-bytes": me.memory_info().rss,
            "open-fds": await _open_fds(me),
            "capabilities": dict(self.capabilities),
            "fdstore": self.keeper is not None,
            "migration": self.lifecycle.info(),
            "control": self.control_path,
            "chardevs": rows,
            **({"service": self.service.status(), "stored": self.store.rows()} if self.service else {}),
        }

    # ----- life cycle --------------------------------------------------------

    def prepare(self) -> None:
        from fdmig.poller import Poller
        # Imported now, not when a migration starts: an import inside the loop would
        # stall every chardev's peer for its few milliseconds.
        import fdmig.control  # noqa: F401
        import fdmig.migration.source  # noqa: F401
        import fdmig.migration.target  # noqa: F401
        import psutil  # noqa: F401  (status)
        raise_fd_limit()
        loop = asyncio.get_running_loop()
        self.poller = Poller(loop)
        self.listen_fds = systemd.listen_fds()
        # SIGHUP too: a terminal closed under an instance started from it (`fdmig
        # migrate-in &`) must not kill it uncleaned, its sockets left stale.
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, signum: int) -> None:
        """The first stop signal stops the instance; a second SIGINT (Ctrl-C) kills
        a service that is being stopped and has not exited yet."""
        name = signal.Signals(signum).name
        if not self.stopping.is_set():
            self.request_stop(name)
        elif signum == signal.SIGINT and self.service is not None and self.service.kill_now():
            pass  # the service's log says so
        else:
            log.info("%s: stopping already", name)

    def request_stop(self, reason: str) -> None:
        """Stop the instance, as SIGTERM or QMP quit asks: a `run` instance's
        service first, then the chardevs; every socket of its own removed."""
        if self.stopping.is_set():
            return
        self.stop_reason = reason
        log.info("stopping on %s", reason)
        self.stopping.set()

    async def start(self, chardev_specs, announce: bool = True) -> None:
        """Open the control socket and the chardevs; READY=1 once they are open
        (unless not `announce`: a `run` instance is ready once its service is)."""
        from fdmig.control import ControlServer
        self.prepare()
        self.control = ControlServer(self)
        self.control.bind(self.control_path)
        # All wired before any opens: a bridge's client side must know it is one
        # (it then connects only for a peer of its partner).
        registered = []
        for spec in specs.partners_first(chardev_specs):
            self.check_new(spec)
            registered.append(self.register(spec))
        for chardev in registered:
            await self.open_registered(chardev)
        # What start-up built lives as long as the chardevs: out of the collector's
        # way, as a migration's target does with what it stages, so that a later
        # full collection (tens of ms at thousands of chardevs) walks none of it.
        gc.collect()
        gc.freeze()
        self.control.start()
        waiting = [c.first_peer.wait() for c in self.chardevs.values() if c.spec.wait]
        if waiting:
            log.info("waiting for the first peer of %d chardev(s) (wait=on)", len(waiting))
            systemd.notify(f"STATUS=waiting for the first peer of {len(waiting)} chardev(s)")
            await asyncio.wait([asyncio.ensure_future(w) for w in waiting] +
                               [asyncio.ensure_future(self.stopping.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if not self.stopping.is_set():
                await asyncio.gather(*[c.first_peer.wait() for c in self.chardevs.values() if c.spec.wait])
        if announce and not self.stopping.is_set():
            self.announce_ready()

    def announce_ready(self) -> None:
        self._announced = True
        systemd.notify("READY=1", f"STATUS={self.summary()}")
        log.info("instance %s ready (pid %d, control %s)", self.name, os.getpid(), self.control_path)

    # ----- a `run` instance's service ----------------------------------------

    def start_service(self, argv: list[str], options) -> None:
        """Hold an fd store and start `argv` as the service (fdmig run)."""
        from fdmig.fdstore import FdStore
        from fdmig.service import Service
        self.store = FdStore(options.fdstore_max, self.poller, on_change=self._service_changed)
        self.service = Service(argv, paths.notify_beside(self.control_path), self.store, self.service_fds,
                               options, on_change=self._service_changed)
        self.service.start()

    def _service_changed(self) -> None:
        """The service or its store changed: an event for control clients (what
        `status --wait` and scripts await), and STATUS= for our own manager."""
        service = self.service
        if service is not None:
            self.emit("X_FDMIG_SERVICE", {"state": service.state.value, "pid": service.main_pid,
                                          "ready": service.ready, "stored": len(self.store)})
            if service.ready and not self._announced:
                self.announce_ready()  # the first time the service is ready, whichever start that is
        self.report_status()

    def service_fds(self) -> list[tuple[str, int]]:
        """The `service` chardevs' fds, in the order they were given, by label (a
        pipe's second FIFO as LABEL.out)."""
        found = []
        for chardev in self.chardevs.values():
            if chardev.spec.frontend == "service":
                if chardev.fd is None:
                    log.warning("chardev %s: no socket to pass to the service (%s)", chardev.label,
                                chardev.state.value)
                    continue
                found.append((chardev.label, chardev.fd))
                out = chardev.conn.fds.get("out") if not chardev.stream and chardev.conn else None
                if out is not None:  # a pipe's FIFO written, beside the one read
                    found.append((f"{chardev.label}.out", out.fd))
        return found

    def adopt_service(self, state, sock, stored: list) -> None:
        """A migration's target of a `run` instance: the service runs on (same pid),
        supervised, heard and restarted from here, with the store that came."""
        from fdmig.fdstore import FdStore
        from fdmig.service import Options, Service, State
        self.store = FdStore(state.fdstore_max, self.poller, on_change=self._service_changed)
        self.store.refused = state.fdstore_refused
        for entry, fd in stored:
            self.store.adopt(entry.name, fd, entry.poll, entry.stored_at)
        options = Options(state.notify_ready, state.restart, state.stop_signal, state.stop_timeout, state.fdstore_max,
                          state.overlap, state.ready_delay)
        self.service = Service(list(state.argv), paths.notify_beside(self.control_path), self.store,
                               self.service_fds, options, on_change=self._service_changed, sock=sock)
        service = self.service
        service.state, service.ready = State(state.state), state.ready
        service.status_text, service.restarts = state.status_text, state.restarts
        service.supervise_running(state.pid)
        service.adopt_draining(state.draining)
        log.info("service: pid %s taken over with %d stored fd(s)", state.pid, len(self.store))

    def took_over(self, received) -> None:
        """A migration's target, once the moved chardevs serve: the service (of a
        `run` instance) and our manager's copies follow, then the control path."""
        from fdmig.control import ControlServer
        if received.service is not None:
            self.adopt_service(*received.service, received.stored)
        if self.keeper is not None:
            for chardev in self.chardevs.values():
                self.keeper.sync(chardev)
        self.control = ControlServer(self)
        self.control.bind(self.control_path, take_over=True)
        self.control.start()
        log.info("migration completed: %d chardev(s) moved live from pid %d, downtime %s ms",
                 len(received.sockets), received.hello.pid, self.lifecycle.get("downtime-ms"))
        self._announced = True
        systemd.notify(f"MAINPID={os.getpid()}", "READY=1", f"STATUS={self.summary()}")
        self._framing = asyncio.get_running_loop().create_task(self.frame_rows())

    async def stop_service(self) -> None:
        """Stop the service and close its store; after a migration's commit, only
        let go of them: they are the target's, and the service runs on."""
        if self.service is None:
            return
        if not self.handed_over:
            await self.service.stop(interactive=self.stop_reason == "SIGINT")
        self.service.close(unlink=not self.handed_over)
        self.store.close()

    async def serve_forever(self) -> int:
        await self.stopping.wait()
        return self.exit_code

    async def finish_migration(self) -> None:
        """On SIGTERM mid-migration: before the commit it rolls back (cancel); after
        it, it runs to its end, so the target is never left without a source."""
        task = self._outgoing_task
        if task is not None and not task.done():
            self.cancel_migration()
            await asyncio.gather(task, return_exceptions=True)

    def shutdown(self) -> None:
        """Staged: stop accepting control clients, roll back a migration still
        before its commit, close chardevs, remove own sockets (unless handed over)."""
        unlink = not self.handed_over
        if not self.handed_over:
            systemd.notify("STOPPING=1")
        if self.control is not None:
            self.control.close(unlink=unlink)
        for chardev in list(self.chardevs.values()):
            try:
                chardev.close(unlink=unlink)
            except Exception:
                log.exception("chardev %s: error while closing", chardev.label)
        for fd in self.named_fds.values():
            os.close(fd)
        self.named_fds.clear()
        if not self.handed_over and self.stop_reason is not None:
            log.info("instance %s stopped (pid %d), its sockets removed", self.name, os.getpid())


async def run_instance(instance: Instance, chardev_specs) -> int:
    try:
        await instance.start(chardev_specs)
        return await instance.serve_forever()
    finally:
        await instance.finish_migration()
        instance.shutdown()


async def run_target(instance: Instance, address, own_specs, timeout, exec_argv) -> int:
    """migrate-in: wait for one migration, then serve as `serve` would (or exec).
    `address` (a paths.ChannelAddress) None is QEMU's `-incoming defer`: QMP migrate-incoming names it."""
    from fdmig.migration import target
    spawned = os.environ.pop(paths.SPAWNED_ENV, None) == "1"
    received = await _await_migration(instance, address, own_specs, timeout, exec_argv, spawned)
    if received is None:
        return 0  # stopped while waiting
    if spawned:
        _take_up_stdio(received.stdio)  # the migrate-out that spawned us may go now
    if exec_argv:
        target.exec_handover(received, exec_argv)  # does not return
    try:
        await target.take_over(instance, received)
        instance.took_over(received)
        return await instance.serve_forever()
    finally:
        await instance.stop_service()
        await instance.finish_migration()
        instance.shutdown()


async def _await_migration(instance: Instance, address, own_specs, timeout, exec_argv, spawned: bool = False):
    """Answer QMP on <name>.incoming.sock and wait for one migration to commit:
    what it brought, or None if the instance is stopped first."""
    from fdmig.control import ControlServer
    from fdmig.migration import target
    instance.prepare()
    instance.incoming_specs = list(own_specs)
    instance.incoming_channel = asyncio.get_running_loop().create_future()
    for spec in own_specs:
        if spec.local_incoming:
            log.info("chardev %s: awaiting-incoming", spec.id)
    instance.control = ControlServer(instance)
    instance.control.bind(paths.incoming_beside(instance.control_path))
    instance.control.start()
    info = {"pid": os.getpid(), "exec": bool(exec_argv), "control": not exec_argv, "stdio": spawned}
    if address is not None:
        instance.incoming_channel.set_result(address)

    async def receive():
        address = await instance.incoming_channel
        systemd.notify(f"STATUS=waiting for a migration on {address}")
        return await target.receive(instance, address, list(own_specs), timeout, info)

    receiving = asyncio.ensure_future(receive())
    stopping = asyncio.ensure_future(instance.stopping.wait())
    stopped = False
    try:
        await asyncio.wait([receiving, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not receiving.done():
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
            stopped = True
            return None
        stopping.cancel()
        return receiving.result()
    finally:
        instance.control.close()
        instance.control = None
        if stopped:
            log.info("instance %s stopped before a migration arrived (pid %d), its sockets removed",
                     instance.name, os.getpid())


def _take_up_stdio(stdio: dict[str, int]) -> None:
    """A target `migrate-out --spawn` started, at the commit: the source's stdout
    and stderr become ours, so the instance's log goes on where it went, and the
    pipe to migrate-out closes. What the channel could not carry (a TCP channel
    carries no fd) goes nowhere rather than to a migrate-out about to exit."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    for name, number in (("stdout", 1), ("stderr", 2)):
        fd = stdio.pop(name, None)
        if fd is None:
            if number == 2:
                log.info("the channel carried no log for this instance: from now on it logs nowhere")
            fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, number)
        os.close(fd)
    for fd in stdio.values():
        os.close(fd)


async def run_service(instance: Instance, chardev_specs, argv: list[str], options) -> int:
    """fdmig run: an instance whose chardevs and fd store serve `argv`, started
    once they are open; READY=1 once the service is ready."""
    try:
        await instance.start(chardev_specs, announce=False)
        if instance.stopping.is_set():
            return 0
        instance.start_service(argv, options)  # READY=1 follows the service's (_service_changed)
        return await instance.serve_forever()
    finally:
        await instance.stop_service()
        await instance.finish_migration()
        instance.shutdown()


def run(instance: Instance, chardev_specs) -> int:
    return asyncio.run(run_instance(instance, chardev_specs))


def run_with_service(instance: Instance, chardev_specs, argv: list[str], options) -> int:
    return asyncio.run(run_service(instance, chardev_specs, argv, options))


def run_incoming(instance: Instance, address, own_specs, timeout, exec_argv) -> int:
    return asyncio.run(run_target(instance, address, own_specs, timeout, exec_argv))
