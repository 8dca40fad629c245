"""One chardev: a labelled socket endpoint, its state and its counters.

I/O is driven with loop.add_reader/add_writer on non-blocking sockets rather than
asyncio streams, so that the instance knows every byte it holds: a stream keeps a
buffer of its own, and a migration must carry exactly what was read and not yet
delivered.
"""

import asyncio
import enum
import errno
import logging
import os
import resource
import select
import socket
import time

from fdmig import fdcheck, frontends, paths
from fdmig.errors import FdmigError
from fdmig.spec import STATES

log = logging.getLogger("fdmig")


# The names live in fdmig.spec, which `status --wait` can import without this module.
State = enum.Enum("State", [(name.upper().replace("-", "_"), name) for name in STATES])


# Descriptors kept free for control clients and a migration channel: an instance
# at its limit still answers `status` and can still migrate away.
FD_RESERVE = 32
ACCEPT_PAUSE = 0.25  # seconds without accepting after running out of fds


def near_fd_limit(fd: int) -> bool:
    """Linux hands out the lowest free number, so fd N means N fds are open."""
    return fd >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE


def fd_limit_error(label: str) -> FdmigError:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FdmigError(f"chardev {label}: the instance is at its fd limit ({limit} open files, RLIMIT_NOFILE, "
                      f"{FD_RESERVE} kept for control and migration); detach chardevs or raise the limit")


def utc_iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def socket_family(spec) -> int:
    if spec.kind == "unix":
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in (spec.host or "") else socket.AF_INET


def _count(value) -> int:
    return value if type(value) is int and value >= 0 else 0


def _is_peer(value) -> bool:
    """Whether a migrated `peer` is what peer_identity() makes: [address, pid, process]."""
    return (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
            and (value[1] is None or type(value[1]) is int) and (value[2] is None or isinstance(value[2], str)))


def peer_identity(conn: socket.socket) -> tuple[str, int | None, str | None]:
    """(peer address, pid, process name) of a connected socket."""
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
    return (f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"), None, None


class Chardev:
    def __init__(self, spec, on_change, poller):
        self.spec = spec
        self.label = spec.id
        self._on_change = on_change
        self._poller = poller
        self._loop = asyncio.get_running_loop()
        self.state = State.CLOSED
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.outbuf = bytearray()
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.connected_since: float | None = None
        self.peer: tuple[str, int | None, str | None] | None = None
        self.migrations = 0
        self.frontend: frontends.Frontend = frontends.Hold(self)
        self.feeders: list[Chardev] = [self]  # chardevs whose frontend fills our outbuf
        self.quiesced = False
        # The stream's end, for frontends that relay or answer (a bridge, echo):
        self.eof_read = False  # the peer sent EOF; nothing more is read from it
        self.eof_pending = False  # pass an EOF on to the peer once outbuf is written
        self.eof_sent = False  # ... done: shutdown(SHUT_WR)
        self.closing = False  # close once outbuf is written: the session is over
        # While a precopy is going out, sockets we close are kept here instead, open:
        # their numbers are in frames not yet sent and must not name another socket.
        self.pinned: list[socket.socket] | None = None
        self._reading = self._writing = self._accepting = self._hangup = False
        self._hold_unread = False
        self._accept_paused = False
        self._bound_inode: int | None = None
        self._logfile = None
        self._reconnect_task: asyncio.Task | None = None
        self._state_before_migration = State.CLOSED
        self._was_reconnecting = False
        self.first_peer = asyncio.Event()

    # ----- opening -----------------------------------------------------------

    async def open(self, adopted_fd: int | None = None) -> None:
        """Open the endpoint. Raises FdmigError if it cannot be opened at all."""
        if self.spec.logfile:
            self._open_logfile(append=self.spec.logappend)
        try:
            if adopted_fd is not None:
                self._adopt(adopted_fd)
            elif self.spec.server:
                self._listen()
            elif self.frontend.on_demand:
                self._set_state(State.DISCONNECTED)  # until its partner has a peer
                partner = self.frontend.partner
                if partner.conn is not None and not partner.closing:
                    self.connect_for_session()
            else:
                await self._first_connect()
        except BaseException:
            self._close_logfile()
            raise

    def _open_logfile(self, append: bool) -> None:
        try:
            self._logfile = open(self.spec.logfile, "ab" if append else "wb", buffering=0)
        except OSError as exc:
            raise FdmigError(f"chardev {self.label}: cannot open logfile {self.spec.logfile}: "
                             f"{exc.strerror}") from None

    def _adopt(self, fd: int) -> None:
        sock = adopt_socket(fd, self.spec, self.label)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.listener = sock
            self._set_state(State.LISTENING)
        else:
            self._attach(sock)

    def _listen(self) -> None:
        spec = self.spec
        sock = socket.socket(socket_family(spec), socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
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
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise FdmigError(f"chardev {self.label}: cannot listen on {spec.address}: {exc.strerror}") from None
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
        conn.setblocking(False)
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

    def update_io(self) -> None:
        """Watch exactly what the current state calls for. While quiesced nothing
        changes: the migration has paused the whole poller."""
        if self.quiesced:
            return
        live = self.conn is not None
        if self.frontend.reads:
            want_read = live and not (self.eof_read or self.closing) and self.frontend.can_receive()
        else:
            want_read = live and not self._hold_unread
        want_write = live and bool(self.outbuf)
        # A held fd with bytes waiting is not read, but its peer leaving still counts.
        want_hangup = live and not want_read and not self.frontend.reads and self._hold_unread
        if (want_read, want_write, want_hangup) != (self._reading, self._writing, self._hangup):
            self._poller.watch(self.conn.fileno(), self._on_readable if want_read else None,
                               self._on_writable if want_write else None,
                               self._on_hangup if want_hangup else None)
            self._reading, self._writing, self._hangup = want_read, want_write, want_hangup
        want_accept = (self.listener is not None and not live and not self._accept_paused
                       and self.frontend.may_accept())
        if want_accept != self._accepting:
            self._poller.watch(self.listener.fileno(), self._on_acceptable if want_accept else None)
            self._accepting = want_accept

    def _on_acceptable(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._pause_accepting()
            else:
                log.warning("chardev %s: accept failed: %s", self.label, exc)
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
        log.warning("chardev %s: %s; not accepting for %g s", self.label, fd_limit_error(self.label), ACCEPT_PAUSE)
        if self._accepting:
            self._poller.watch(self.listener.fileno())
            self._accepting = False
        self._accept_paused = True

        def resume():
            self._accept_paused = False
            self.update_io()
        self._loop.call_later(ACCEPT_PAUSE, resume)

    def _on_readable(self) -> None:
        if not self.frontend.reads:
            self._peek_hold()
            return
        try:
            data = self.conn.recv(frontends.READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc.strerror)
            return
        if not data:
            self._on_eof()
            return
        self.rx_bytes += len(data)
        if self._logfile is not None:
            self._write_log(data)
        self.frontend.received(data)
        self.update_io()

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
        try:
            data = self.conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc.strerror)
            return
        if not data:
            self._lost("peer closed the connection")
            return
        self._hold_unread = True
        self.update_io()

    def _on_hangup(self) -> None:
        self._lost("peer closed the connection (unread bytes dropped)")

    def write(self, data: bytes) -> None:
        self.outbuf += data
        if self.conn is not None and not self.quiesced and not self._writing:
            self._flush()

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self.conn.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc.strerror)
            return
        self.tx_bytes += sent
        del self.outbuf[:sent]
        if not self.outbuf:
            if self.closing:
                self._close_conn("session over, every byte delivered", lost=False)
                return
            if self.eof_pending and not self.eof_sent:
                self._send_eof()
                if self.conn is None:
                    return
        self.update_io()
        if sent and len(self.outbuf) < frontends.LOW_WATER:
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
        if self.conn is not None and not self.outbuf and not self.eof_sent:
            self._send_eof()

    def finish(self, reason: str) -> None:
        """Close the connection once every byte for the peer is written."""
        if self.conn is None:
            return
        if not self.outbuf:
            self._close_conn(reason, lost=False)
            return
        self.closing = True
        self.update_io()

    def end_session(self) -> None:
        """A bridge partner's peer is gone: finish ours after what can still be
        delivered; with no connection, what waits for one is dropped."""
        if self.conn is not None:
            self.finish("its bridge partner's session ended")
            return
        self.outbuf.clear()
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
        undelivered = len(self.outbuf) if lost else 0
        if lost:
            dropped = f" ({undelivered} byte(s) for it not delivered)" if undelivered else ""
            log.info("chardev %s: connection lost: %s%s", self.label, reason, dropped)
        else:
            log.info("chardev %s: connection closed: %s", self.label, reason)
        self._drop_conn()
        self.outbuf.clear()
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
        if self._reading or self._writing or self._hangup:
            self._poller.watch(self.conn.fileno())
            self._reading = self._writing = self._hangup = False

    def _stop_io(self) -> None:
        self._stop_conn_io()
        if self._accepting:
            self._poller.watch(self.listener.fileno())
            self._accepting = False

    def _set_state(self, state: State) -> None:
        self.state = state
        self.update_io()
        self._on_change(self)

    # ----- migration ---------------------------------------------------------

    def quiesce(self) -> None:
        """Stop reading, writing, accepting and reconnecting. Bytes the peer sends
        meanwhile wait in the kernel's socket buffer, which moves with the fd."""
        self._state_before_migration = self.state
        self._was_reconnecting = self._reconnect_task is not None
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            self._reconnect_task = None
        self.quiesced = True  # the caller pauses the poller: no fd is touched here
        self.state = State.MIGRATING
        self._on_change(self)

    def resume(self) -> None:
        """Carry on exactly as before the quiesce (a rollback, or a target taking over)."""
        self.quiesced = False
        if self._was_reconnecting:
            self._schedule_connect(wait_first=not self.frontend.on_demand)
        self._set_state(self._state_before_migration)

    def _close_socket(self, sock: socket.socket) -> None:
        if self.pinned is not None:
            self.pinned.append(sock)
        else:
            sock.close()

    def pin(self) -> None:
        """Keep every socket this chardev closes open until unpin() (see `pinned`)."""
        self.pinned = []

    def unpin(self) -> None:
        pinned, self.pinned = self.pinned or [], None
        for sock in pinned:
            sock.close()

    def sockets(self) -> dict[str, socket.socket]:
        """The sockets a migration moves, by role."""
        found = {}
        if self.listener is not None:
            found["listener"] = self.listener
        if self.conn is not None:
            found["conn"] = self.conn
        return found

    def _settled_state(self) -> State:
        return self._state_before_migration if self.quiesced else self.state

    def fingerprint(self) -> tuple:
        """What a section depends on, bar the counters and the carried bytes: a
        chardev whose fingerprint is the same at the quiesce as at the precopy,
        with nothing to carry, needs no new section."""
        return self._settled_state(), self.conn, self.listener, self.stream_flags()

    def stream_flags(self) -> list[str]:
        """Where the stream's end stands (a half-close under way, a session ending)."""
        return [name for name, on in (("eof-read", self.eof_read), ("eof-pending", self.eof_pending),
                                      ("eof-sent", self.eof_sent), ("closing", self.closing)) if on]

    def _restore_stream(self, flags) -> None:
        flags = flags if isinstance(flags, list) else []
        self.eof_read, self.eof_pending, self.eof_sent, self.closing = (
            name in flags for name in ("eof-read", "eof-pending", "eof-sent", "closing"))

    def section(self, move: bool, precopied: dict | None = None) -> tuple[dict, bytes, dict[str, int]]:
        """(meta, carried bytes, fds by role) for the migration; fds only if `move`.
        A socket the target already holds from the precopy is named in meta's
        "held" instead of sent again; any other (a connection made since) is sent."""
        meta = {"state": self._settled_state().value, "rx-bytes": self.rx_bytes,
                "tx-bytes": self.tx_bytes, "connected-since": self.connected_since,
                "migrations": self.migrations, "peer": list(self.peer) if self.peer else None}
        if self.stream_flags():
            meta["stream"] = self.stream_flags()
        fds = {}
        if move:
            held = []
            for role, sock in self.sockets().items():
                if precopied and precopied.get(role) is sock:
                    held.append(role)
                else:
                    fds[role] = sock.fileno()
            if held:
                meta["held"] = held
        return meta, bytes(self.outbuf) if move else b"", fds

    def prime(self) -> None:
        """On the target, before the commit: register with the poller what resume()
        will want, so that resuming thousands is a flag each. The poller is paused:
        nothing is read until then."""
        self.quiesced = False
        self.update_io()
        self.quiesced = True

    @property
    def primed(self) -> bool:
        return self._reading or self._writing or self._hangup or self._accepting

    def unprime(self) -> None:
        """Undo prime() before the sockets change or close: a registration left
        behind would outlive our fd while the source still holds the socket."""
        self._stop_io()

    def discard(self) -> None:
        """A chardev staged by a migration that failed: unprimed, its log closed.
        Its sockets are the migration's to close."""
        self.unprime()
        self._close_logfile()

    def release(self) -> None:
        """After the commit: close our copies. No shutdown(), which would end the
        connection for the target too, and no unlink: the path is the target's now."""
        self.close(unlink=False)
        self.state = State.MIGRATED
        self._on_change(self)

    def restore(self, meta: dict, outbuf: bytes, conn: socket.socket | None,
                listener: socket.socket | None) -> None:
        """On the target: take over a moved chardev, from the precopy and then again
        if its state changed before the quiesce. Carried bytes go out first. With
        no socket left, the chardev is as registered, to be opened afresh."""
        if conn is None and listener is None:
            # Bytes (and an EOF) waiting for a connection to be made, as a bridge's
            # client side holds them while it connects for its partner's peer.
            self.conn = self.listener = None
            self.quiesced = False
            self._close_logfile()
            self.outbuf = bytearray(outbuf)
            self._restore_stream(meta.get("stream"))
            self.eof_read = self.eof_sent = self.closing = False  # no connection: none of these
            self.state = State.CLOSED
            return
        # The meta comes from another process: a value of the wrong type is
        # dropped here rather than met later by the loop's arithmetic.
        self.rx_bytes = _count(meta.get("rx-bytes"))
        self.tx_bytes = _count(meta.get("tx-bytes"))
        self.migrations = _count(meta.get("migrations")) + 1
        self.outbuf = bytearray(outbuf)
        self._restore_stream(meta.get("stream") if conn is not None else None)
        if self.spec.logfile and self._logfile is None:
            self._open_logfile(append=True)  # the source's log goes on, never truncated
        self.quiesced = True  # nothing is read until the source has let go (resume)
        # The sockets are non-blocking already (target.check_fd made them so).
        if listener is not None and listener is not self.listener and self.spec.kind == "unix":
            self._bound_inode = os.stat(self.spec.path).st_ino if os.path.exists(self.spec.path) else None
        self.listener = listener
        self.conn = conn
        if conn is not None:
            peer = meta.get("peer")
            self.peer = tuple(peer) if _is_peer(peer) else peer_identity(conn)
            since = meta.get("connected-since")
            self.connected_since = since if type(since) in (int, float) and 0 < since <= time.time() else time.time()
            self.first_peer.set()
            self._state_before_migration = State.CONNECTED
        else:
            self.peer = self.connected_since = None
            self._state_before_migration = State.LISTENING
        self._was_reconnecting = False
        self._set_state(State.MIGRATING)

    # ----- closing -----------------------------------------------------------

    def close(self, unlink: bool = True) -> None:
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
        self._reset_stream()
        self._set_state(State.CLOSED)

    def _close_logfile(self) -> None:
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    # ----- reporting ---------------------------------------------------------

    @property
    def fd(self) -> int | None:
        sock = self.conn or self.listener
        return sock.fileno() if sock is not None else None

    def status(self) -> dict:
        peer, pid, process = self.peer or (None, None, None)
        frontend = self.frontend.name if self.frontend.name != "bridge" else f"bridge={self.frontend.partner.label}"
        row = status_row(self.spec, self.state.value, frontend)
        row.update({"fd": self.fd, "peer": peer, "peer-pid": pid, "peer-process": process,
                    "rx-bytes": self.rx_bytes, "tx-bytes": self.tx_bytes,
                    "connected-since": utc_iso(self.connected_since) if self.connected_since else None,
                    "migrations": self.migrations})
        return row

    def qmp_filename(self) -> str:
        """QEMU's query-chardev filename: `unix:P,server=on`, `disconnected:...` when no peer."""
        name = self.spec.address
        if self.spec.server:
            name += ",server=on"
        if self.conn is None:
            name = "disconnected:" + name
        return name


def status_row(spec, state: str, frontend: str) -> dict:
    """A chardev's row in `status`, with nothing live in it yet (no fd, peer, bytes):
    what a waiting target shows for the chardevs it will hold."""
    return {"label": spec.id, "address": spec.address, "role": spec.role, "state": state,
            "support-local-migration": spec.support_local_migration, "local-incoming": spec.local_incoming,
            "frontend": frontend, "fd": None, "peer": None, "peer-pid": None, "peer-process": None,
            "rx-bytes": 0, "tx-bytes": 0, "connected-since": None, "migrations": 0,
            "spec": spec.to_spec_string()}


def adopt_socket(fd: int, spec, label: str) -> socket.socket:
    """Wrap an inherited or passed fd, checking it is what the SPEC says."""
    sock = fdcheck.stream_socket(fd, spec.server, label)
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock
