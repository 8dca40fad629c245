"""Capability x-tcp-repair in a migration over a TCP channel: which chardevs move
with their TCP state, the sections that carry it, the source's undo, the
target's restore, and the shell commands that move the service address. The
sockets themselves are fdmig.tcprepair's; the bytes, fdmig.tcpstate's.

A marked TCP chardev's connection travels as its chardev's section (state and
carried bytes, as any) with the encoded TCP state: its last piece at the start of
that section's bytes ("tcp-here" of them), the pieces before it, if the state is
bigger than a piece, in TCP_SECTION sections ahead: a send queue may be
megabytes, a frame is bounded. A chardev the precopy brought (LATER), unchanged
since, sends its TCP state alone: in TCP_SECTION pieces, the last saying their
length, or, in one piece as most are, among the states of a TCP_STATES section,
one a frame."""

import functools
import ipaddress
import logging
import socket

from fdmig import fdcheck, nbio, process, tcpforward, tcprepair, tcpstate
from fdmig.errors import FdmigError
from fdmig.migration import form, wire

log = logging.getLogger("fdmig")
CAPABILITY = "x-tcp-repair"
TCP_SECTION = "#tcp-"  # + "N.I"; meta {"chardev": LABEL}; outbuf: a piece of its encoded state
# + "N": the TCP states of chardevs unchanged since the precopy, each in one piece,
# one after another: meta {"chardevs": [LABEL, ...], "tcp": [LENGTH, ...]}
TCP_STATES = "#tcps-"
LATER = "tcp-later"  # in a precopy section's meta: the chardev's connection comes inside the downtime
LOCAL = "tcp-local"  # beside it: [host, port], the connection's local address, for the target to bind to
# Connections dumped per frame sent: the target restores a frame while we dump
# the next, and what it does after our last frame is the downtime's tail.
BATCH = 16
PIECE = wire.MAX_FRAME // 4
HOOK_TIMEOUT = 10.0  # a --release-cmd, --reclaim-cmd or --claim-cmd that runs longer has failed


def moves(chardev, on: bool) -> bool:
    """Whether a migration over TCP moves `chardev` with its TCP state: a marked
    TCP chardev, capability x-tcp-repair on. Its listener is made again at the
    target; it moves live only while it has a connection."""
    return on and chardev.spec.kind == "inet" and chardev.spec.support_local_migration


class HookFailed(Exception):
    pass


async def hook(option: str, command: str | None) -> None:
    """Run `command` with sh -c (the output goes to our log); HookFailed naming
    `option` if it fails, cannot start or outlasts HOOK_TIMEOUT."""
    if not command:
        return
    try:
        returncode, output = await process.shell(command, HOOK_TIMEOUT)
    except OSError as exc:
        raise HookFailed(f"{option} cannot start: {exc.strerror or exc}") from None
    if returncode is None:
        raise HookFailed(f"{option} did not finish within {HOOK_TIMEOUT:g} s: {command}")
    lines = output.decode(errors="replace").strip().splitlines()
    for line in lines:
        log.info("%s: %s", option, line)
    if returncode:
        why = f"exit status {returncode}" if returncode > 0 else f"signal {-returncode}"
        raise HookFailed(f"{option} failed ({why}){': ' + lines[-1] if lines else ''}")
    log.info("%s done: %s", option, command)


class Moved:
    """What the TCP state of the moved connections came to, for status."""

    def __init__(self):
        self.labels: list[str] = []  # the chardevs whose connection moved, in order
        self.send_queue = self.unsent = self.recv_queue = 0
        self.precopied = 0  # those whose chardev came before the downtime, unchanged since
        self.forwarded: int | None = None  # the source's LateSegments, once closed

    @property
    def connections(self) -> int:
        return len(self.labels)

    def add(self, label: str, state: tcpstate.TcpState) -> None:
        self.labels.append(label)
        self.send_queue += len(state.send_queue)
        self.unsent += state.unsent
        self.recv_queue += len(state.recv_queue)

    def info(self) -> dict:
        info = {"connections": self.connections, "precopied": self.precopied, "send-queue-bytes": self.send_queue,
                "unsent-bytes": self.unsent, "recv-queue-bytes": self.recv_queue}
        if self.forwarded is not None:
            info["forwarded-segments"] = self.forwarded
        return info


def status_fields(labels, moved: Moved) -> dict:
    """The `migration` fields of a migration over a TCP channel (lifecycle keys):
    which of the chardevs `labels` moved live, which are opened afresh (their
    peers reconnect), and the TCP state that moved."""
    live = set(moved.labels)
    return {"moved_live": moved.labels, "reconnected": [label for label in labels if label not in live],
            "tcp_state": moved.info()}


# ----- the source ------------------------------------------------------------

class LateSegments:
    """The source's fdmig.tcpforward for one migration: watching from before the
    release, forwarding from the target's ACK, counted in the status."""

    def __init__(self, forwarder: tcpforward.Forwarder):
        self.forwarder = forwarder
        self.closed = False

    @classmethod
    def watch(cls, chardevs, on: bool) -> "LateSegments | None":
        """Watching for the segments of every connection that moves with its TCP
        state; None if none does, or if this host will not let us watch (then the
        peers retransmit on their own, after their timers: a log line says so)."""
        addresses = sorted({_local_address(chardev) for chardev in chardevs
                            if moves(chardev, on) and chardev.conn is not None})
        if not addresses:
            return None
        try:
            return cls(tcpforward.Forwarder(addresses))
        except OSError as exc:
            log.warning("cannot watch for what the peers send while their address moves (%s); they will "
                        "retransmit it after their own timers", exc.strerror or exc)
            return None

    def track(self, state: tcpstate.TcpState) -> None:
        self.forwarder.track(state.local, state.peer, state.recv_seq, state.mss)

    def forward(self, here: bool = False) -> None:
        """What was caught so far, on to the address: on the target's host, or
        with `here` on this one (see Forwarder.forward()). Called where a
        failure must not stop the migration's end: one is logged, and the rest
        retransmitted by the peers."""
        try:
            self.forwarder.forward(here)
        except OSError as exc:
            self.forwarder.failed += 1
            log.warning("cannot forward what the peers sent while their address moved: %s", exc.strerror or exc)

    def close(self, moved: Moved) -> None:
        """Stop watching; the counts go to the log and the migration's status.
        Once: a later call does nothing."""
        if self.closed:
            return
        self.closed = True
        forwarder = self.forwarder
        try:
            dropped = forwarder.dropped()
        except OSError:
            dropped = 0
        forwarder.close()
        moved.forwarded = forwarder.forwarded
        if forwarder.forwarded:
            log.info("forwarded %d segment(s) the peers sent while their address moved", forwarder.forwarded)
        if dropped or forwarder.failed:
            log.warning("%d segment(s) the peers sent while their address moved were not forwarded (%d "
                        "dropped by the kernel, %d failed to send): they retransmit them after their own timers",
                        dropped + forwarder.failed, dropped, forwarder.failed)


def _local_address(chardev) -> str:
    """The local address of a chardev's connection: a server's, bound to one
    address, from its spec (no call to the kernel inside the downtime)."""
    spec = chardev.spec
    return spec.host if spec.server and _one_address(spec.host) else chardev.conn.getsockname()[0]


@functools.lru_cache(maxsize=256)
def _one_address(host: str | None) -> bool:
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def precopy_section(chardev) -> tuple[wire.Section, tuple]:
    """Before the downtime, to a target that stages it (TargetInfo.tcp_precopy):
    the section of a connected chardev that moves with its TCP state, its fds
    left out (they stay here), so that the downtime carries only the
    connection's state and, if it changed since (form.fingerprint), the
    chardev's section again. With it, what dump() may take as read: the
    chardev's fingerprint and its connection's addresses (None if the kernel
    no longer has them)."""
    section = form.section(chardev, carry=False)
    meta = {**section.meta, LATER: True}
    try:
        names = (chardev.conn.getsockname()[:2], chardev.conn.getpeername()[:2])
        meta[LOCAL] = list(names[0])
    except OSError:
        names = None
    return wire.Section(section.label, meta, b""), (form.fingerprint(chardev), names)


def dump(chardevs, on: bool, in_repair: list, moved: Moved, late: LateSegments | None = None,
         precopied: dict | None = None, changed: set | None = None, batch: int = BATCH):
    """For every connected chardev that moves with its TCP state, its sections:
    pieces of the encoded state, then the chardev's own; yielded as a list for
    each `batch` of connections, a frame's worth, so that the caller sends one
    while it dumps on. Each socket goes into repair mode first, and into
    `in_repair`, for undo(). Quiesced and its address released: nothing
    changes any more. RepairError (naming the chardev) if one cannot be dumped.

    `precopied`: label -> what precopy_section() returned beside the section it
    sent. A chardev unchanged since, with no bytes to carry, goes as its TCP
    state alone: in one TCP_STATES section with the others of its frame whose
    state is one piece, else its pieces, the last saying their length. The
    labels of the others go into `changed`."""
    precopied = precopied or {}
    changed = set() if changed is None else changed
    enter, dump_one, encode, fingerprint = tcprepair.enter, tcprepair.dump, tcpstate.encode, form.fingerprint
    frame, labels, blobs, size = [], [], [], 0
    count = 0
    for chardev in chardevs:
        label = chardev.label
        if not (moves(chardev, on) and chardev.conn is not None):
            if label in precopied:
                changed.add(label)  # its connection has gone: the target opens it afresh
            continue
        fingerprint_then, names = precopied.get(label, (None, None))
        alone = fingerprint_then is not None and fingerprint_then == fingerprint(chardev) and not chardev.outbuf
        try:
            enter(chardev.conn)
            in_repair.append(chardev.conn)
            state = dump_one(chardev.conn, names if alone else None)
            blob = encode(state)
        except (tcprepair.RepairError, tcpstate.TcpStateError, OSError) as exc:
            raise tcprepair.RepairError(f"chardev {label}: {exc}") from None
        moved.add(label, state)
        if late:
            late.track(state)
        count += 1
        if alone:
            moved.precopied += 1
        if alone and len(blob) <= PIECE:  # most, in a downtime of thousands
            if size + len(blob) > PIECE:  # a section is bounded as a piece is
                frame.append(_states(labels, blobs))
                labels, blobs, size = [], [], 0
            labels.append(label)
            blobs.append(blob)
            size += len(blob)
        else:
            frame += _sections(chardev, label, blob, alone, f"{TCP_SECTION}{len(moved.labels)}.")
            if not alone and fingerprint_then is not None:
                changed.add(label)
        if count % batch == 0:
            yield frame + [_states(labels, blobs)] if labels else frame
            frame, labels, blobs, size = [], [], [], 0
    if frame or labels:
        yield frame + [_states(labels, blobs)] if labels else frame


def _sections(chardev, label: str, blob: bytes, alone: bool, prefix: str) -> list[wire.Section]:
    """A connection's sections, its state in pieces: for a chardev alone, the
    pieces; else the pieces then the chardev's own section."""
    pieces = tcpstate.parts(blob, PIECE)
    if alone:
        tail = pieces.pop()
        last = wire.Section(f"{prefix}{len(pieces)}", {"chardev": label, "tcp": len(blob)}, tail)
    else:
        section = form.section(chardev)  # its fds stay here: the TCP state is what moves
        # The last piece rides in the chardev's own section, before the bytes it
        # carries, when both fit: one section per connection, as a rule.
        here = pieces.pop() if len(pieces[-1]) + len(section.outbuf) <= PIECE else b""
        last = wire.Section(section.label, {**section.meta, "tcp": len(blob), "tcp-here": len(here)},
                            here + section.outbuf)
    sections = [wire.Section(f"{prefix}{i}", {"chardev": label}, piece) for i, piece in enumerate(pieces)]
    sections.append(last)
    return sections


def _states(labels: list, blobs: list) -> wire.Section:
    """The TCP_STATES section of `labels`' states (named after the first)."""
    return wire.Section(f"{TCP_STATES}{labels[0]}", {"chardevs": labels, "tcp": list(map(len, blobs))},
                        b"".join(blobs))


def undo(in_repair: list) -> None:
    """A rollback: every dumped connection out of repair mode, as it was."""
    for sock in in_repair:
        try:
            tcprepair.leave(sock)
        except OSError as exc:
            log.error("a connection stays in repair mode (%s): %s", sock, exc)
    in_repair.clear()


# ----- the target ------------------------------------------------------------

def _check(state: tcpstate.TcpState, spec, label: str) -> None:
    """A connection's state must be what its chardev's spec says (fdcheck's rule for a
    received fd): a server's at its port, a client's to its port, of its family."""
    if state.family != fdcheck.family_of(spec):
        raise FdmigError(f"chardev {label}: its TCP state is of another address family than {spec.address}")
    port = state.local[1] if spec.server else state.peer[1]
    if spec.port and port != spec.port:
        raise FdmigError(f"chardev {label}: its TCP state is on port {port}, not {spec.port}")


class Restorer:
    """Takes a TRANSFER's TCP sections and makes each connection again, in repair
    mode, with a listener afresh for a server chardev. A socket it returns is the
    caller's to close on a failure, which is silent: nothing leaves this host
    until resume()."""

    def __init__(self):
        self.pieces: dict[str, list[bytes]] = {}
        self.conns: list[socket.socket] = []  # in repair mode, until resume()
        self.transparent: list[socket.socket] = []  # restored, until opaque()
        self.probed: list[bool] = []  # for each of them: not tcprepair.quiet() (see tcprepair.leave())
        self.addresses: dict[tuple[int, str], list[str]] = {}  # (family, local address) -> labels
        self.listeners: dict[str, socket.socket] = {}  # label -> made before the downtime, until taken
        self.blanks: dict[str, socket.socket] = {}  # label -> a socket in repair mode, made likewise
        self.staged: dict[str, tuple] = {}  # label -> (blank, listener or None), taken by stage()
        self.bound: dict[str, tuple] = {}  # label -> the local address stage() bound its blank to
        self.restored: set[str] = set()  # labels whose connection is restored
        self.moved = Moved()
        self.first: dict[str, bytes] = {}  # label -> what to write first after resume()

    def piece(self, section: wire.Section, labels) -> str:
        """A TCP_SECTION's piece of a chardev's state, kept for the section that
        ends it; the chardev's label."""
        label = section.meta.get("chardev") if isinstance(section.meta, dict) else None
        if type(label) is not str or label not in labels:
            raise FdmigError(f"{wire.show(section.label)}: TCP state for {wire.show(label)}, not a chardev "
                             "of the table")
        if "tcp" not in section.meta:  # else the last, which restore_staged() takes
            self.pieces.setdefault(label, []).append(section.outbuf)
        return label

    def restore(self, section: wire.Section, spec) -> tuple[socket.socket, socket.socket | None, bytes]:
        """(connection, listener or None, the bytes to write first: those its kernel
        never sent, then those the chardev carried) of the chardev `section` and
        its pieces; FdmigError if they are not a connection at the spec's address."""
        label, length, here = section.label, section.meta.get("tcp"), section.meta.get("tcp-here", 0)
        if type(here) is not int or not 0 <= here <= len(section.outbuf):
            raise FdmigError(f"chardev {label}: tcp-here is {wire.show(here)}, not a count of its "
                             f"{len(section.outbuf)} bytes")
        state = self._state(label, section.outbuf[:here], length, spec)
        staged = self.staged.get(label)
        if staged is not None:
            sock, listener = staged
            if self.bound.get(label, state.local) != state.local:
                # A connection made since the precopy, from another address than
                # the one the staged socket is bound to: a socket of its own (the
                # caller lets go of the staged one).
                del self.bound[label]
                sock = None
        else:
            sock, listener = self.blanks.pop(label, None), None
            try:
                if spec.server:
                    listener = self.listeners.pop(label, None) or self._listener(spec)
            except FdmigError:
                if sock is not None:
                    sock.close()
                raise
        try:
            conn = self._connect(label, state, sock)
        except FdmigError:
            if staged is None:  # else the staged chardev's, which abort() unwatches, then closes
                for made in (sock, listener):
                    if made is not None:
                        made.close()
            raise
        first = self.first[label] = state.unsent_bytes + section.outbuf[here:]
        return conn, listener, first

    def stage(self, label: str, spec, local: tuple | None = None) -> tuple[socket.socket, socket.socket | None]:
        """Before the downtime, for a chardev whose connection's TCP state comes
        inside it alone (repair.LATER): the socket prepare() made to restore it
        into and, for a server, its listener; FdmigError if there are none.
        `local`, the connection's local address as the precopy gave it: the
        socket is bound to it now, which the downtime then need not do."""
        if label in self.staged or label not in self.blanks or (spec.server and label not in self.listeners):
            raise FdmigError(f"chardev {label}: staged twice, or its connection cannot move with its TCP state here")
        staged = self.staged[label] = (self.blanks.pop(label), self.listeners.pop(label) if spec.server else None)
        if local is not None:
            self.bound[label] = self._bind(label, spec, staged[0], local)
        return staged

    @staticmethod
    def _bind(label: str, spec, sock: socket.socket, local) -> tuple[str, int]:
        """`sock` bound to `local`, a precopy's LOCAL, checked first: an address
        of the chardev's family as the kernel writes it (what its TCP state
        will say), never a name to look up; one a connection can be from (no
        wildcard, no multicast); a server's at its port, and at its address
        if it listens on one. (In repair mode the kernel binds it whatever else
        is bound there, for as long as the session lasts.)"""
        if type(local) is not list or len(local) != 2 or type(local[0]) is not str or type(local[1]) is not int \
                or not 0 < local[1] < 65536:
            raise FdmigError(f"chardev {label}: its connection's local address is {wire.show(local)}, not "
                             "[address, port]")
        host, port = local
        try:
            tcpstate.check_address(fdcheck.family_of(spec), host)
            address = ipaddress.ip_address(host)
            if address.is_unspecified or address.is_multicast:
                raise tcpstate.TcpStateError("no connection is from such an address")
            if spec.server and ((spec.port and port != spec.port) or (_one_address(spec.host) and host != spec.host)):
                raise tcpstate.TcpStateError(f"not the server's address {spec.address}")
            sock.bind((host, port))
        except (tcpstate.TcpStateError, OSError) as exc:
            raise FdmigError(f"chardev {label}: its connection's local address {host} port {port}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        return host, port

    @staticmethod
    def states(section: wire.Section, labels) -> list[tuple[str, bytes]]:
        """(label, encoded state) for each chardev of a TCP_STATES section;
        FdmigError if it is not one."""
        meta = section.meta
        names, lengths = meta.get("chardevs"), meta.get("tcp")
        if type(names) is not list or type(lengths) is not list or len(names) != len(lengths) \
                or not all(type(n) is int and n >= 0 for n in lengths) or sum(lengths) != len(section.outbuf):
            raise FdmigError(f"{wire.show(section.label)}: not TCP states: {len(section.outbuf)} bytes for "
                             f"chardevs {wire.show(names)} of lengths {wire.show(lengths)}")
        states, offset, outbuf = [], 0, section.outbuf
        for label, length in zip(names, lengths):
            if type(label) is not str or label not in labels:
                raise FdmigError(f"{wire.show(section.label)}: TCP state for {wire.show(label)}, not a chardev "
                                 "of the table")
            states.append((label, outbuf[offset: offset + length]))
            offset += length
        return states

    def restore_staged(self, label: str, tail: bytes, length, spec) -> bytes:
        """The connection of a chardev stage() took, from its state alone (its
        chardev unchanged since the precopy): its pieces, `tail` the one that
        ends them, `length` bytes in all; into the socket staged for it. The
        bytes its kernel never sent, to write first."""
        staged = self.staged.get(label)
        if staged is None:
            raise FdmigError(f"chardev {label}: its TCP state came alone, but its chardev was not in the precopy")
        state = self._state(label, tail, length, spec)
        bound = self.bound.get(label)
        if bound is not None and bound != state.local:  # the precopy's connection: the source contradicts itself
            raise FdmigError(f"chardev {label}: its TCP state is of a connection from {state.local[0]} port "
                             f"{state.local[1]}, its precopy said {bound[0]} port {bound[1]}")
        self._connect(label, state, staged[0])
        self.moved.precopied += 1
        first = self.first[label] = state.unsent_bytes
        return first

    def unrestored(self) -> list[str]:
        """The chardevs staged whose connection did not come (it has gone at the
        source since the precopy)."""
        return [label for label in self.staged if label not in self.restored]

    def unstage(self, label: str) -> None:
        self.bound.pop(label, None)
        for sock in self.staged.pop(label):
            if sock is not None:
                sock.close()

    def _state(self, label: str, tail: bytes, length, spec) -> tcpstate.TcpState:
        if label in self.restored:
            raise FdmigError(f"chardev {label}: its TCP state came twice")
        pieces = self.pieces.pop(label, None)
        blob = b"".join(pieces) + tail if pieces else tail  # most states are one piece
        if type(length) is not int or len(blob) != length:
            raise FdmigError(f"chardev {label}: {len(blob)} bytes of TCP state arrived, the section says "
                             f"{wire.show(length)}")
        try:
            state = tcpstate.decode(blob)
        except tcpstate.TcpStateError as exc:
            raise FdmigError(f"chardev {label}: its TCP state: {exc}") from None
        _check(state, spec, label)
        return state

    def _connect(self, label: str, state: tcpstate.TcpState, sock: socket.socket | None) -> socket.socket:
        # Bound by stage() to the state's own address: the callers made sure.
        bound = sock is not None and self.bound.pop(label, None) is not None
        try:
            conn = tcprepair.restore(state, sock, bound, transparent=True)
        except tcprepair.RepairError as exc:
            raise FdmigError(f"chardev {label}: its TCP state: {exc}") from None
        self.restored.add(label)
        self.conns.append(conn)
        self.transparent.append(conn)
        self.probed.append(not tcprepair.quiet(state))
        self.addresses.setdefault((state.family, state.local[0]), []).append(label)
        self.moved.add(label, state)
        return conn

    def prepare(self, specs) -> None:
        """Before the downtime, for each marked TCP chardev among `specs`: a blank
        socket to restore its connection into and, for a server, its listener
        made again here, so that the downtime holds none of that."""
        for spec in specs:
            if spec.kind != "inet" or not spec.support_local_migration or spec.id in self.blanks:
                continue
            try:
                self.blanks[spec.id] = tcprepair.blank(fdcheck.family_of(spec))
            except (OSError, tcprepair.RepairError) as exc:
                raise FdmigError(f"chardev {spec.id}: cannot make a socket to restore its connection into: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
            if spec.server:
                self.listeners[spec.id] = self._listener(spec)

    @staticmethod
    def fds(specs) -> int:
        """How many fds prepare() will open for `specs`."""
        return sum(1 + spec.server for spec in specs if spec.kind == "inet" and spec.support_local_migration)

    def unused(self, label: str) -> None:
        """A chardev that came with no connection is opened afresh: what was made
        for it in advance goes first (its listener binds the same address)."""
        for made in (self.listeners, self.blanks):
            sock = made.pop(label, None)
            if sock is not None:
                sock.close()

    def discard(self) -> None:
        for made in (self.listeners, self.blanks):
            for sock in made.values():
                sock.close()
            made.clear()
        for label in list(self.staged):
            self.unstage(label)

    @staticmethod
    def _listener(spec) -> socket.socket:
        """The server chardev's listener, made again here. Free-bound: the address
        comes to this host only with --claim-cmd."""
        try:
            return nbio.listen_tcp(fdcheck.family_of(spec), spec.host, spec.port, freebind=True)
        except OSError as exc:
            raise FdmigError(f"chardev {spec.id}: cannot listen on {spec.address} again: {exc.strerror}") from None

    def strangers(self) -> list[tuple[str, list[str]]]:
        """(address, labels) for each local address of restored connections that
        is not this host's (after --claim-cmd): their peers' next segments would
        reach the old host, which no longer has the connections and would reset
        them."""
        return [(address, labels) for (family, address), labels in self.addresses.items()
                if not nbio.holds(family, address)]

    def resume(self) -> None:
        """After the commit: every restored connection out of repair mode, with
        a window probe unless it was quiet both ways."""
        for conn, probe in zip(self.conns, self.probed):
            tcprepair.leave(conn, probe)
        self.conns.clear()
        self.probed.clear()

    @staticmethod
    def opaque(conns) -> None:
        """After resume(), out of the downtime: `conns` (of `transparent`) no
        longer transparent (tcprepair.opaque). One the chardev has closed
        meanwhile is gone: nothing to do for it."""
        for conn in conns:
            try:
                tcprepair.opaque(conn)
            except OSError:
                pass
