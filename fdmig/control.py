"""The control socket: QMP connections driven on the instance's loop, and the
command table. The protocol rules live in qmp.py; this is plumbing and dispatch."""

import asyncio
import contextlib
import logging
import os
import socket

from fdmig import __version__, fdpass, nbio, paths, presentation, qmp, spec as specs, tlscreds
from fdmig.errors import FdmigError, QMPError, SpecError
from fdmig.lifecycle import MigrationStatus, RunState

log = logging.getLogger("fdmig")
MAX_QUEUED_REQUESTS = 32
MAX_OUTBUF = 16 << 20  # a client that stops reading its events is dropped past this
MAX_PENDING_FDS = 16
# Queued after what a client sent before its half-close: the requests ahead of
# it are answered, then the connection closes.
_HALF_CLOSED = object()


class ControlServer:
    def __init__(self, instance):
        self.instance = instance
        self.sock: socket.socket | None = None
        self.inode: int | None = None
        self.path: str | None = None
        self.connections: set[ControlConnection] = set()
        self._loop = asyncio.get_running_loop()

    def bind(self, path: str, take_over: bool = False) -> None:
        """Bind the control path; `take_over` after a migration's commit, when the
        source has let go and our socket is renamed over its file."""
        if not take_over:
            paths.claim_path(path)
        self.sock = paths.bind_private(path)
        self.path = path
        self.inode = os.stat(path).st_ino

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._on_acceptable)

    def _on_acceptable(self) -> None:
        conn = nbio.accept(self.sock, "control", self._pause_accepting)
        if conn is None:
            return
        # accept() does not carry the listener's O_NONBLOCK over: without this a
        # client that stops reading would block the whole loop in send().
        conn.setblocking(False)
        try:
            paths.trusted_peer(conn)
        except paths.Stranger as exc:
            log.warning("control: refused a client of uid %d (only uid %d or root are served)", exc.uid, os.geteuid())
            try:
                conn.send(qmp.ServerCodec.error(None, "GenericError", f"permission denied: uid {exc.uid} is not "
                                                                      f"the instance's uid {os.geteuid()}"))
            except OSError:
                pass
            conn.close()
            return
        connection = ControlConnection(self, conn)
        self.connections.add(connection)
        connection.start()

    def _pause_accepting(self) -> None:
        log.warning("control: out of fds; not accepting for %g s", nbio.ACCEPT_PAUSE)
        self._loop.remove_reader(self.sock.fileno())
        self._loop.call_later(nbio.ACCEPT_PAUSE, lambda: self.sock and self.start())

    def broadcast(self, name: str, data: dict | None = None) -> None:
        if not self.connections:
            return
        message = qmp.ServerCodec.event(name, data)
        for connection in list(self.connections):
            if connection.codec.negotiated:
                connection.send_event(message)

    def close(self, unlink: bool = True, flush: bool = False) -> None:
        """Stop serving. `flush`: connections first deliver what is queued for them
        (the MIGRATION event that a waiting migrate-out must see)."""
        if self.sock is not None:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            if unlink:
                paths.remove_own_socket(self.path, self.inode)
        for connection in list(self.connections):
            if flush:
                connection.close_after_flush()
            else:
                connection.close()


class ControlConnection:
    def __init__(self, server: ControlServer, sock: socket.socket):
        self.server = server
        self.instance = server.instance
        self.sock = sock
        self.codec = qmp.ServerCodec()
        self.outbuf = bytearray()
        self.fds: list[int] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self._reading = False
        self._writing = False
        self._closing_after_flush = False
        self._half_closed = False  # the client sent EOF; nothing more is read from it
        self._held: bytearray | None = None  # events held while a reply streams
        self._loop = server._loop
        self._worker: asyncio.Task | None = None
        self.gone = asyncio.Event()  # set once the connection is closed

    def start(self) -> None:
        self.send(qmp.ServerCodec.greeting(__version__))
        self._set_reading(True)
        self._worker = asyncio.ensure_future(self._work())

    def _set_reading(self, on: bool) -> None:
        if on and self._half_closed:
            return
        if on != self._reading and not self.closed:
            if on:
                self._loop.add_reader(self.sock.fileno(), self._on_readable)
            else:
                self._loop.remove_reader(self.sock.fileno())
            self._reading = on

    def _on_readable(self) -> None:
        try:
            data, fds = fdpass.recv_with_fds(self.sock, 65536, MAX_PENDING_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self.close()  # a probe (another instance checking the path) hung up: not news
            return
        except OSError as exc:
            log.warning("control: dropped a client: %s", exc)
            self.close()
            return
        self._keep_fds(fds)
        if not data:
            # A half-close (shutdown(SHUT_WR)), as `printf ... | socat` ends: the
            # client still reads, and QEMU answers every request it sent before.
            self._set_reading(False)
            self._half_closed = True
            self.queue.put_nowait(_HALF_CLOSED)
            return
        for item in self.codec.receive_data(data):
            if isinstance(item, qmp.Overflow):
                self.send(qmp.ServerCodec.error(None, "GenericError", item.desc))
                log.warning("control: dropped a client: %s", item.desc)
                self.close_after_flush()
                return
            self.queue.put_nowait(item)
        if self.queue.qsize() >= MAX_QUEUED_REQUESTS:
            self._set_reading(False)  # backpressure: read more once the worker catches up

    def _keep_fds(self, fds: list[int]) -> None:
        self.fds.extend(fds)
        while len(self.fds) > MAX_PENDING_FDS:
            os.close(self.fds.pop(0))

    async def _work(self) -> None:
        while not self.closed:
            item = await self.queue.get()
            if item is _HALF_CLOSED:
                self.close_after_flush()
                return
            if self.queue.qsize() < MAX_QUEUED_REQUESTS // 2:
                self._set_reading(True)
            if isinstance(item, qmp.BadRequest):
                self.send(qmp.ServerCodec.error(item, "GenericError", item.desc))
                continue
            gate = self.codec.gate(item)
            if gate is not None:
                self.send(qmp.ServerCodec.error(item, *gate))
                continue
            if item.execute == "qmp_capabilities":
                self.send(qmp.ServerCodec.reply(item, {}))
                continue
            handler = COMMANDS.get(item.execute)
            if handler is None:
                self.send(qmp.ServerCodec.error(item, "CommandNotFound", f"The command {item.execute} has not been found"))
                continue
            await asyncio.sleep(0)  # one request at a time: a flood must not hold the loop
            try:
                result = await handler(self, item.arguments)
            except QMPError as exc:
                self.send(qmp.ServerCodec.error(item, exc.error_class, exc.desc))
            except FdmigError as exc:
                self.send(qmp.ServerCodec.error(item, "GenericError", str(exc)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: answer and log, never take the instance down
                log.exception("control: %s failed", item.execute)
                self.send(qmp.ServerCodec.error(item, "GenericError", f"internal error: {exc!r}"))
            else:
                await self._reply(item, result)
            finally:
                if item.execute != "getfd":
                    self._drop_fds()

    async def _reply(self, request, result) -> None:
        head, streamed, tail = qmp.ServerCodec.reply_parts(request, result)
        if streamed is None:
            self.send(head)
            return
        # A streamed value goes out as it is made. One reply is one line of QMP:
        # events wait until it is whole, and a failure half-way can only end the
        # connection (the client sees EOF, not a reply cut short).
        self._held = bytearray()
        try:
            self.send(head)
            async with contextlib.aclosing(streamed.pieces) as pieces:
                async for piece in pieces:
                    if self.closed:
                        return
                    self.send(piece.encode())
            self.send(tail)
        except Exception:
            log.exception("control: %s failed half-way through its reply", request.execute)
            self.close()
        finally:
            held, self._held = self._held, None
            if held:
                self.send(held)

    def send_event(self, message: bytes) -> None:
        if self._held is None:
            self.send(message)
        elif len(self._held) + len(self.outbuf) + len(message) > MAX_OUTBUF:
            log.warning("control: dropped a client that does not read its replies")
            self.close()
        else:
            self._held += message

    def _drop_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.outbuf += data
        if len(self.outbuf) > MAX_OUTBUF:
            log.warning("control: dropped a client that does not read its replies")
            self.close()
            return
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        try:
            nbio.send_some(self.sock, self.outbuf)
        except OSError:
            self.close()
            return
        want = bool(self.outbuf)
        if want != self._writing:
            if want:
                self._loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self.sock.fileno())
            self._writing = want
        if not want and self._closing_after_flush:
            self.close()

    def close_after_flush(self) -> None:
        self._set_reading(False)
        self._closing_after_flush = True
        if not self.outbuf:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self._set_reading(False)
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
            self._writing = False
        self.closed = True
        self.gone.set()
        self.sock.close()
        self._drop_fds()
        self.server.connections.discard(self)
        if self._worker is not None and self._worker is not asyncio.current_task():
            self._worker.cancel()


# ----- commands --------------------------------------------------------------

def _arg(arguments: dict, key: str, kind: type, required: bool = True, default=None):
    if key not in arguments:
        if required:
            raise QMPError("GenericError", f"Parameter '{key}' is missing")
        return default
    value = arguments[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object"}[kind]
        raise QMPError("GenericError", f"Invalid parameter type for '{key}', expected: {expected}")
    return value


def _no_extra(arguments: dict, *allowed: str) -> None:
    for key in arguments:
        if key not in allowed:
            raise QMPError("GenericError", f"Parameter '{key}' is unexpected")


async def cmd_chardev_add(conn: ControlConnection, arguments: dict):
    _arg(arguments, "id", str)
    _arg(arguments, "backend", dict)
    _no_extra(arguments, "id", "backend")
    _running(conn)
    spec = specs.from_qmp(arguments)
    await conn.instance.check_free(spec)
    _running(conn)  # again: a migration may have begun while other instances were asked
    chardev = await conn.instance.add_chardev(spec)
    # QEMU's ChardevReturn: a pty's slave, as the kernel named it.
    return {"pty": chardev.spec.path} if spec.kind == "pty" else {}


async def cmd_chardev_remove(conn, arguments):
    label = _arg(arguments, "id", str)
    _no_extra(arguments, "id")
    _running(conn)
    conn.instance.remove_chardev(label)
    return {}


async def cmd_query_chardev(conn, arguments):
    _no_extra(arguments)
    return [presentation.qmp_chardev(c) for c in conn.instance.chardevs.values()]


async def cmd_query_status(conn, arguments):
    _no_extra(arguments)
    state = conn.instance.run_state
    return {"status": state.value, "running": state is RunState.RUNNING, "singlestep": False}


async def cmd_getfd(conn, arguments):
    name = _arg(arguments, "fdname", str)
    _no_extra(arguments, "fdname")
    if not conn.fds:
        raise QMPError("GenericError", "No file descriptor supplied via SCM_RIGHTS")
    try:
        specs.check_label(name, field="fdname")
    except SpecError as exc:
        raise QMPError("GenericError", str(exc)) from None
    fd = conn.fds.pop()
    conn._drop_fds()
    named = conn.instance.named_fds
    if name in named:
        os.close(named[name])
    named[name] = fd
    return {}


async def cmd_closefd(conn, arguments):
    name = _arg(arguments, "fdname", str)
    _no_extra(arguments, "fdname")
    fd = conn.instance.named_fds.pop(name, None)
    if fd is None:
        raise QMPError("GenericError", f"File descriptor named '{name}' not found")
    os.close(fd)
    return {}


async def cmd_quit(conn, arguments):
    _no_extra(arguments)
    try:
        who = f" from pid {paths.peercred(conn.sock)[0]}"
    except OSError:
        who = ""
    conn.instance.request_stop(f"QMP quit{who}")
    return {}


async def cmd_status(conn, arguments):
    _no_extra(arguments)
    return await conn.instance.status()


async def cmd_migrate_set_capabilities(conn, arguments):
    caps = _arg(arguments, "capabilities", list)
    _no_extra(arguments, "capabilities")
    instance = conn.instance
    _no_migration(instance)
    updates = {}
    for cap in caps:
        if not isinstance(cap, dict):
            raise QMPError("GenericError", "Invalid parameter type for 'capabilities[]', expected: object")
        name = _arg(cap, "capability", str)
        state = _arg(cap, "state", bool)
        if name not in instance.capabilities:
            raise QMPError("GenericError", f"Parameter 'capability' does not accept value '{name}'; "
                                           f"accepted: {', '.join(instance.capabilities)}")
        updates[name] = state
    instance.capabilities.update(updates)
    return {}


async def cmd_query_migrate_capabilities(conn, arguments):
    _no_extra(arguments)
    return [{"capability": k, "state": v} for k, v in conn.instance.capabilities.items()]


async def cmd_migrate_set_parameters(conn, arguments):
    """QEMU's newer switch for local migration: `local` is capability
    local-char-socket, set here as migrate-set-capabilities sets it."""
    local = _arg(arguments, "local", bool, required=False)
    _no_extra(arguments, "local")
    _no_migration(conn.instance)
    if local is not None:
        conn.instance.capabilities["local-char-socket"] = local
    return {}


async def cmd_query_migrate_parameters(conn, arguments):
    _no_extra(arguments)
    return {"local": conn.instance.capabilities["local-char-socket"]}


async def cmd_migrate(conn, arguments):
    uri = _arg(arguments, "uri", str)
    timeout = arguments.get("x-fdmig-timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise QMPError("GenericError", "Invalid parameter type for 'x-fdmig-timeout', expected: positive number")
    tls_creds = _arg(arguments, "x-fdmig-tls-creds", str, required=False)
    hooks = {role: _arg(arguments, f"x-fdmig-{role}-cmd", str, required=False) for role in ("release", "reclaim")}
    reconnect = _arg(arguments, "x-fdmig-reconnect", bool, required=False, default=False)
    _no_extra(arguments, "uri", "x-fdmig-timeout", "x-fdmig-tls-creds", "x-fdmig-release-cmd", "x-fdmig-reclaim-cmd",
              "x-fdmig-reconnect", "detach", "resume", "blk", "inc")
    instance = conn.instance
    if instance.run_state is not RunState.RUNNING:
        raise QMPError("GenericError", f"cannot migrate an instance in state {instance.run_state.value}")
    _no_migration(instance)
    try:
        address = paths.parse_channel_uri(uri)
    except ValueError as exc:
        raise QMPError("GenericError", str(exc)) from None
    if tls_creds is not None:
        tlscreds.check(tls_creds, "client")
    # The wait for a target to listen is fdmig's own (QEMU's migrate fails at once):
    # it lasts only while the client that asked for it is there.
    instance.migrate(address, timeout, abandoned=conn.gone, tls_creds=tls_creds,
                     hooks={role: cmd for role, cmd in hooks.items() if cmd}, reconnect=reconnect)
    return {}


async def cmd_migrate_cancel(conn, arguments):
    _no_extra(arguments)
    conn.instance.cancel_migration()
    return {}


async def cmd_query_migrate(conn, arguments):
    _no_extra(arguments)
    lifecycle = conn.instance.lifecycle
    if lifecycle.status is MigrationStatus.NONE:
        return {}
    mig = lifecycle.info()
    out = {"status": mig["status"]}
    for ours, qemus in (("total-ms", "total-time"), ("downtime-ms", "downtime"), ("setup-ms", "setup-time")):
        if mig.get(ours) is not None:
            out[qemus] = int(round(mig[ours]))
    if mig.get("error"):
        out["error-desc"] = mig["error"]
    out["x-fdmig"] = mig
    return out


async def cmd_migrate_incoming(conn, arguments):
    uri = _arg(arguments, "uri", str)
    _no_extra(arguments, "uri")
    instance = conn.instance
    if instance.run_state is not RunState.INMIGRATE or instance.incoming_channel is None:
        raise QMPError("GenericError", "this instance is running, not waiting for a migration; "
                                       "start a target with: fdmig migrate-in")
    if instance.incoming_channel.done():
        raise QMPError("GenericError", f"already waiting for a migration on {instance.incoming_channel.result()}")
    try:
        address = paths.parse_channel_uri(uri)
    except ValueError as exc:
        raise QMPError("GenericError", str(exc)) from None
    if address.tcp and instance.tls_creds is None:
        raise QMPError("GenericError", f"{address}: a TCP channel needs TLS credentials; start the target "
                                       "with fdmig migrate-in --tls-creds DIR")
    instance.incoming_channel.set_result(address)
    return {}


def _running(conn) -> None:
    if conn.instance.run_state is not RunState.RUNNING:
        raise QMPError("GenericError", f"the instance is {conn.instance.run_state.value}: "
                                       "its chardevs cannot change now")
    # The source's table is the target's plan: it cannot change under a migration.
    _no_migration(conn.instance, "; chardevs cannot be added or removed until it ends")


def _no_migration(instance, consequence: str = "") -> None:
    if instance.lifecycle.migrating:
        raise QMPError("GenericError", "There's a migration process in progress" + consequence)


async def cmd_restart(conn, arguments):
    timeout = arguments.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise QMPError("GenericError", "Invalid parameter type for 'timeout', expected: positive number")
    _no_extra(arguments, "timeout")
    service = conn.instance.service
    if service is None:
        raise QMPError("GenericError", "this instance runs no service; start one with: fdmig run ... -- CMD")
    return await service.restart(timeout)


COMMANDS = {
    "migrate": cmd_migrate,
    "migrate_cancel": cmd_migrate_cancel,
    "migrate-cancel": cmd_migrate_cancel,
    "query-migrate": cmd_query_migrate,
    "migrate-incoming": cmd_migrate_incoming,
    "chardev-add": cmd_chardev_add,
    "chardev-remove": cmd_chardev_remove,
    "query-chardev": cmd_query_chardev,
    "query-status": cmd_query_status,
    "getfd": cmd_getfd,
    "closefd": cmd_closefd,
    "quit": cmd_quit,
    "x-fdmig-status": cmd_status,
    "x-fdmig-restart": cmd_restart,
    "migrate-set-capabilities": cmd_migrate_set_capabilities,
    "query-migrate-capabilities": cmd_query_migrate_capabilities,
    "migrate-set-parameters": cmd_migrate_set_parameters,
    "query-migrate-parameters": cmd_query_migrate_parameters,
}
