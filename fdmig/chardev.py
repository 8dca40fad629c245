"""One chardev: a labelled socket endpoint, its state and its counters.

I/O is driven with loop.add_reader/add_writer on non-blocking sockets rather than
asyncio streams, so that the instance knows every byte it holds: a stream keeps a
buffer of its own, and a migration must carry exactly what was read and not yet
delivered.
"""

import asyncio
import dataclasses
import enum
import itertools
import errno
import logging
import os
import resource
import select
import socket
import time
import typing

from fdmig import backends, fdcheck, frontends, nbio, paths
from fdmig.errors import FdmigError, SpecError
from fdmig.spec import STATES, bracketed

log = logging.getLogger("fdmig")


# The names live in fdmig.spec, which `status --wait` can import without this module.
State = enum.Enum("State", [(name.upper().replace("-", "_"), name) for name in STATES])

_LIVE = (State.LISTENING, State.CONNECTING, State.CONNECTED, State.DISCONNECTED)
# state -> the states that may follow it. Every chardev state change goes through
# Chardev._set_state, which refuses any other (a bug in fdmig).
TRANSITIONS: dict[State, tuple] = {
    State.CLOSED: (*_LIVE, State.CLOSED, State.MIGRATING),
    State.LISTENING: (State.LISTENING, State.CONNECTED, State.MIGRATING, State.CLOSED),
    State.CONNECTING: (State.CONNECTED, State.DISCONNECTED, State.MIGRATING, State.CLOSED),
    State.CONNECTED: (State.LISTENING, State.CONNECTING, State.DISCONNECTED, State.MIGRATING, State.CLOSED),
    State.DISCONNECTED: (State.CONNECTING, State.DISCONNECTED, State.MIGRATING, State.CLOSED),
    # Back to where the quiesce found it (or, on a target, to what moved in); a
    # target restores a chardev again if it changed after the precopy.
    State.MIGRATING: (*_LIVE, State.CLOSED, State.MIGRATING, State.MIGRATED),
    State.MIGRATED: (State.CLOSED,),
}
_MIGRATING = State.MIGRATING


class TransitionError(Exception):
    """A state change TRANSITIONS does not allow: a bug in fdmig, never the user's."""


class Paused(typing.NamedTuple):
    """What a MIGRATING chardev resumes to: its state, and whether it was
    reconnecting in the background (that attempt starts again). Two per state,
    made once (below), not one per quiesce."""

    state: State
    reconnecting: bool


# Each member carries its successors, a tuple searched by identity, and its two
# Paused forms, made once: thousands of chardevs change state inside a migration's
# downtime, and an Enum member's hash is Python code, too slow to run twice per change.
for _state, _successors in TRANSITIONS.items():
    _state.successors = _successors
    _state.paused = (Paused(_state, False), Paused(_state, True))


def read_mark() -> int:
    """A point in the order of every chardev's reads: one read since has a
    larger `served`."""
    return next(_SERVED)


# Descriptors kept free for control clients and a migration channel: an instance
# at its limit still answers `status` and can still migrate away.
FD_RESERVE = 32


def near_fd_limit(fd: int) -> bool:
    """Linux hands out the lowest free number, so fd N means N fds are open."""
    return fd >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE


def fd_limit_error(label: str) -> FdmigError:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FdmigError(f"chardev {label}: the instance is at its fd limit ({limit} open files, RLIMIT_NOFILE, "
                      f"{FD_RESERVE} kept for control and migration); detach chardevs or raise the limit")


def peer_identity(conn: socket.socket) -> tuple[str, int | None, str | None]:
    """(peer address, pid, process name) of a connected socket; of another
    backend's fd, a udp socket's peer (a pty, tty, FIFO or file is its address)."""
    if conn.family is None:
        return (conn.peer if conn.kind == "udp" else None), None, None
    if conn.family == socket.AF_UNIX:
        try:
            name = conn.getpeername()
        except OSError:
            name = ""
        try:
            pid = paths.peercred(conn)[0]
        except OSError:
            return f"unix:{name}", None, None
        try:
            import psutil
            process = psutil.Process(pid).name()
        except Exception:  # the peer may have exited already; its name is then unknown
            process = None
        return f"unix:{name}", pid or None, process
    try:
        host, port = conn.getpeername()[:2]
    except OSError:
        return "tcp:", None, None
    return f"tcp:{bracketed(host)}:{port}", None, None


# Every chardev's reads, counted: a migration's target serves the moved chardevs
# first in the order of their last read here, longest unserved first.
_SERVED = itertools.count(1)


class Chardev:
    # Slots: thousands of chardevs are walked inside a migration's downtime, and an
    # instance dict of this many keys is slower to read and larger (more cache misses).
    __slots__ = ("_accept_paused", "_accepting", "_bound_inode", "_hangup", "_hold_unread", "_logfile", "_loop",
                 "_no_pipe", "_on_change", "_poller", "_reading", "_reconnect_task", "_stale", "_writing",
                 "closing", "conn", "connected_since", "counts_changed", "eof_pending", "eof_read", "eof_sent",
                 "feeders", "first_peer", "frontend", "label", "listener", "migrations", "outbuf", "paused_from",
                 "peer", "pinned", "pipe", "row_frame", "row_parts", "rx_bytes", "served", "settled", "spec", "state",
                 "stream", "tx_bytes")

    def __init__(self, spec, on_change, poller):
        self.spec = spec
        self.label = spec.id
        self._on_change = on_change
        self._poller = poller
        self._loop = asyncio.get_running_loop()
        self.state = State.CLOSED
        # The state to carry on in: the state, or while MIGRATING the one it will
        # resume to (an attribute, not a property: a downtime reads thousands).
        self.settled = State.CLOSED
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.outbuf = bytearray()
        # A bridge partner's bytes for our peer, spliced through the kernel instead
        # of outbuf while outbuf is empty (nbio.Pipe); made on first use.
        self.pipe: nbio.Pipe | None = None
        self._no_pipe = False  # making one failed (out of fds): bytes go through outbuf
        self.rx_bytes = 0
        self.tx_bytes = 0
        # Set at every change of either, cleared by a migration's precopy, which has
        # sent both: which chardevs' counts RELEASED must carry, without comparing.
        self.counts_changed = False
        self.connected_since: float | None = None
        self.peer: tuple[str, int | None, str | None] | None = None
        self.migrations = 0
        self.frontend: frontends.Frontend = frontends.Hold(self)
        self.feeders: list[Chardev] = [self]  # chardevs whose frontend fills our outbuf
        # The stream's end, for frontends that relay or answer (a bridge, echo):
        self.eof_read = False  # the peer sent EOF; nothing more is read from it
        self.eof_pending = False  # pass an EOF on to the peer once outbuf is written
        self.eof_sent = False  # ... done: shutdown(SHUT_WR)
        self.closing = False  # close once outbuf is written: the session is over
        # While a precopy is going out, sockets we close are kept here instead, open:
        # their numbers are in frames not yet sent and must not name another socket.
        self.pinned: list[socket.socket] | None = None
        # What the poller watches, and two reasons to watch less; none of these is
        # a lifecycle state (none shows in status, none moves with a migration):
        # update_io derives the watch from them and the state.
        self._reading = self._writing = self._accepting = self._hangup = False
        self._hold_unread = False  # a held fd's peer has sent bytes: watch only its hangup
        # update_io() was called while quiesced and did nothing: what to watch may
        # have changed, so resuming works it out again (otherwise it is as it was).
        self._stale = False
        self._accept_paused = False  # out of fds: not accepting for nbio.ACCEPT_PAUSE
        self._bound_inode: int | None = None
        self._logfile = None
        self._reconnect_task: asyncio.Task | None = None
        self.paused_from: Paused | None = None  # while MIGRATING: what to resume
        self.first_peer = asyncio.Event()
        # Its status row's JSON, kept (presentation.row_json): what its spec fixes,
        # and what changes only with its connection.
        self.row_frame: tuple | None = None
        self.row_parts: tuple | None = None
        self.served = 0  # when it last read from its peer, as a count of every chardev's reads (_SERVED)
        # A socket's stream: it ends, half-closes, is peeked at and spliced. The other
        # backends' fds are the far end itself, open for as long as the chardev is.
        self.stream = spec.backend == "socket"

    # ----- opening -----------------------------------------------------------

    async def open(self, adopted_fd: int | None = None, saved: tuple = (None, None)) -> None:
        """Open the endpoint. Raises FdmigError if it cannot be opened at all.
        `saved`: the (listener, connection) fds an earlier life of this instance
        kept in its manager's fd store (--fdstore), taken up again if they pass
        the checks a migrated fd passes."""
        if self.spec.logfile:
            self._open_logfile(append=self.spec.logappend)
        if not self.stream:
            if saved[0] is not None:
                os.close(saved[0])  # no listener here: not ours
            try:
                self._open_end(self._saved_end(saved[1]))
            except BaseException:
                self._close_logfile()
                raise
            return
        listener, conn = (self._saved_socket(fd, role) for fd, role in zip(saved, ("listener", "conn")))
        try:
            if adopted_fd is not None:
                self._adopt(adopted_fd)
            elif listener is not None:
                self._hold_listener(listener)
            elif self.spec.server:
                self._listen()
            elif conn is not None:
                pass  # connected already
            elif self.frontend.on_demand:
                self._set_state(State.DISCONNECTED)  # until its partner has a peer
                partner = self.frontend.partner
                if partner.conn is not None and not partner.closing:
                    self.connect_for_session()
            else:
                await self._first_connect()
            if conn is not None:
                self._attach(conn)
                log.info("chardev %s: took up its connection to %s again", self.label, self.peer[0])
        except BaseException:
            self._close_logfile()
            raise

    def _saved_end(self, fd: int | None):
        """A pty, tty, FIFO, udp socket or file an earlier life of this instance
        kept in its manager's fd store, taken up again if it is what the spec says:
        a pty's program never sees it go."""
        if fd is None:
            return None
        try:
            end = backends.take_up(fd, self.spec, self.label)
        except FdmigError as exc:
            os.close(fd)
            log.warning("%s; opened afresh instead", exc)
            return None
        os.set_inheritable(fd, False)
        log.info("chardev %s: took up its %s again", self.label, end.peer or self.spec.kind)
        return end

    def _open_end(self, end=None) -> None:
        """A pty, serial, pipe, udp or file chardev: its fds opened (or `end`, taken
        up), held from now until it closes."""
        if end is None:
            end = backends.open_end(self.spec, self.label)
        # What the kernel chose goes into the spec, for status and for a migration's
        # table: the pty's slave (whose master the target checks against it), and
        # a udp socket's local port (a target opening it afresh binds it again).
        if self.spec.kind == "pty":
            if self.spec.path != end.peer:
                log.info("chardev %s: char device redirected to %s", self.label, end.peer)
            self.spec = dataclasses.replace(self.spec, path=end.peer)
        elif self.spec.kind == "udp" and not self.spec.localport:
            self.spec = dataclasses.replace(self.spec, localport=end.local_port())
        self.row_frame = self.row_parts = None
        self._attach(end)

    def _saved_socket(self, fd: int | None, role: str) -> socket.socket | None:
        if fd is None:
            return None
        try:
            sock = fdcheck.stream_socket(fd, self.spec, self.label, role)
        except FdmigError as exc:
            os.close(fd)
            log.warning("%s; opened afresh instead", exc)
            return None
        os.set_inheritable(fd, False)
        return sock

    def _hold_listener(self, sock: socket.socket) -> None:
        if self.spec.kind == "unix":
            try:
                self._bound_inode = os.stat(self.spec.path).st_ino
            except FileNotFoundError:
                # Its path was removed meanwhile (a RuntimeDirectory= emptied): nobody
                # could reach it there, so a fresh one takes the path.
                log.warning("chardev %s: %s is gone; listening there afresh", self.label, self.spec.path)
                sock.close()
                self._listen()
                return
        sock.setblocking(not self.frontend.watched)
        self.listener = sock
        self._set_state(State.LISTENING)
        log.info("chardev %s: took up its listening socket again", self.label)

    def _open_logfile(self, append: bool) -> None:
        try:
            self._logfile = open(self.spec.logfile, "ab" if append else "wb", buffering=0)
        except OSError as exc:
            raise FdmigError(f"chardev {self.label}: cannot open logfile {self.spec.logfile}: "
                             f"{exc.strerror}") from None

    def _adopt(self, fd: int) -> None:
        sock = adopt_socket(fd, self.spec, self.label)
        sock.setblocking(not self.frontend.watched)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.listener = sock
            self._set_state(State.LISTENING)
        else:
            self._attach(sock)

    def _listen(self) -> None:
        spec = self.spec
        sock = socket.socket(fdcheck.family_of(spec), socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        if near_fd_limit(sock.fileno()):
            sock.close()
            raise fd_limit_error(self.label)
        try:
            if spec.kind == "unix":
                paths.remove_stale_socket(spec.path, f"chardev {self.label}")
                sock.bind(spec.path)
                self._bound_inode = os.stat(spec.path).st_ino
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((spec.host, spec.port))
            if self.frontend.watched:
                sock.listen(16)
            else:
                # The service's, blocking as socket activation hands it, and with the
                # kernel's longest backlog: while it restarts, connections wait there.
                sock.listen(socket.SOMAXCONN)
                sock.setblocking(True)
        except OSError as exc:
            sock.close()
            # An address in use is a SPEC that does not fit (exit 2), as one of our own would be.
            kind = SpecError if exc.errno == errno.EADDRINUSE else FdmigError
            error = kind(f"chardev {self.label}: cannot listen on {spec.address}: {exc.strerror}")
            error.errno = exc.errno
            raise error from None
        self.listener = sock
        self._set_state(State.LISTENING)

    async def _first_connect(self) -> None:
        try:
            self._attach(await self._connect())
        except OSError as exc:
            if not self.spec.reconnect_ms:
                raise FdmigError(f"chardev {self.label}: cannot connect to {self.spec.address}: "
                                 f"{exc.strerror or exc}") from None
            self._set_state(State.CONNECTING)
            self._schedule_connect()

    @property
    def connecting(self) -> bool:
        return self._reconnect_task is not None

    def connect_for_session(self) -> None:
        """A bridge's client side: connect afresh now, for the partner's new peer."""
        self._set_state(State.CONNECTING)
        self._schedule_connect(wait_first=False)

    async def _connect(self) -> socket.socket:
        spec = self.spec
        if spec.kind == "unix":
            targets = [(socket.AF_UNIX, spec.path)]
        else:
            infos = await self._loop.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
            targets = [(family, addr) for family, _, _, _, addr in infos]
        error: OSError = OSError(errno.EADDRNOTAVAIL, "no address")
        for family, addr in targets:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            if near_fd_limit(sock.fileno()):
                sock.close()
                raise OSError(errno.EMFILE, str(fd_limit_error(self.label)))
            try:
                await self._loop.sock_connect(sock, addr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error

    def _schedule_connect(self, wait_first: bool = True) -> None:
        """Connect in the background: every reconnect-ms until it works or, with no
        reconnect-ms, once, a failure then ending the session it was made for."""
        async def attempt(wait: bool):
            while True:
                if wait:
                    await asyncio.sleep(self.spec.reconnect_ms / 1000)
                try:
                    sock = await self._connect()
                except OSError as exc:
                    if self.spec.reconnect_ms:
                        wait = True
                        continue
                    self._reconnect_task = None
                    self._connect_failed(exc)
                    return
                self._reconnect_task = None
                self._attach(sock)
                return
        self._reconnect_task = asyncio.ensure_future(attempt(wait_first))

    def _connect_failed(self, exc: OSError) -> None:
        reason = f"cannot connect to {self.spec.address}: {exc.strerror or exc}"
        log.warning("chardev %s: %s", self.label, reason)
        undelivered = len(self.outbuf)
        self.outbuf.clear()
        self._reset_stream()
        self._set_state(State.DISCONNECTED)
        self.frontend.ended(reason, undelivered, lost=True)

    def _attach(self, conn: socket.socket) -> None:
        conn.setblocking(not self.frontend.watched)  # a service's fd is blocking, as systemd's
        if conn.family in (socket.AF_INET, socket.AF_INET6) and self.spec.nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        self.peer = peer_identity(conn)
        self.connected_since = time.time()
        self._hold_unread = False
        self._set_state(State.CONNECTED)
        self.first_peer.set()
        self.frontend.connected()
        if self.eof_pending and not self.outbuf:
            self._send_eof()  # the partner's peer closed its side before we connected

    # ----- I/O ---------------------------------------------------------------

    def update_io(self, quiesced_too: bool = False, defer: bool = True) -> None:
        """Watch exactly what the current state calls for. While quiesced nothing
        changes (the migration has paused the whole poller), unless `quiesced_too`;
        `defer` as Poller.watch's."""
        if self.state is _MIGRATING and not quiesced_too:
            self._stale = True
            return
        if not self.frontend.watched:
            return
        self._stale = False
        live = self.conn is not None
        if self.frontend.reads:
            want_read = (live and not (self.eof_read or self.closing) and self.frontend.can_receive()
                         and self.spec.reads)
        else:
            want_read = live and not self._hold_unread and self.stream  # a peek, which only a socket has
        want_write = live and bool(self.pending)
        # A held fd with bytes waiting is not read, but its peer leaving still counts;
        # so does the close of a peer whose half-close ended nothing (a console's user).
        waits_close = self.eof_read and self.frontend.waits_close
        want_hangup = live and not want_read and (not self.frontend.reads and self._hold_unread or waits_close)
        if (want_read, want_write, want_hangup) != (self._reading, self._writing, self._hangup):
            self._poller.watch(self.conn.fileno(), self._on_readable if want_read else None,
                               self._on_writable if want_write else None,
                               self._on_hangup if want_hangup else None, defer=defer, half_close=not waits_close)
            self._reading, self._writing, self._hangup = want_read, want_write, want_hangup
        want_accept = (self.listener is not None and not live and not self._accept_paused
                       and self.frontend.may_accept())
        if want_accept != self._accepting:
            self._poller.watch(self.listener.fileno(), self._on_acceptable if want_accept else None, defer=defer)
            self._accepting = want_accept

    def _on_acceptable(self) -> None:
        conn = nbio.accept(self.listener, f"chardev {self.label}", self._pause_accepting)
        if conn is None:
            return
        if near_fd_limit(conn.fileno()):
            conn.close()  # the peer sees EOF and may retry; better than starving control
            self._pause_accepting()
            return
        self._attach(conn)
        log.info("chardev %s: peer %s connected", self.label, self.peer[0])

    def _pause_accepting(self) -> None:
        """Out of fds: the listener stays readable (level-triggered), so stop
        watching it for a moment instead of spinning on accept()."""
        log.warning("chardev %s: %s; not accepting for %g s", self.label, fd_limit_error(self.label), nbio.ACCEPT_PAUSE)
        if self._accepting:
            self._poller.watch(self.listener.fileno())
            self._accepting = False
        self._accept_paused = True

        def resume():
            self._accept_paused = False
            self.update_io()
        self._loop.call_later(nbio.ACCEPT_PAUSE, resume)

    def _recv(self, flags: int = 0) -> bytes | None:
        """What the peer sent (b"" at its EOF), None if nothing is to be had now;
        a failure has ended the connection."""
        try:
            return self.conn.recv(1 if flags else frontends.READ_SIZE, flags)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._lost(exc.strerror)
            return None

    def _on_readable(self) -> None:
        if not self.frontend.reads:
            self._peek_hold()
            return
        self.served = next(_SERVED)
        target = self.frontend.splice_target()
        if target is not None:
            self._splice_to(target)
            return
        data = self._recv()
        if data is None:
            return
        if not data:
            self._on_eof()
            return
        self.rx_bytes += len(data)
        self.counts_changed = True
        if self._logfile is not None:
            self._write_log(data)
        self.frontend.received(data)
        self.update_io()

    def _splice_to(self, target: "Chardev") -> None:
        """What the peer sent, into `target`'s pipe and on to its peer: a bridge's
        bytes never enter this process."""
        try:
            # As much as keeps what waits for the target under HIGH_WATER + READ_SIZE,
            # as a read would: a migration carries it in one section.
            n = target.pipe.fill(self.conn, min(frontends.HIGH_WATER + frontends.READ_SIZE - target.pending,
                                                target.pipe.room))
        except OSError as exc:
            self._lost(exc.strerror)
            return
        if n is None:
            return
        if not n:
            self._on_eof()
            return
        self.rx_bytes += n
        self.counts_changed = True
        if not target.quiesced and not target._writing:
            target._flush()
        self.update_io()

    @property
    def pending(self) -> int:
        """Bytes for our peer not yet written: in outbuf, and in our pipe."""
        return len(self.outbuf) + (self.pipe.held if self.pipe is not None else 0)

    @property
    def logging(self) -> bool:
        return self._logfile is not None

    def has_pipe(self) -> bool:
        """Whether our pipe is there, made now if need be (not near the fd limit)."""
        if self.pipe is None and not self._no_pipe:
            try:
                pipe = nbio.Pipe()
            except OSError:
                self._no_pipe = True
                return False
            if near_fd_limit(pipe.w):
                pipe.close()
                self._no_pipe = True
                return False
            self.pipe = pipe
        return self.pipe is not None

    def _drop_pipe(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None

    def _on_eof(self) -> None:
        if not self.eof_sent and self._peer_vanished():
            self._lost("peer closed the connection")
            return
        self.eof_read = True
        self.update_io()
        self.frontend.eof()

    def _peer_vanished(self) -> bool:
        """EOF alone may be a half-close (shutdown(SHUT_WR)); a unix peer that has
        closed its socket shows POLLHUP as well. TCP cannot tell before a write fails."""
        probe = select.poll()
        probe.register(self.conn.fileno(), select.POLLOUT)
        return any(events & select.POLLHUP for _, events in probe.poll(0))

    def _peek_hold(self) -> None:
        # A held fd is never read; peeking only tells EOF from data waiting. Once
        # data waits, only the peer's hangup is watched (_on_hangup).
        data = self._recv(socket.MSG_PEEK)
        if data is None:
            return
        if not data:
            self._lost("peer closed the connection")
            return
        self._hold_unread = True
        self.update_io()

    def _on_hangup(self) -> None:
        self._lost("peer closed the connection" + ("" if self.eof_read else " (unread bytes dropped)"))

    def write(self, data: bytes) -> None:
        self.outbuf += data
        if self.quiesced:
            self._stale = True  # it will want to write once it resumes
        elif self.conn is not None and not self._writing:
            self._flush()

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        try:
            sent = nbio.send_some(self.conn, self.outbuf)
            if not self.outbuf and self.pipe is not None:
                sent += self.pipe.drain(self.conn)
        except OSError as exc:
            self._lost(exc.strerror)
            return
        self.tx_bytes += sent
        self.counts_changed = True
        if not self.pending:
            if self.closing:
                self._close_conn("session over, every byte delivered", lost=False)
                return
            if self.eof_pending and not self.eof_sent:
                self._send_eof()
                if self.conn is None:
                    return
        self.update_io()
        if sent and self.pending < frontends.LOW_WATER:
            for feeder in self.feeders:
                if feeder is not self:
                    feeder.update_io()

    def _write_log(self, data: bytes) -> None:
        try:
            self._logfile.write(data)
        except OSError as exc:
            log.warning("chardev %s: logfile %s: %s; logging stopped", self.label, self.spec.logfile, exc.strerror)
            self._close_logfile()

    def _send_eof(self) -> None:
        try:
            self.conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._lost(exc.strerror)
            return
        self.eof_sent = True
        self.frontend.eof_sent()

    def pass_eof(self) -> None:
        """A bridge partner's peer closed its side: pass that on once every byte
        before it is written (at once if there is none, or when we connect)."""
        self.eof_pending = True
        if self.conn is not None and not self.pending and not self.eof_sent:
            self._send_eof()

    def finish(self, reason: str) -> None:
        """Close the connection once every byte for the peer is written."""
        if self.conn is None:
            return
        if not self.pending:
            self._close_conn(reason, lost=False)
            return
        self.closing = True
        self.update_io()

    def end_session(self) -> None:
        """A bridge partner's peer is gone: finish ours after what can still be
        delivered; with no connection, what waits for one is dropped. Another
        backend's fd stays open: the far end (a program on a pty, a line) goes on."""
        if self.conn is not None and not self.stream:
            self._reset_stream()
            return
        if self.conn is not None:
            self.finish("its bridge partner's session ended")
            return
        self.outbuf.clear()
        self._drop_pipe()
        self._reset_stream()
        if self.frontend.on_demand and self.connecting:
            self._reconnect_task.cancel()  # that connection was for the session now over
            self._reconnect_task = None
            self._set_state(State.DISCONNECTED)

    def _reset_stream(self) -> None:
        self.eof_read = self.eof_pending = self.eof_sent = self.closing = False

    def _lost(self, reason: str) -> None:
        self._close_conn(reason, lost=True)

    def _close_conn(self, reason: str, lost: bool) -> None:
        """The connection is over. Bytes for a peer that has gone (`lost`) cannot be
        delivered to anyone: they are dropped and counted."""
        undelivered = self.pending if lost else 0
        if lost:
            dropped = f" ({undelivered} byte(s) for it not delivered)" if undelivered else ""
            log.info("chardev %s: connection lost: %s%s", self.label, reason, dropped)
        else:
            log.info("chardev %s: connection closed: %s", self.label, reason)
        self._drop_conn()
        self.outbuf.clear()
        self._drop_pipe()
        self._reset_stream()
        # First the session's other side learns of it (a bridge partner starts to
        # finish), so that a listener taking its next peer below sees that.
        self.frontend.ended(reason, undelivered, lost)
        for feeder in self.feeders:
            if feeder is not self:
                feeder.update_io()
        if self.listener is not None:
            self._set_state(State.LISTENING)
        elif self.frontend.on_demand:
            self._set_state(State.DISCONNECTED)  # the next session connects afresh
        elif self.spec.reconnect_ms and self.spec.kind in ("unix", "inet"):
            self._set_state(State.CONNECTING)
            self._schedule_connect()
        else:
            self._set_state(State.DISCONNECTED)

    def _drop_conn(self) -> None:
        if self.conn is None:
            return
        self._stop_conn_io()
        self._close_socket(self.conn)
        self.conn = None
        self.peer = None
        self.connected_since = None

    def _stop_conn_io(self) -> None:
        self._stale = True  # watching nothing is not what the state calls for, until update_io says so
        if self._reading or self._writing or self._hangup:
            self._poller.watch(self.conn.fileno())
            self._reading = self._writing = self._hangup = False

    def _stop_io(self) -> None:
        self._stop_conn_io()
        if self._accepting:
            self._poller.watch(self.listener.fileno())
            self._accepting = False

    def _set_state(self, state: State, watch: bool = True) -> None:
        """Every state change: checked against TRANSITIONS, then the watched events
        follow it (unless `watch` is off: a quiesce touches no fd) and the instance
        hears of it."""
        if state not in self.state.successors:
            raise TransitionError(f"chardev {self.label}: {self.state.value} -> {state.value}")
        self.state = state
        self.settled = state if state is not _MIGRATING else self.paused_from.state
        if watch:
            self.update_io()
        self._on_change(self)

    @property
    def quiesced(self) -> bool:
        return self.state is _MIGRATING

    # ----- the downtime ------------------------------------------------------

    def quiesce(self) -> None:
        """Stop reading, writing, accepting and reconnecting. Bytes the peer sends
        meanwhile wait in the kernel's socket buffer, which moves with the fd."""
        self.paused_from = self.state.paused[self._reconnect_task is not None]
        if self.pipe is not None and self.pipe.held:
            # What the pipe holds is bytes to carry, as outbuf's are (outbuf is
            # empty while the pipe is in use, so the order is kept).
            self.outbuf += self.pipe.take()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            self._reconnect_task = None
        self._set_state(_MIGRATING, watch=False)  # the instance has paused the poller

    def resume(self) -> None:
        """Carry on exactly as before the quiesce (a rollback, or a target taking over)."""
        paused, self.paused_from = self.paused_from, None
        if paused.reconnecting:
            self._schedule_connect(wait_first=not self.frontend.on_demand)
        self._set_state(paused.state, watch=self._stale)

    def watch_now(self, defer: bool = True) -> None:
        """Register with the poller what this chardev will want once it resumes,
        although it is quiesced (the poller is paused, so nothing is read yet):
        into its epoll at the resume if `defer`, else at once."""
        self.update_io(quiesced_too=True, defer=defer)

    @property
    def watched(self) -> bool:
        return self._reading or self._writing or self._hangup or self._accepting

    def unwatch(self) -> None:
        self._stop_io()

    def discard(self) -> None:
        """Staged by a migration that failed: unwatched, its log closed. Its
        sockets are the migration's to close."""
        self._stop_io()
        self._close_logfile()

    def _close_socket(self, sock: socket.socket) -> None:
        if self.pinned is not None:
            self.pinned.append(sock)
        else:
            sock.close()

    def sockets(self) -> dict[str, socket.socket]:
        """The sockets a migration moves, by role (another backend's fds too)."""
        found = {}
        if self.listener is not None:
            found["listener"] = self.listener
        if self.conn is not None:
            found["conn"] = self.conn
            if not self.stream:
                found.update(self.conn.extra())
        return found

    def released(self) -> None:
        """After a migration's commit: close our copies. No shutdown(), which would
        end the connection for the target too, and no unlink: the path is the target's."""
        self.close(unlink=False, then=State.MIGRATED)

    def take_moved(self, conn: socket.socket | None, listener: socket.socket | None, peer, since) -> None:
        """On a target: hold the sockets that moved, quiesced until the source has
        let go. With neither, the chardev is as registered, to be opened afresh.
        The sockets are non-blocking already (fdcheck, at their arrival)."""
        if conn is None and listener is None:
            self.conn = self.listener = None
            self._close_logfile()
            self.eof_read = self.eof_sent = self.closing = False  # no connection: none of these
            self.paused_from = None
            self._set_state(State.CLOSED, watch=False)
            return
        if self.spec.logfile and self._logfile is None:
            self._open_logfile(append=True)  # the source's log goes on, never truncated
        if listener is not None and listener is not self.listener and self.spec.kind == "unix":
            self._bound_inode = os.stat(self.spec.path).st_ino if os.path.exists(self.spec.path) else None
        self.listener = listener
        self.conn = conn
        if conn is not None:
            self.peer = peer or peer_identity(conn)
            self.connected_since = since or time.time()
            self.first_peer.set()
        else:
            self.peer = self.connected_since = None
        self.paused_from = (State.CONNECTED if conn is not None else State.LISTENING).paused[False]
        self._set_state(State.MIGRATING)

    # ----- closing -----------------------------------------------------------

    def close(self, unlink: bool = True, then: State = State.CLOSED) -> None:
        """Close everything; the peer sees EOF if nobody else holds the fd.
        `unlink=False` after a migration: the path then belongs to the target."""
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            self._reconnect_task = None
        self._drop_conn()
        if self.listener is not None:
            self._stop_io()
            self._close_socket(self.listener)
            self.listener = None
            if unlink and self._bound_inode is not None:
                paths.remove_own_socket(self.spec.path, self._bound_inode)
        self._close_logfile()
        self.outbuf.clear()
        self._drop_pipe()
        self._reset_stream()
        self.paused_from = None  # closed, it resumes nothing
        self._set_state(then)

    def _close_logfile(self) -> None:
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    @property
    def fd(self) -> int | None:
        sock = self.conn or self.listener
        return sock.fileno() if sock is not None else None


def quiesce_all(chardevs) -> None:
    """Chardev.quiesce() of each, for an instance that has paused its poller and
    hears no change (inside a migration's downtime). The common case, no pipe
    holding bytes and no reconnect under way, is done inline: thousands are
    quiesced while every peer waits, and a method call each is most of the cost."""
    for chardev in chardevs:
        state = chardev.state
        if (chardev.pipe is not None or chardev._reconnect_task is not None or state is _MIGRATING
                or _MIGRATING not in state.successors):
            chardev.quiesce()  # the whole way (or its TransitionError)
            continue
        chardev.paused_from = state.paused[0]
        chardev.state = _MIGRATING  # `settled` stays `state`


def resume_all(chardevs) -> None:
    """Chardev.resume() of each quiesced one, for an instance whose poller is
    paused and hears no change; inline but for a reconnect to start again or a
    watch to work out again (update_io was asked while quiesced)."""
    for chardev in chardevs:
        paused = chardev.paused_from
        if paused is None:
            continue
        state = paused.state
        if paused.reconnecting or chardev._stale or state not in _MIGRATING.successors:
            chardev.resume()
            continue
        chardev.paused_from = None
        chardev.state = state  # `settled` already is


def adopt_socket(fd: int, spec, label: str) -> socket.socket:
    """Wrap an inherited or passed fd, checking it is what the SPEC says."""
    sock = fdcheck.stream_socket(fd, spec, label)
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock
