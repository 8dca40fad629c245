"""The target side of a migration (`migrate-in`): wait on the channel, check the
source's table against our own `local-incoming` chardevs, check every fd received
against its spec (those of the precopy while the source still serves), take the
state of what changed since, acknowledge (the commit point), take over.

A source that is malformed, foreign or mismatched is refused with a log line and
the target goes on waiting for the next one."""

import asyncio
import dataclasses
import errno
import fcntl
import gc
import logging
import operator
import os
import resource
import socket
import ssl
import time

from fdmig import backends, faults, fdcheck, marks, nbio, pacing, paths, process, spec as specs, tcprepair, tlscreds
from fdmig.chardev import FD_RESERVE
from fdmig.errors import FdmigError, SpecError, TimeoutExpired
from fdmig.lifecycle import MigrationStatus
from fdmig.migration import channel, form, repair, wire
from fdmig.migration.session import Session, drive

log = logging.getLogger("fdmig")
SESSION_TIMEOUT = 30.0  # a source that stalls longer than this is dropped
RELEASE_TIMEOUT = 10.0  # after our ACK, a source silent this long is dropped (it rolls back)
# A TCP peer that has not completed its TLS handshake by then is dropped: short,
# since anyone on the network may connect, and one at a time is heard.
HANDSHAKE_TIMEOUT = 5.0
REBIND_WAIT = 2.0  # how long a chardev opened afresh waits for its TCP port to be free
# Chardevs staged, or precopy sections taken, at a time (a millisecond or two),
# paced (fdmig.pacing): the source's peers want the CPU meanwhile.
SLICE = 32
CHECK_SLICE = 4 * SLICE  # ... checked as a set (spec.SetCheck), a quarter of parsing's cost a chardev
FIRST_TURN_WAIT = 0.1  # the longest the takeover waits for the first turn of serving (take_over)
COUNTERS_WAIT = 1.0  # ... and then for the byte counts behind RELEASED, which the source sends at once
_COUNTS = operator.attrgetter("rx_bytes", "tx_bytes")


class Refused(Exception):
    """The source is refused; the reason goes to the log and to the source."""


class Plan:
    """What the target will hold: spec by label, in the source's order, and the
    source's capabilities, which the target carries on."""

    def __init__(self, specs_by_label: dict, source_order: list[str], capabilities: dict):
        self.specs = specs_by_label
        self.order = source_order
        self.capabilities = capabilities


async def make_plan(own: list, table: wire.Table, remote: bool = False) -> Plan:
    """Check the source's table against our chardevs; adopt what we do not name.
    `remote`: over a TCP channel, where only TCP state can arrive (x-tcp-repair).
    The source's specs are parsed SLICE at a time, paced: its peers want the CPU."""
    if remote:
        if table.capabilities.get("local-char-socket"):
            raise Refused("capability local-char-socket passes fds, which cannot cross hosts")
        if table.capabilities.get(repair.CAPABILITY) and not tcprepair.capable():
            raise Refused(f"capability {repair.CAPABILITY} needs CAP_NET_ADMIN, which this target lacks")
    live = bool(table.capabilities.get("local-char-socket"))
    tcp = remote and bool(table.capabilities.get(repair.CAPABILITY))
    source: dict = {}

    def parse(entries) -> None:
        for entry in entries:
            try:
                spec = specs.from_dict({k: v for k, v in entry.items() if not k.startswith("x-")})
            except SpecError as exc:
                raise Refused(f"the source's table has a bad chardev: {exc}") from None
            if spec.id in source:  # else the set's check would see only the last of them
                raise Refused(f"the source's table names chardev {spec.id} twice")
            source[spec.id] = spec
    await pacing.in_slices(table.chardevs, SLICE, parse, "target parse")
    result = dict(source)
    for mine in own:
        theirs = source.get(mine.id)
        if theirs is not None and theirs.kind == "pty" and not mine.local_incoming:
            raise Refused(f"chardev {mine.id}: the source's pty moves only live, but this target would open "
                          "a new one (hanging up the program on it): mark it local-incoming=on here, or leave "
                          "it out and the target adopts it")
        if mine.local_incoming:
            if theirs is None:
                raise Refused(f"chardev {mine.id}: local-incoming=on, but the source has no such chardev")
            if remote and not (tcp and theirs.kind == "inet"):
                raise Refused(f"chardev {mine.id}: local-incoming=on, but over a TCP channel only a TCP "
                              f"chardev can arrive live, with capability {repair.CAPABILITY} on at the source")
            if not (live or remote):
                raise Refused(f"chardev {mine.id}: local-incoming=on, but the source's capability "
                              "local-char-socket is off, so no fd can arrive")
            if not theirs.support_local_migration and theirs.kind != "pty":
                raise Refused(f"chardev {mine.id}: local-incoming=on, but the source does not mark it "
                              "support-local-migration=on")
            if mine.kind == "pty" and theirs.kind == "pty" and not mine.path:
                mine = dataclasses.replace(mine, path=theirs.path)  # the pty that comes, whichever it is
            if (mine.address, mine.role) != (theirs.address, theirs.role) and theirs.kind not in ("fd", "fdname"):
                raise Refused(f"chardev {mine.id}: {mine.described} here, but {theirs.described} on the source")
        result[mine.id] = mine
    order = [e["id"] for e in table.chardevs] + [m.id for m in own if m.id not in source]
    check = specs.SetCheck()
    try:
        await pacing.in_slices(list(result.values()), CHECK_SLICE, check.add, "target check")
        check.done()
    except SpecError as exc:
        raise Refused(f"the chardevs do not fit together: {exc}") from None
    return Plan(result, order, {k: bool(v) for k, v in table.capabilities.items()})


def check_fd(fd: int, role: str, spec, label: str) -> socket.socket:
    """Take ownership of `fd` (closed if refused) as a socket, if it is what `spec`
    says a `role` fd must be (fdcheck)."""
    if spec.backend != "socket":
        return _owned(fd, backends.check, role, spec, label)  # non-blocking already, as the source held it
    sock = _owned(fd, fdcheck.stream_socket, spec, label, role)
    if spec.frontend != "service":
        # Not a service's: O_NONBLOCK belongs to the open file, which the running
        # service shares and uses as it is.
        sock.setblocking(False)
    return sock


def check_notify_socket(fd: int, path: str) -> socket.socket:
    """A `run` instance's notify socket (closed if refused)."""
    sock = _owned(fd, fdcheck.notify_socket, path)
    sock.setblocking(False)
    return sock


def _owned(fd: int, check, *args) -> socket.socket:
    try:
        return check(fd, *args)
    except FdmigError as exc:
        os.close(fd)
        raise Refused(str(exc)) from None


def fd_headroom() -> int:
    """Fds this process may still open, keeping the reserve every instance keeps."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - len(os.listdir("/proc/self/fd")) - FD_RESERVE


def accept_info(info: dict, remote: bool) -> dict:
    """ACCEPT's info (wire.TargetInfo): `info`, and what this target takes that
    an older one would not: RELEASED's byte counts in COUNTERS, behind it, out
    of the downtime (not when it hands the fds on to a program, which would
    never read them), and over TCP, the chardevs whose connections move with
    their TCP state staged from the precopy."""
    return {**info, **({} if info.get("exec") else {"counters-after": True}),
            **({"tcp-precopy": True} if remote else {})}


async def stage(instance, plan: Plan) -> dict:
    """Register every chardev of the plan, unopened; a bridge after its partner.
    SLICE at a time, paced, as make_plan."""
    ordered = specs.partners_first(plan.specs[label] for label in plan.order)
    staged: dict = {}

    def register(some) -> None:
        for spec in some:
            staged[spec.id] = instance.register(spec, frame=False)
    await pacing.in_slices(ordered, SLICE, register, "target stage")
    return staged


class Received:
    def __init__(self, hello, plan, sections, sockets, info, chan, service=None, stored=(),
                 restorer: repair.Restorer | None = None, deferred=None):
        self.hello = hello
        self.plan = plan
        self.sections = sections  # label -> wire.Section
        self.sockets = sockets  # label -> {role: socket}
        self.info = info  # RELEASED's info, as it came
        self.released: wire.ReleaseInfo | None = None  # ... decoded, after their first turn (take_over)
        self.chan = chan
        self.service = service  # a `run` instance's (wire.ServiceState, notify socket), or None
        self.stored = list(stored)  # its store: [(wire.StoredState, fd)] in the order stored
        self.restorer = restorer or repair.Restorer()  # over TCP: the connections restored in repair mode
        self.deferred = deferred or {}  # TABLE index -> fd, of the streaming chardevs (see resume())
        self.resumed_at: float | None = None  # when the moved chardevs resumed (resume())
        self.first_turn: asyncio.Future | None = None  # done once they have been served a turn
        self.counts_at_resume: dict = {}  # label -> (rx, tx) as staged, at the resume
        self.stdio: dict[str, int] = {}  # the source's stdout and stderr, by name, if asked for


class TargetSession(Session):
    """One source's attempt: on HELLO the name, on TABLE the plan (the chardevs
    staged, unopened, while the source still serves), on PRECOPY and TRANSFER the
    fds and state, each section worked on as its frame arrives; ACK, then RELEASED.
    Refused raised from any step: the source is told why, and everything staged
    or received is dropped (abort)."""

    # The source quiesces as it reads our HELD: TRANSFER comes inside the downtime
    # (RELEASED too: _acknowledge polls for it itself).
    in_downtime = (wire.Transfer,)

    def __init__(self, instance, chan, own: list, info: dict, who: str = "the source"):
        self.instance = instance
        self.who = who
        self.own = own
        self.info = info
        self.chan = chan
        # Over TCP the source is on another host: its pid says nothing here.
        self.remote = isinstance(chan, channel.TlsChannel)
        self.deadline = time.monotonic() + SESSION_TIMEOUT
        self.hello = None
        self.plan = None
        self.chardevs: dict = {}  # label -> the staged Chardev
        self.sections: dict = {}  # label -> the latest wire.Section
        self.sockets: dict[str, dict[str, socket.socket]] = {}  # label -> role -> socket
        self.fresh = {m.id for m in own if not m.local_incoming}  # we open these afresh
        self.seen: set = set()  # labels with a section in the current PRECOPY or TRANSFER
        self.service = None  # a `run` instance's (wire.ServiceState, notify socket)
        self.stored: dict[int, tuple] = {}  # its store by index: (wire.StoredState, fd)
        self.stdio: dict[str, int] = {}  # the source's stdout and stderr, if we asked for them
        self.taking = False  # sections are arriving: take them as they come
        self.restorer = repair.Restorer()
        # The streaming chardevs' fds by TABLE index, which get their events in our
        # epoll only at the resume, in the order RELEASED's `served` gives.
        self.deferred: dict[int, int] = {}
        self.table_index: dict[str, int] = {}
        self.claimed = False  # --claim-cmd has run (or begun): an abort releases the address

    async def run(self) -> Received:
        try:
            return await drive(self)
        except BaseException as exc:
            await self.abort(exc)
            raise

    # ----- the steps ---------------------------------------------------------

    async def begin(self) -> None:
        self.expected = (wire.Hello, self.on_hello, "saying hello")

    async def on_hello(self, hello: wire.Hello) -> None:
        if hello.name != self.instance.name:
            raise Refused(f"source instance '{hello.name}' is foreign: this target waits for '{self.instance.name}'")
        self.hello = hello
        faults.point("target-after-hello")
        self.expected = (wire.Table, self.on_table, "sending its table")

    async def on_table(self, table: wire.Table) -> None:
        self.plan = await make_plan(self.own, table, self.remote)
        self.table_index = {entry["id"]: index for index, entry in enumerate(table.chardevs)}
        coming = sum(wire.entry_fds(entry) for entry in table.chardevs)
        restoring = self.remote and self.plan.capabilities.get(repair.CAPABILITY)
        if restoring:  # a blank socket per marked TCP chardev, and its listener for a server
            coming += repair.Restorer.fds(self.plan.specs[e["id"]] for e in table.chardevs
                                          if e["id"] not in self.fresh)
        headroom = fd_headroom()
        if coming > headroom:
            raise Refused(f"{coming} fds would come, more than the {headroom} this target "
                          "can still open (RLIMIT_NOFILE)")
        faults.point("target-after-table")
        # Built before accepting: the source still serves meanwhile, so this work
        # stays out of the downtime. Frozen after it, not before: the collector must
        # take the staging's garbage now, not at the first allocation after the thaw.
        # Nothing is read until the takeover: a restored chardev is watched, never read.
        self.chardevs = await stage(self.instance, self.plan)
        if restoring:
            try:
                self.restorer.prepare(self.plan.specs[label] for label in self.chardevs
                                      if label not in self.fresh)
            except FdmigError as exc:
                raise Refused(str(exc)) from None
        self.instance.freeze(quiesce=False)
        await self.chan.send(wire.Accept(accept_info(self.info, self.remote)), self.deadline)
        self.taking = True
        self.expected = (wire.Precopy, self.on_precopy, "its precopy")

    async def progress(self) -> None:
        if self.taking:
            await self._take_some(self.chan.codec.take_sections())

    async def on_precopy(self, precopy: wire.Precopy) -> None:
        await self._take_some(precopy.sections)
        self.seen = set()
        faults.point("target-after-precopy")
        await self.chan.send(wire.Held(), self.deadline)
        self.expected = (wire.Transfer, self.on_transfer, "the state")

    async def on_transfer(self, transfer: wire.Transfer) -> Received:
        began = time.monotonic()
        self._take(transfer.sections)
        self._unstage_gone()
        marks.span("target transfer taken", began)
        self.taking = False
        for mine in self.own:
            if mine.local_incoming and not self.sockets.get(mine.id):
                raise Refused(f"chardev {mine.id}: local-incoming=on, but no fd arrived for it")
        for label, spec in self.plan.specs.items():
            if spec.kind == "pty" and label not in self.fresh and not self.sockets.get(label):
                raise Refused(f"chardev {label}: a pty moves only live, but its fds did not arrive")
        if self.remote and self.instance.hooks.get("claim"):
            # Only now, every connection restored (in repair mode, sending nothing):
            # a segment reaching this host for one not restored yet would be reset.
            # They resume only after our ACK, and a failure is still a rollback.
            self.claimed = True
            try:
                await repair.hook("--claim-cmd", self.instance.hooks["claim"])
            except repair.HookFailed as exc:
                raise Refused(str(exc)) from None
        strangers = self.restorer.strangers()
        if strangers:
            address, labels = strangers[0]
            raise Refused(f"chardev {labels[0]}: its connection's address {address} is not this host's"
                          f"{' after --claim-cmd' if self.claimed else ''} "
                          f"({sum(len(labels) for _, labels in strangers)} such connection(s)): "
                          "its peer would be answered by the old host, which resets it; move that address too")
        faults.point("target-before-ack")
        acked = time.monotonic()
        info = await self._acknowledge()
        marks.span("target ack to released", acked)
        faults.point("target-after-released")
        service, stored = self.service, [self.stored[i] for i in sorted(self.stored)]
        self.service, self.stored = None, {}  # the takeover's now, not abort()'s to close
        received = Received(self.hello, self.plan, self.sections, self.sockets, info, self.chan, service,
                            stored, self.restorer, self.deferred)
        received.stdio, self.stdio = self.stdio, {}
        marks.span("target transfer to released", began)
        if not self.info.get("exec"):
            resume(self.instance, received)  # at once: this ends the downtime
        return received

    def refused(self, reason: str) -> Exception:
        return Refused(f"the source gave up: {reason}")

    def closed_early(self, what: str) -> Exception:
        return Refused(f"the source closed the channel before {what}")

    # ----- sections ----------------------------------------------------------

    async def _take_some(self, sections) -> None:
        """Take sections: in the precopy SLICE at a time, paced (fdmig.pacing).
        Checking and staging one costs us some 50 us, five times what making it
        costs the source, and the source's peers want that CPU meanwhile (at 1000
        streaming peers, a frame's 252 unpaced were their longest pause)."""
        if self.expected[0] is wire.Precopy:  # the source serving on, not the downtime
            await pacing.in_slices(sections, SLICE, self._take, "target precopy")
        else:
            self._take(sections)

    def _take(self, batch) -> None:
        """The precopy's sections (fds and state, the source still serving), then
        those of the chardevs that changed since (quiesced: their state, the held
        fds they keep, the fds of connections made since)."""
        now = time.time()
        for section in batch:
            if section.label.startswith("#"):
                if section.label.startswith(repair.TCP_STATES):
                    self._take_tcp_states(section)
                elif section.label.startswith(repair.TCP_SECTION):
                    self._take_tcp_piece(section)
                else:
                    self._take_service(section)
                continue
            spec = self.plan.specs.get(section.label)
            if spec is None or section.label in self.seen:
                raise Refused(f"chardev {section.label}: a section for a chardev not in the table, or twice")
            self.seen.add(section.label)
            if section.label in self.fresh:
                if "tcp" in section.meta or repair.LATER in section.meta:
                    raise Refused(f"chardev {section.label}: its connection moves live ({repair.CAPABILITY}), but "
                                  "this target opens it afresh: mark it local-incoming=on, or leave it to the table")
                continue
            self.sections[section.label] = section
            state = section.state(now)
            if "tcp" in section.meta:
                self._restore_tcp(section, spec, state)
                continue
            if repair.LATER in section.meta:
                self._stage_tcp(section, spec, state)
                continue
            if section.label in self.restorer.staged:
                raise Refused(f"chardev {section.label}: staged to come with its TCP state, but its section "
                              "has none")
            by_role = self.sockets.setdefault(section.label, {})
            for role in state.held:
                if role not in by_role or role in section.fds:
                    raise Refused(f"chardev {section.label}: the section names a held fd {wire.show(role)}, "
                                  f"but the precopy brought {sorted(by_role) or 'none'} for it")
            chardev = self.chardevs[section.label]
            if section.fds or set(state.held) != by_role.keys():
                chardev.unwatch()  # its sockets change
                for role in [r for r in by_role if r not in state.held]:
                    by_role.pop(role).close()  # gone on the source since the precopy
                for role, index in section.fds.items():  # into what abort() closes
                    by_role[role] = check_fd(self.chan.take(index), role, spec, section.label)
            conn = by_role.get("conn")
            if by_role and spec.backend != "socket":
                expected = backends.roles(spec)
                if set(by_role) != set(expected):
                    raise Refused(f"chardev {section.label}: {wire.show(sorted(by_role))} arrived for a "
                                  f"{spec.kind} chardev, which moves with its {' and '.join(expected)} fds")
                conn = backends.join(spec, by_role)
            form.restore(chardev, state, section.outbuf, conn, by_role.get("listener"))
            if not by_role:
                del self.sockets[section.label]  # nothing moves: opened afresh, as unmarked ones
            elif not chardev.watched:
                # So that resuming thousands is a flag each, with their events set now
                # (the poller is paused: nothing is read). A streaming peer's fd is
                # served first at the resume, in the order RELEASED gives.
                chardev.watch_now(defer=False)
                if state.streaming:
                    self.deferred[self.table_index[section.label]] = chardev.fd
        faults.point("target-after-batch")

    def _take_tcp_piece(self, section) -> None:
        self._tcp_section(section)
        try:
            label = self.restorer.piece(section, self.plan.specs)
            if "tcp" not in section.meta:
                return  # the last piece of a staged chardev's connection, which comes alone, says "tcp"
            first = self.restorer.restore_staged(label, section.outbuf, section.meta["tcp"], self.plan.specs[label])
        except FdmigError as exc:
            raise Refused(str(exc)) from None
        self._write_first(label, first)

    def _take_tcp_states(self, section) -> None:
        """The connections of staged chardevs, each from its state in one piece."""
        self._tcp_section(section)
        specs, restore = self.plan.specs, self.restorer.restore_staged
        try:
            for label, blob in self.restorer.states(section, specs):
                self._write_first(label, restore(label, blob, len(blob), specs[label]))
        except FdmigError as exc:
            raise Refused(str(exc)) from None

    def _tcp_section(self, section) -> None:
        if not self.remote or section.label in self.seen or self.expected[0] is wire.Precopy:
            raise Refused(f"{wire.show(section.label)}: TCP state over a unix channel, before the downtime, or twice")
        self.seen.add(section.label)

    def _write_first(self, label: str, first: bytes) -> None:
        if first:  # what its kernel never sent goes out first
            chardev = self.chardevs[label]
            chardev.outbuf[:0] = first
            chardev.watch_now(defer=False)

    def _stage_tcp(self, section, spec, state) -> None:
        """Before the downtime (x-tcp-repair): a chardev whose connection's TCP
        state comes inside it, staged with the socket to restore it into and its
        events set (nothing is read before the resume), as _take stages one whose
        fds come in the precopy."""
        if self.expected[0] is not wire.Precopy or not self.remote or spec.kind != "inet" \
                or not self.plan.capabilities.get(repair.CAPABILITY) or state.held or section.fds \
                or section.outbuf:
            raise Refused(f"chardev {section.label}: a connection to come with its TCP state, for a chardev "
                          "that cannot move so")
        try:
            conn, listener = self.restorer.stage(section.label, spec, section.meta.get(repair.LOCAL))
        except FdmigError as exc:
            raise Refused(str(exc)) from None
        by_role = self.sockets[section.label] = {"conn": conn}
        if listener is not None:
            by_role["listener"] = listener
        chardev = self.chardevs[section.label]
        form.restore(chardev, state, b"", conn, listener)
        chardev.watch_now(defer=False)

    def _unstage_gone(self) -> None:
        """The staged chardevs whose connection did not come (gone at the source
        since the precopy): opened afresh, as any that came with none."""
        for label in self.restorer.unrestored():
            chardev = self.chardevs[label]
            chardev.unwatch()  # while its fds are open: they leave the epoll as they close
            form.forget(chardev)
            self.restorer.unstage(label)
            self.sockets.pop(label, None)

    def _restore_tcp(self, section, spec, state) -> None:
        """A connection from its TCP state, in repair mode (x-tcp-repair), and its
        server's listener made again; the bytes it never sent go out first."""
        if not self.remote or not self.plan.capabilities.get(repair.CAPABILITY) or spec.kind != "inet" \
                or state.held or section.fds or self.expected[0] is wire.Precopy:
            raise Refused(f"chardev {section.label}: TCP state before the downtime, or for a chardev that "
                          "cannot move so")
        try:
            conn, listener, outbuf = self.restorer.restore(section, spec)
        except FdmigError as exc:
            raise Refused(str(exc)) from None
        by_role = self.sockets.setdefault(section.label, {"conn": conn})
        if listener is not None:
            by_role["listener"] = listener
        chardev = self.chardevs[section.label]
        if by_role["conn"] is not conn:  # staged, bound where its connection no longer is
            chardev.unwatch()  # while its fd is open: it leaves the epoll as it closes
            by_role["conn"].close()
            by_role["conn"] = conn
        form.restore(chardev, state, outbuf, conn, listener)
        chardev.watch_now(defer=False)  # its events now, as _take's (nothing is read before the resume)

    def _take_service(self, section) -> None:
        """A `run` instance's service (its state and notify socket) and its store,
        one stored fd per section (any kind of fd may be stored: none is checked)."""
        label = section.label
        if label in self.seen:
            raise Refused(f"{label}: a section twice")
        self.seen.add(label)
        if label == wire.STDIO_SECTION and self.info.get("stdio") and section.fds \
                and set(section.fds) <= set(wire.STDIO):
            self.stdio = {name: self.chan.take(fd) for name, fd in section.fds.items()}
        elif label == wire.SERVICE_SECTION and set(section.fds) == {"notify"}:
            state = wire.ServiceState.decode(section.meta)
            sock = check_notify_socket(self.chan.take(section.fds["notify"]),
                                       paths.notify_beside(self.instance.control_path))
            self.service = (state, sock)
        elif label.startswith(wire.STORED_SECTION) and label[len(wire.STORED_SECTION):].isdigit() \
                and set(section.fds) == {"fd"}:
            stored = wire.StoredState.decode(section.meta)
            self.stored[int(label[len(wire.STORED_SECTION):])] = (stored, self.chan.take(section.fds["fd"]))
        else:
            raise Refused(f"{wire.show(label)}: not a section this target knows")

    # ----- the commit --------------------------------------------------------

    async def _acknowledge(self) -> dict:
        """ACK, then the source's RELEASED: the info it sent with it."""
        try:
            await self.chan.send(wire.Ack(), self.deadline)
            faults.point("target-after-ack")
            # The commit point is the source reading our ACK; it may still roll back
            # if its timeout fires first, so nothing is read until it says RELEASED.
            final = await self.chan.next_event(time.monotonic() + RELEASE_TIMEOUT, spin=True)
        except channel.ChannelTimeout:
            # Nothing read yet, and the channel closes: a source that wakes up finds
            # it so and rolls back. Waiting on could keep this target forever.
            raise Refused(f"the source did not let go within {RELEASE_TIMEOUT:g} s of our acknowledgement") from None
        except (OSError, wire.RemoteProtocolError) as exc:
            final = exc
        if isinstance(final, wire.Abort):
            raise Refused(f"the source rolled back after our acknowledgement: {final.reason}")
        if isinstance(final, wire.Released):
            return final.info
        if self.remote and isinstance(final, (wire.ConnectionClosed, OSError)):
            # No pid to watch across hosts, but a source that rolls back says ABORT
            # first: one whose channel ends without a word has died, and its
            # connections (in repair mode, closed silently) live only here now.
            log.warning("the source %s closed the channel after our acknowledgement without a word: it has "
                        "gone; taking over what it sent", self.who)
            return {}
        if not self.remote and await process.wait_exit(self.hello.pid, timeout=10.0):
            # It died with everything sent: nobody else can read these fds any more,
            # and taking them over keeps every connection alive.
            log.warning("source pid %d died before letting go; taking over what it sent", self.hello.pid)
            return {}
        raise Refused("the source closed the channel before letting go, and lives on")

    async def abort(self, exc: BaseException) -> None:
        """Drop everything staged or received; tell the source why, if it is to hear."""
        for chardev in self.instance.chardevs.values():
            chardev.discard()  # staged, never opened
        for by_role in self.sockets.values():
            for sock in by_role.values():
                sock.close()
        if self.service is not None:
            self.service[1].close()
        for _, fd in self.stored.values():
            os.close(fd)
        for fd in self.stdio.values():
            os.close(fd)
        self.stdio = {}
        self.instance.chardevs.clear()
        self.restorer.discard()
        if self.claimed:
            # The source takes the address back: ours must go, or two hosts answer it.
            try:
                await repair.hook("--release-cmd", self.instance.hooks.get("release"))
            except repair.HookFailed as failed:  # not `exc`: that name is the reason to tell the source
                log.error("%s: this host may still answer the service address", failed)
            if not self.instance.hooks.get("release"):
                log.warning("the address --claim-cmd claimed stays here (no --release-cmd to give it back)")
        self.instance.thaw()
        if isinstance(exc, (Refused, wire.RemoteProtocolError)):
            try:
                if self.chan.codec.state not in (wire.State.FAILED, wire.State.RELEASED):
                    await self.chan.send(wire.Abort(str(exc)), time.monotonic() + 1)
            except (OSError, wire.ProtocolError, channel.ChannelTimeout):
                pass
        self.chan.close()


async def receive(instance, address, own: list, timeout: float | None, info: dict) -> Received:
    """Listen at `address` (a paths.ChannelAddress) until one source migrates successfully."""
    listener, close = _listen(address)
    context = tlscreds.context(instance.tls_creds, "server") if address.tcp else None
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout if timeout else None
    log.info("waiting for a source on %s", address)
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutExpired(f"no migration arrived on {address} within {timeout:g} s")
            try:
                sock, peer = await asyncio.wait_for(loop.sock_accept(listener), remaining)
            except asyncio.TimeoutError:
                continue
            admitted = await _admit(sock, peer, context)
            if admitted is None:
                continue
            chan, who, pid = admitted
            instance.lifecycle.migration_to(MigrationStatus.ACTIVE, error=None, source_pid=pid)
            try:
                return await TargetSession(instance, chan, own, info, who).run()
            except (Refused, wire.RemoteProtocolError) as exc:
                reason = f"refused source {who}: {exc}"
            except channel.ChannelTimeout:
                reason = f"dropped source {who}: it stalled for {SESSION_TIMEOUT:g} s"
            except OSError as exc:
                reason = f"lost source {who}: {exc}"
            log.warning("%s; still waiting", reason)
            # What query-migrate says on <name>.incoming.sock until the next source.
            instance.lifecycle.migration_to(MigrationStatus.FAILED, error=reason)
    finally:
        close()


def _listen(address):
    """The listening socket of `address`, and what closes it (and removes a path)."""
    if address.tcp:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        try:
            sock = nbio.listen_tcp(family, address.host, address.port)
        except OSError as exc:
            raise FdmigError(f"cannot listen on {address}: {exc.strerror}") from None
        return sock, sock.close
    paths.claim_path(address.path, what="a migration target")
    sock = paths.bind_private(address.path)
    inode = os.stat(address.path).st_ino

    def close():
        sock.close()
        paths.remove_own_socket(address.path, inode)
    return sock, close


async def _admit(sock: socket.socket, peer, context):
    """(channel, who, pid) for a source that may migrate here; None, logged, if not.
    Over unix: a peer of our uid (or root). Over TCP: a TLS peer with a certificate
    from our CA, checked before any frame."""
    if context is None:
        try:
            pid = paths.trusted_peer(sock)
        except paths.Stranger as exc:
            log.warning("refused a source of uid %d (pid %d): only uid %d or root may migrate here",
                        exc.uid, exc.pid, os.geteuid())
            sock.close()
            return None
        return channel.Channel(sock, wire.Role.TARGET), f"pid {pid}", pid
    who = f"at {peer[0]}:{peer[1]}" if ":" not in peer[0] else f"at [{peer[0]}]:{peer[1]}"
    chan = channel.TlsChannel(sock, wire.Role.TARGET, context)
    try:
        await chan.handshake(time.monotonic() + HANDSHAKE_TIMEOUT)
    except channel.ChannelTimeout:
        reason = f"it completed no TLS handshake within {HANDSHAKE_TIMEOUT:g} s"
    except (ssl.SSLError, OSError) as exc:
        reason = f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
    else:
        return chan, who, None
    await chan.refuse()
    log.warning("refused a source %s: %s; still waiting", who, reason if "TLS" in reason else f"TLS: {reason}")
    return None


def resume(instance, received: Received) -> None:
    """After RELEASED: the moved chardevs resume, which ends the downtime, and
    the source hears TAKEN before the first read (the loop has not run since),
    so that a source that never hears it knows we read nothing and may serve on."""
    received.restorer.resume()  # over TCP, out of repair mode (a window probe from each but the quiet)
    # The streaming ones' fds are served first, in the order the source would have
    # served them next: the peer that has waited longest first.
    deferred = received.deferred
    first = [fd for fd in map(deferred.get, wire.ReleaseInfo.order(received.info, len(received.plan.order)))
             if fd is not None]
    # What staging, the precopy and the downtime made (thousands of objects, which
    # live as long as the chardevs) out of the collector's way: else its first
    # collections after the thaw walk them, every peer waiting (a full one took
    # 85 ms at 5000 chardevs). The collector has been off since the table, so
    # nothing was collected meanwhile. Frozen only now, at the commit: what a
    # session that fails leaves is garbage the collector takes once abort()'s
    # thaw turns it on again, where frozen it would stay for good.
    gc.freeze()
    thawing = time.monotonic()
    received.resumed_at = instance.thaw(first)  # every moved chardev starts reading at the same instant
    marks.span("target thaw", thawing, received.resumed_at)
    received.chan.send_now(wire.Taken())
    faults.point("target-after-taken")
    # Their counts as staged, for RELEASED's to be put in after the first turn
    # (take_over): in C, where decoding those is a millisecond at 1000 chardevs.
    moved = list(map(instance.chardevs.__getitem__, received.sockets))
    received.counts_at_resume = dict(zip(received.sockets, map(_COUNTS, moved)))
    received.first_turn = instance.poller.after_turn(len(first))
    instance.poller.serve_now()  # the first turn begins in this one of the loop


async def take_over(instance, received: Received) -> None:
    """After RELEASED: the moved chardevs resume first (unless resume() has),
    then the rest are opened afresh."""
    if received.resumed_at is None:
        resume(instance, received)
    # The first turn of serving, every streaming peer waiting on it, has the CPU
    # before what follows here and before the source's teardown: the source waits
    # for our end of the channel to close. Bounded: streaming peers may have
    # nothing to send just now, and then there is no turn to wait for.
    try:
        await asyncio.wait_for(received.first_turn, FIRST_TURN_WAIT)
    except asyncio.TimeoutError:
        pass
    marks.span("target first turn", received.resumed_at)
    received.released = await _release_info(received)
    received.chan.close()
    apply_counters(instance, received.counts_at_resume, received.released)
    resumed_at = received.resumed_at
    moved = received.sockets
    for name, state in received.plan.capabilities.items():
        if name in instance.capabilities:
            instance.capabilities[name] = state
    released = received.released
    remote = isinstance(received.chan, channel.TlsChannel)
    quiesce_at, started_at = released.quiesce_at, released.started_at
    # Before the migration is complete, as no other can begin meanwhile.
    restorer = received.restorer
    await pacing.in_slices(restorer.transparent, SLICE, restorer.opaque, "target opaque")
    restorer.transparent.clear()
    instance.lifecycle.migration_to(
        MigrationStatus.COMPLETED, chardevs=len(moved), error=None,
        downtime_ms=round((resumed_at - quiesce_at) * 1000, 3) if quiesce_at is not None else None,
        total_ms=round((resumed_at - started_at) * 1000, 3) if started_at is not None else None,
        setup_ms=released.setup_ms, source_pid=received.hello.pid,
        **(repair.status_fields(instance.chardevs, received.restorer.moved) if remote else {}))
    for label, chardev in list(instance.chardevs.items()):
        if label not in received.sockets:
            received.restorer.unused(label)
            await _open_afresh(instance, chardev)
    marks.span("target after first turn", received.resumed_at)


async def _release_info(received: Received) -> wire.ReleaseInfo:
    """RELEASED's info, with the byte counts that follow it in COUNTERS if it
    says so (waited for COUNTERS_WAIT at most: without them, the moved chardevs
    count on from the precopy's counts, and the log says so)."""
    released = wire.ReleaseInfo.decode(received.info)
    if not released.counters_after:
        return released
    try:
        event = await received.chan.next_event(time.monotonic() + COUNTERS_WAIT)
    except (OSError, wire.ProtocolError, channel.ChannelTimeout) as exc:
        event = exc
    if isinstance(event, wire.Counters):
        return wire.ReleaseInfo.decode({**received.info, "counters": event.counters})
    log.warning("the source's byte counts since the precopy did not come after RELEASED (%s): those "
                "chardevs count on from the precopy's", type(event).__name__)
    return released


async def _open_afresh(instance, chardev) -> None:
    """Open a chardev that did not move. A TCP port still in use may be the source's
    on this host: it closes its listener once it has read TAKEN, so we try again
    for a while (there is no event for another process's close)."""
    deadline = time.monotonic() + REBIND_WAIT
    while True:
        try:
            await instance.open_registered(chardev)
            return
        except FdmigError as exc:
            if getattr(exc, "errno", None) != errno.EADDRINUSE or time.monotonic() > deadline:
                log.warning("chardev %s: not moved and cannot be opened afresh: %s", chardev.label, exc)
                return
        await asyncio.sleep(0.01)
        chardev = instance.register(chardev.spec)  # a failed open unregisters it


def apply_counters(instance, at_resume: dict, released: wire.ReleaseInfo) -> None:
    """The byte counts of chardevs that moved bytes, but nothing else, since the
    precopy: the source sends them with RELEASED, out of the downtime's way. What
    was counted here since the resume (`at_resume`: label -> the staged counts)
    is added to them."""
    for entry in released.ignored:
        log.warning("ignored a malformed byte count from the source: %s", entry)
    for label, rx_bytes, tx_bytes in released.counters:
        if label in at_resume:
            chardev = instance.chardevs[label]
            staged_rx, staged_tx = at_resume[label]
            chardev.rx_bytes += rx_bytes - staged_rx
            chardev.tx_bytes += tx_bytes - staged_tx
        else:
            log.warning("ignored a malformed byte count from the source: %s", wire.show(label))


def exec_handover(received: Received, argv: list[str]) -> None:
    """Hand the moved fds to `argv` by systemd's socket-activation protocol: from fd
    3 on, in label order, each chardev's connection named by its label and a
    server's listener after it as LABEL.listener; blocking, close-on-exec cleared."""
    from fdmig import systemd
    names, socks = [], []
    restorer = received.restorer
    restorer.resume()
    restorer.opaque(restorer.transparent)
    for label in sorted(received.sockets):
        by_role = received.sockets[label]
        section = received.sections[label]
        if "conn" in by_role:
            conn = by_role["conn"]
            conn.setblocking(True)
            carried = restorer.first.get(label, section.outbuf)
            if carried:
                conn.sendall(carried)  # carried bytes go first, as in serve
            names.append(label)
            socks.append(conn)
        if "listener" in by_role:
            names.append(f"{label}.listener")
            socks.append(by_role["listener"])
        if "out" in by_role:  # a pipe's FIFO written, beside the one read
            names.append(f"{label}.out")
            socks.append(by_role["out"])
    received.chan.send_now(wire.Taken())  # the program reads only after exec
    received.chan.close()
    first = systemd.SD_LISTEN_FDS_START
    # Lift every fd above the target range first, so no dup2 clobbers one still to move.
    lifted = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, first + len(socks)) for s in socks]
    for i, fd in enumerate(lifted):
        os.dup2(fd, first + i, inheritable=True)
        os.set_blocking(first + i, True)
        os.close(fd)
    env = dict(os.environ, **systemd.activation_env(names, os.getpid()))
    systemd.notify(f"MAINPID={os.getpid()}", f"STATUS=exec {argv[0]} with {len(names)} fd(s)")
    log.info("handing %d fd(s) to %s", len(names), " ".join(argv))
    logging.shutdown()
    marks.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        log.error("cannot exec %s: %s; the moved connections are lost", argv[0], exc.strerror)
        os._exit(1)
