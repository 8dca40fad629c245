"""The source side of a migration (QMP `migrate`), step by step as DESIGN's
"Migration channel" lists them, with a precopy before the quiesce, as QEMU sends
RAM before it stops the guest: the moved chardevs' fds and state go out while we
still serve, and the target checks them meanwhile. Inside the downtime only the
chardevs that changed since (bytes moved, a new connection) are sent again, with
the fds of connections made since. Before the target's ACK any failure rolls
back: every chardev resumes as if nothing happened. After it, nothing rolls back."""

import asyncio
import gc
import logging
import operator
import os
import ssl
import time
from itertools import compress

from fdmig import __version__, faults, marks, pacing, paths, process, systemd, tcprepair, tlscreds
from fdmig.chardev import read_mark
from fdmig.lifecycle import MigrationStatus
from fdmig.migration import channel, form, repair, wire
from fdmig.migration.session import Session, drive

log = logging.getLogger("fdmig")
# After the commit: how long the target may take to say TAKEN, and how much longer
# it is given once SIGTERM asks the source to stop.
TAKEN_TIMEOUT = 10.0
COUNTERS_TIMEOUT = 1.0  # for COUNTERS to go out behind RELEASED (one frame: at once, unless the target is gone)
STOP_GRACE = 1.0
# After TAKEN, the longest we wait for the target to close the channel (it does
# once it has served its first turn) before letting go of our copies and exiting.
CLOSE_WAIT = 1.0
_OUTBUF = operator.attrgetter("outbuf")
_COUNTS_CHANGED = operator.attrgetter("counts_changed")


class MigrationFailed(Exception):
    """The migration cannot go on; the message is the reason, for query-migrate."""


class MigrationCancelled(MigrationFailed):
    pass


def blockers(instance, remote: bool = False, reconnect: bool = False) -> list[str]:
    """Why a migration now would lose a chardev (QEMU's migration blockers): one
    the target cannot reopen that would not move live, a bridge one side of
    which would move while the other reopened, splicing a live peer onto a new
    session, or (unless `reconnect`: the user chose it) a marked chardev whose
    connected peer would have to reconnect, the mark saying that peer is to be
    kept. `remote`: over a TCP channel, where only TCP state can move. Empty
    when nothing would be lost."""
    live = instance.capabilities["local-char-socket"]
    if remote:
        tcp = instance.capabilities[repair.CAPABILITY]
        moves = {label: repair.moves(c, tcp) for label, c in instance.chardevs.items()}
    else:
        moves = {label: form.moves_live(c, live) for label, c in instance.chardevs.items()}
    reasons = []
    if instance.service is not None and remote:
        reasons.append("this `run` instance's service, its notify socket and its fd store cannot cross hosts: "
                       "migrate it over a unix channel")
    elif instance.service is not None and not live:
        reasons.append("this `run` instance's service, its notify socket and its fd store can only move live: "
                       "enable capability local-char-socket")
    inherited = [c.label for c in instance.chardevs.values()
                 if c.spec.kind in ("fd", "fdname") and not moves[c.label] and c.sockets()]
    if inherited:
        how = ("give them an address the target can open (fds cannot cross hosts)" if remote else
               "mark them support-local-migration=on" if live else
               "enable capability local-char-socket (and mark them support-local-migration=on)")
        reasons.append(f"chardev(s) {', '.join(inherited)} hold an inherited fd (fd=/fdname=) that the "
                       f"target cannot reopen, and would not move live: {how}")
    ptys = [c.label for c in instance.chardevs.values() if c.spec.kind == "pty" and not moves[c.label]]
    if ptys:
        how = ("detach them first (a pty cannot cross hosts)" if remote else
               "enable capability local-char-socket (a pty moves live, marked or not)")
        reasons.append(f"chardev(s) {', '.join(ptys)} are ptys, which move only live (a new pty would hang up "
                       f"the program on the old one): {how}")
    kept = [c.label for c in instance.chardevs.values()
            if c.spec.support_local_migration and not moves[c.label] and c.conn is not None
            and c.spec.kind not in ("fd", "fdname", "pty")]
    if kept and not reconnect:
        reopened = any(instance.chardevs[label].spec.backend != "socket" for label in kept)
        reasons.append(_would_reconnect(kept, instance.capabilities, remote, reopened))
    for chardev in instance.chardevs.values():
        partner = chardev.spec.bridge
        if partner and partner in moves and moves[chardev.label] != moves[partner]:
            stays = partner if moves[chardev.label] else chardev.label
            reasons.append(f"bridge {chardev.label}-{partner}: {stays} is not support-local-migration=on, "
                           "so its side would reopen under a live peer's session; mark both or neither")
    return reasons


def _would_reconnect(labels: list, capabilities: dict, remote: bool, reopened: bool = False) -> str:
    named = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
    if not remote:
        why, live = "capability local-char-socket is off", "--capability local-char-socket"
    elif capabilities[repair.CAPABILITY]:
        why, live = "only TCP connections cross hosts", "a unix channel with --capability local-char-socket"
    else:
        why, live = "capability x-tcp-repair is off", "--capability x-tcp-repair (TCP chardevs)"
    # A tty, FIFO, udp socket or file is opened afresh, what waits in it lost.
    what = "their connected peers would reconnect" + (", their ttys, FIFOs, udp sockets and files be opened "
                                                      "afresh" if reopened else "")
    return (f"chardev(s) {named} are marked support-local-migration=on and {what} ({why}): add {live} to "
            f"move them live, or --reconnect to let their peers reconnect")


TABLE_SLICE = 64  # chardevs per piece of the table: 256 were pieces of 1.1 to 1.6 ms
# Sections per precopy frame, and so per piece of it: a frame of 252 fds was a
# piece of 2.5 to 3.5 ms, the longest pause of a few peers streaming among 1000.
PRECOPY_SLICE = 64


def table_entry(chardev, live: bool) -> dict:
    """The chardev's spec, and how many fds will come for it, so the target can
    refuse before the commit a migration that would exceed its fd limit."""
    entry = chardev.spec.to_dict()
    if chardev.spec.kind == "file":
        entry["append"] = True  # a target that opens it afresh goes on writing at its end, never truncates
    if form.moves_live(chardev, live):
        entry["x-fds"] = len(chardev.sockets())
    return entry


class SourceSession(Session):
    """One migration to the target listening at `path`: connect, offer (HELLO and
    TABLE), on ACCEPT the precopy, on HELD the quiesce and the transfer, on ACK the
    commit; then the handover. Before the commit, any failure is `abort()`: every
    chardev serves as before. `abandoned` set while no target listens yet cancels
    it: the client that asked has gone."""

    in_downtime = (wire.Ack,)

    def __init__(self, instance, address, timeout: float | None, abandoned: asyncio.Event | None = None,
                 tls_creds: str | None = None, hooks: dict | None = None):
        self.instance = instance
        self.address = address  # paths.ChannelAddress
        self.tls_creds = tls_creds  # a TCP channel's credentials (tlscreds)
        # Over TCP: marked TCP chardevs move with their TCP state (x-tcp-repair), and
        # the shell commands that move the service address: "release" and "reclaim".
        self.tcp_repair = address.tcp and instance.capabilities[repair.CAPABILITY]
        self.hooks = hooks or {}
        self.in_repair: list = []  # sockets put into repair mode, for a rollback to undo
        self.releasing = False  # --release-cmd has run (or begun): a rollback reclaims
        self.tcp_moved = repair.Moved()
        self.late: repair.LateSegments | None = None  # what peers send while the address moves
        self.timeout = timeout
        self.abandoned = abandoned
        self.live = instance.capabilities["local-char-socket"]
        self.committed = False
        self.aborting = False  # abort() has begun: a cancel meanwhile must not cut it short
        self.target = wire.TargetInfo()
        self.precopied: dict = {}  # label -> its sockets, as the precopy sent them
        self.tcp_precopied: dict = {}  # label -> what repair.precopy_section() said beside its section
        # The chardevs that move live, in the TABLE's order, and each one's
        # fingerprint as the precopy sent it (None: not sent); those it sent, and
        # those of them whose peers streamed as it began (SectionState.streaming).
        self.movable: list = []
        self.fingerprints: list = []
        self.sent: list = []
        self.streaming: list = []  # (TABLE index, chardev)
        # Labels whose counts RELEASED leaves out: with a section again inside the
        # downtime, or precopied and not moved after all (their connection gone).
        self.changed: set = set()
        self.reads_before = 0  # chardev.read_mark() as the migration began
        self.started = self.quiesce_at = 0.0
        self.moved = 0
        self.release: dict = {}  # RELEASED's info, made while the target checks the TRANSFER

    async def run(self) -> bool:
        """Whether the chardevs are the target's now. Never raises but on cancel
        after the commit: the outcome is in the lifecycle and the MIGRATION events."""
        self.started = time.monotonic()
        self.reads_before = read_mark()
        self.deadline = self.started + self.timeout if self.timeout else None
        try:
            try:
                self.chan = await self._connect()
                await drive(self)
            except BaseException as exc:
                failure = _failure(exc, self)
                if failure is None:
                    raise
                await self.abort(*failure)
                return False
            faults.point("source-after-ack")
            return await self.hand_over()
        finally:
            if self.late:
                self.late.close(self.tcp_moved)  # (closed already but on a cancel)

    async def _connect(self) -> channel.Channel:
        def waiting():
            log.info("migration: waiting for a target to listen on %s", self.address)
            self.instance.emit("X_FDMIG_MIGRATION_WAITING", {"channel": self.address.uri})
        try:
            sock = await channel.connect(self.address, self.deadline, self.abandoned, on_wait=waiting)
        except ConnectionAbortedError as exc:
            raise MigrationCancelled(str(exc)) from None
        except OSError as exc:
            raise MigrationFailed(str(exc) if isinstance(exc, ConnectionRefusedError) else
                                  f"cannot connect to {self.address}: {exc.strerror}") from None
        if self.address.tcp:
            # No uid to check across hosts: the target's certificate, from our CA, is the check.
            chan = channel.TlsChannel(sock, wire.Role.SOURCE, tlscreds.context(self.tls_creds, "client"))
            try:
                await chan.handshake(self.deadline)
            except (ssl.SSLError, ConnectionResetError) as exc:
                chan.close()
                raise MigrationFailed(f"the TLS handshake with the target on {self.address} failed: "
                                      f"{getattr(exc, 'reason', None) or exc}") from None
            return chan
        try:
            paths.trusted_peer(sock)
        except paths.Stranger as exc:
            sock.close()
            raise MigrationFailed(f"the target on {self.address} runs as uid {exc.uid}, "
                                  f"not as uid {os.geteuid()}") from None
        return channel.Channel(sock, wire.Role.SOURCE)

    # ----- the steps ---------------------------------------------------------

    async def begin(self) -> None:
        # No collection until the precopy is out: one of what serving left in
        # the young generations came in the precopy's first slice (0.6 to 1.1
        # ms at 1000 chardevs, on top of the slice), the peers' longest pause.
        # Owed since, it comes in a turn of its own after the last frame.
        gc.disable()
        instance = self.instance
        await self.chan.send(wire.Hello(instance.name, os.getpid(), __version__), self.deadline)
        # Made, encoded and sent TABLE_SLICE chardevs at a time, paced (fdmig.pacing):
        # at 3000 chardevs the whole table in one piece was 9 ms of the loop, the
        # longest pause of the peers streaming meanwhile. Nothing is added or
        # removed while a migration is under way (control refuses it).
        capabilities, chardevs = dict(instance.capabilities), list(instance.chardevs.values())
        for start in range(0, len(chardevs), TABLE_SLICE):
            began = time.monotonic()
            piece = [table_entry(c, self.live) for c in chardevs[start: start + TABLE_SLICE]]
            await self.chan.send(wire.Table(capabilities, piece, more=True), self.deadline)
            await pacing.yield_after(began, "source table")
        await self.chan.send(wire.Table(capabilities, []), self.deadline)
        faults.point("source-after-table")
        self.expected = (wire.Accept, self.on_accept, "accepting the table")

    async def on_accept(self, accept: wire.Accept) -> None:
        self.target = accept.target
        # QEMU's setup-time: until the precopy (its iterations) begins.
        setup_ms = (time.monotonic() - self.started) * 1000
        self.instance.lifecycle.migration_to(MigrationStatus.ACTIVE, setup_ms=round(setup_ms, 3))
        await self._precopy()
        self.expected = (wire.Held, self.on_held, "holding the precopy")

    async def on_held(self, _held) -> None:
        # Quiesce everything, moved or not: a chardev that stays behind must not
        # keep filling the out-buffer of one whose state has already been sent.
        self.quiesce_at = time.monotonic()
        self.instance.freeze(quiesce=True)
        marks.span("source quiesce", self.quiesce_at)
        faults.point("source-after-quiesce")
        if self.address.tcp:
            await self._dump()
        began = time.monotonic()
        transfer = wire.Transfer(self._changed_sections())
        marks.span("source transfer made", began)
        began = time.monotonic()
        await self.chan.send(transfer, self.deadline)
        marks.span("source transfer sent", began)
        # What RELEASED says is made now, while the target checks the TRANSFER.
        began = time.monotonic()
        self.release = self._release_info()
        marks.span("source release info", began)
        faults.point("source-after-transfer")
        self.expected = (wire.Ack, self.on_ack, "acknowledging")

    async def on_ack(self, _ack) -> bool:
        self.committed = True  # from here on, the connections are the target's
        return True

    def refused(self, reason: str) -> Exception:
        return MigrationFailed(f"the target refused: {reason}")

    def closed_early(self, what: str) -> Exception:
        return MigrationFailed(f"the target closed the channel before {what}")

    # ----- the precopy and the transfer --------------------------------------

    async def _precopy(self) -> None:
        """Send the moved chardevs' fds and state while every chardev still serves,
        a frame's worth at a time with the loop running in between, so no peer
        waits on the encoding of thousands. Each chardev keeps the sockets it
        closes meanwhile open until the end (form.pin)."""
        batch, pinned = [], []
        fds_in_batch = 0
        began = time.monotonic()
        # Over TCP, a chardev whose connection moves with its TCP state goes now
        # without its fds, for the target to stage; its TCP state follows inside
        # the downtime (repair.dump).
        tcp_precopy = self.tcp_repair and self.target.tcp_precopy
        try:
            for index, chardev in enumerate(list(self.instance.chardevs.values())):  # the TABLE's order
                if form.moves_live(chardev, self.live):
                    section = self._precopy_section(index, chardev, pinned)
                elif tcp_precopy and repair.moves(chardev, True) and chardev.conn is not None:
                    section, self.tcp_precopied[chardev.label] = repair.precopy_section(chardev)
                else:
                    continue  # the target opens it afresh
                if section is None:
                    continue
                self.sent.append(chardev)
                chardev.counts_changed = False  # the section has them
                batch.append(section)
                fds_in_batch += len(section.fds)
                if fds_in_batch >= wire.MAX_FDS_PER_FRAME - 1 or len(batch) >= PRECOPY_SLICE:
                    await self.chan.send(wire.Precopy(batch, more=True), self.deadline)
                    batch, fds_in_batch = [], 0
                    # Paced (fdmig.pacing), a frame a piece; the target paces its
                    # checking of them apart (it costs it more than us their making).
                    await pacing.yield_after(began, "precopy")
                    began = time.monotonic()
            await self.chan.send(wire.Precopy(batch), self.deadline)
        finally:
            for chardev in pinned:
                form.unpin(chardev)
            gc.enable()  # (on a failure too: abort() would, with thaw())
        faults.point("source-after-precopy")

    def _precopy_section(self, index: int, chardev, pinned: list) -> wire.Section | None:
        """A chardev that moves live: its section with its fds (pinned until the
        precopy is out), or None if it has no socket to send yet."""
        sockets = chardev.sockets()
        self.movable.append(chardev)
        self.fingerprints.append(form.fingerprint(chardev) if sockets else None)
        if not sockets:
            return None
        form.pin(chardev)
        pinned.append(chardev)
        self.precopied[chardev.label] = sockets
        streaming = chardev.conn is not None and chardev.served > self.reads_before
        if streaming:
            self.streaming.append((index, chardev))
        return form.section(chardev, carry=False, streaming=streaming)  # bytes to carry: at the quiesce

    async def _dump(self) -> None:
        """Over TCP, inside the downtime: the address released (--release-cmd), then
        the TCP state of every connection that moves with it, sent in frames of
        repair.BATCH connections as it is dumped: the target restores meanwhile."""
        self.late = repair.LateSegments.watch(self.instance.chardevs.values(), self.tcp_repair)
        if self.hooks.get("release"):
            self.releasing = True
            try:
                await repair.hook("--release-cmd", self.hooks["release"])
            except repair.HookFailed as exc:
                raise MigrationFailed(str(exc)) from None
        faults.point("source-after-release")
        try:
            for sections in repair.dump(self.instance.chardevs.values(), self.tcp_repair, self.in_repair,
                                        self.tcp_moved, self.late, self.tcp_precopied, self.changed):
                await self.chan.send(wire.Transfer(sections, more=True), self.deadline)
        except tcprepair.RepairError as exc:
            raise MigrationFailed(f"cannot dump a TCP connection: {exc}") from None
        self.moved += self.tcp_moved.connections

    def _changed_sections(self) -> list:
        """Inside the downtime: the sections of the moved chardevs that changed
        since the precopy, or hold bytes to carry. Which those are is worked out
        in C (map, compress): nothing but the byte counts changes for most, and
        those go with RELEASED."""
        movable = self.movable
        changed = list(compress(movable, map(operator.or_, map(operator.ne, self.fingerprints,
                                                               map(form.fingerprint, movable)),
                                             map(operator.truth, map(_OUTBUF, movable)))))
        self.moved += len(movable) - len(changed)  # the target has those from the precopy
        self.changed.update(chardev.label for chardev in changed)
        sections = []
        for chardev in changed:
            sockets = self.precopied.get(chardev.label)
            section = form.section(chardev, sockets)
            # With no socket, a section still carries bytes (and an EOF) waiting for
            # a connection the target makes afresh: a bridge's client side connecting.
            if section.fds or sockets or section.outbuf or "stream" in section.meta:
                self.moved += bool(section.fds or section.meta.get("held"))
                sections.append(section)
        if self.instance.service is not None:
            sections += form.service_sections(self.instance.service, self.instance.store)
        if self.target.stdio and not self.address.tcp:
            sections += form.stdio_section()
        return sections

    def _release_info(self) -> dict:
        """RELEASED's info: the timings, the byte counts of the chardevs that
        changed only in them since the precopy (unless the target takes those in
        COUNTERS, after RELEASED), and the order in which to serve the streaming
        chardevs, longest unserved first. The target gives their fds their events
        in it, and epoll then serves them in it, so that no peer waits a round of
        the others twice, once before the quiesce and again after the resume."""
        after = self.target.counters_after
        served = sorted((chardev.served, index) for index, chardev in self.streaming if chardev.conn is not None)
        return wire.ReleaseInfo.info(self.quiesce_at, self.started, self.instance.lifecycle.get("setup-ms"),
                                     [] if after else self._counters(), [index for _, index in served], after)

    def _counters(self) -> list:
        """[label, rx, tx] of each chardev sent in the precopy that changed only in
        its byte counts since (found in C)."""
        return [[chardev.label, chardev.rx_bytes, chardev.tx_bytes]
                for chardev in compress(self.sent, map(_COUNTS_CHANGED, self.sent))
                if chardev.label not in self.changed]

    # ----- the end -----------------------------------------------------------

    async def abort(self, reason: str, status: MigrationStatus = MigrationStatus.FAILED,
                    timed_out: bool = False) -> None:
        """Roll back: tell the target first (it holds dups of our fds, or connections
        restored from our TCP state, and must drop them), take the address back,
        then every chardev resumes as if nothing had happened."""
        self.aborting = True
        if self.chan is not None:
            self.chan.send_now(wire.Abort(reason))
            self.chan.close()
        if self.releasing:
            self.releasing = False
            try:
                await repair.hook("--reclaim-cmd", self.hooks.get("reclaim"))
            except repair.HookFailed as exc:
                log.error("%s: this host may not answer the service address any more", exc)
            if not self.hooks.get("reclaim"):
                log.warning("no --reclaim-cmd: the service address stays released although the connections "
                            "serve on here")
        repair.undo(self.in_repair)  # after the reclaim: each window probe then reaches its peer
        if self.late:
            self.late.forward(here=True)  # if the address is back
            self.late.close(self.tcp_moved)
        self.instance.thaw()
        log.warning("migration %s: %s; every chardev serves as before", status.value, reason)
        self.instance.lifecycle.migration_to(status, error=reason, error_class="timeout" if timed_out else None)

    async def hand_over(self) -> bool:
        """After the commit: tell the target at once (its reading ends the downtime),
        wait for TAKEN, then close our copies. A target that dies before TAKEN has
        read nothing (it says TAKEN before its first read), so then every chardev
        resumes here instead."""
        if self.target.pid:
            # The main process may name its successor: systemd (NotifyAccess=all) then
            # follows the handover even if we exit before the target has said so itself.
            systemd.notify(f"MAINPID={self.target.pid}")
        try:
            await self.chan.send(wire.Released(self.release), None)
            released_at = time.monotonic()
            marks.span("source quiesced", self.quiesce_at, released_at)
            if self.late:
                self.late.forward()  # the target has the address (its --claim-cmd ran before its ACK)
            if self.target.counters_after:
                await self._send_counters()
            faults.point("source-after-released")
            taken = await self._wait_taken()
        except (OSError, wire.ProtocolError):
            taken = False
        if taken is None and self.target.pid and process.alive(self.target.pid):
            # Silent, but alive (stopped, say): it holds every connection, and has
            # read nothing yet. Resuming here could make two readers; letting go cannot.
            log.warning("the target (pid %d) has not said it took over; it holds every connection, "
                        "so this source lets go of them", self.target.pid)
            taken = True
        if not taken:
            if self.target.pid:
                systemd.notify(f"MAINPID={os.getpid()}")
            self.committed = False
            await self.abort("the target died after the commit, before taking over (it had read nothing)")
            return False
        # What is left here (closing our copies, the exit) must not take a CPU from
        # the target serving: nothing waits on us any more. The target closes the
        # channel once it has served its first turn (or at once). SCHED_IDLE, not
        # nice 19: a niced task runs out its slice before a waking one may
        # preempt it (milliseconds, which the peers of the target's first turns
        # felt); any task preempts an idle-policy one as it wakes.
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            try:
                os.nice(19)
            except OSError:
                pass
        await self._wait_closed()
        if self.late:
            self.late.forward()  # what reached us while the target took over
            self.late.close(self.tcp_moved)
        # Connections in repair mode close silently: the target's now.
        for chardev in self.instance.chardevs.values():
            chardev.released()
        self.in_repair.clear()
        marks.span("source after released", released_at)
        remote = repair.status_fields(self.instance.chardevs, self.tcp_moved) if self.address.tcp else {}
        self.instance.lifecycle.migration_to(
            MigrationStatus.COMPLETED, chardevs=self.moved,
            downtime_ms=round((released_at - self.quiesce_at) * 1000, 3),
            total_ms=round((released_at - self.started) * 1000, 3), target=self.target.to_dict(), **remote)
        log.info("migration completed: %d chardev(s) moved to pid %s", self.moved, self.target.pid)
        self.chan.close()
        return True

    async def _send_counters(self) -> None:
        """The byte counts RELEASED left out, now that the target serves; a
        failure only costs the target those counts (logged here). Counts too
        many for one frame are left out and an empty COUNTERS goes instead, so
        that the target does not wait for them."""
        deadline = time.monotonic() + COUNTERS_TIMEOUT
        try:
            try:
                await self.chan.send(wire.Counters(self._counters()), deadline)
            except wire.LocalProtocolError as exc:  # refused before anything went out
                log.warning("the byte counts since the precopy are left out: %s", exc)
                await self.chan.send(wire.Counters([]), deadline)
        except (OSError, wire.ProtocolError, channel.ChannelTimeout) as exc:
            log.warning("could not send the target the byte counts since the precopy: %s", exc)

    async def _wait_taken(self) -> bool | None:
        """Whether the target said TAKEN; None if it stayed silent for TAKEN_TIMEOUT, or
        for STOP_GRACE once the instance is asked to stop. Every wait after the commit
        has a deadline: a stopped target must not keep the source alive through SIGTERM."""
        receive = asyncio.ensure_future(self.chan.next_event(None))
        stop = asyncio.ensure_future(self.instance.stopping.wait())
        try:
            done, _ = await asyncio.wait({receive, stop}, timeout=TAKEN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done and stop in done:
                await asyncio.wait({receive}, timeout=STOP_GRACE)
            if not receive.done():
                return None
            return isinstance(receive.result(), wire.Taken)
        except (OSError, wire.ProtocolError):
            return False
        finally:
            receive.cancel()
            stop.cancel()

    async def _wait_closed(self) -> None:
        """Until the target closes the channel after TAKEN, CLOSE_WAIT at most:
        nothing comes on it any more."""
        try:
            await self.chan.next_event(time.monotonic() + CLOSE_WAIT)
        except (OSError, wire.ProtocolError, channel.ChannelTimeout):
            pass


_BEFORE_ACCEPT = (wire.State.START, wire.State.HELLO, wire.State.TABLE, wire.State.TABLE_DONE)


def _failure(exc: BaseException, session: SourceSession):
    """(reason, status, timed out) for a failure before the commit; None for one
    that must propagate (a cancel after the commit, a bug)."""
    cancelled = MigrationStatus.CANCELLED
    if isinstance(exc, asyncio.CancelledError):
        return None if session.committed else ("cancelled", cancelled, False)
    if isinstance(exc, channel.ChannelTimeout):
        waiting = f": {exc}" if str(exc) else ""
        return f"timed out after {session.timeout:g} s{waiting}", MigrationStatus.FAILED, True
    if isinstance(exc, MigrationCancelled):
        return str(exc), cancelled, False
    if isinstance(exc, MigrationFailed):
        return str(exc), MigrationStatus.FAILED, False
    if isinstance(exc, wire.RemoteProtocolError):
        return f"the target broke the protocol: {exc}", MigrationStatus.FAILED, False
    if isinstance(exc, ssl.SSLError):
        return f"the TLS channel failed: {exc.reason or exc}", MigrationStatus.FAILED, False
    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
        step = session.chan.codec.state.name.lower()
        hint = ""
        if isinstance(session.chan, channel.TlsChannel) and session.chan.codec.state in _BEFORE_ACCEPT:
            hint = " (a TLS target closes so when it refuses our certificate: see its log)"
        return f"the target closed the channel during {step}{hint}", MigrationStatus.FAILED, False
    if isinstance(exc, (OSError, wire.ProtocolError)):
        return f"channel error: {exc}", MigrationStatus.FAILED, False
    if isinstance(exc, Exception) and not session.committed:
        log.error("migration: internal error", exc_info=exc)  # a bug; the chardevs serve on regardless
        return f"internal error: {exc!r}", MigrationStatus.FAILED, False
    return None
