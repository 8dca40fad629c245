"""The target side of a migration (`migrate-in`): wait on the channel, check the
source's table against our own `local-incoming` chardevs, check every fd received
against its spec (those of the precopy while the source still serves), take the
state of what changed since, acknowledge (the commit point), take over.

A source that is malformed, foreign or mismatched is refused with a log line and
the target goes on waiting for the next one."""

import asyncio
import fcntl
import gc
import logging
import os
import resource
import socket
import time

from fdmig import faults, paths, spec as specs
from fdmig.chardev import FD_RESERVE, socket_family
from fdmig.errors import FdmigError, SpecError, TimeoutExpired
from fdmig.migration import channel, wire

log = logging.getLogger("fdmig")
SESSION_TIMEOUT = 30.0  # a source that stalls longer than this is dropped
RELEASE_TIMEOUT = 10.0  # after our ACK, a source silent this long is dropped (it rolls back)


def _show(value) -> str:
    # Peer data in a log line: short, and never the repr of a deep structure.
    return repr(value) if isinstance(value, str) and len(value) <= 40 else type(value).__name__


class Refused(Exception):
    """The source is refused; the reason goes to the log and to the source."""


class Plan:
    """What the target will hold: spec by label, in the source's order, and the
    source's capabilities, which the target carries on."""

    def __init__(self, specs_by_label: dict, source_order: list[str], capabilities: dict):
        self.specs = specs_by_label
        self.order = source_order
        self.capabilities = capabilities


def make_plan(own: list, table: wire.Table) -> Plan:
    """Check the source's table against our chardevs; adopt what we do not name."""
    live = bool(table.capabilities.get("local-char-socket"))
    source: dict = {}
    for entry in table.chardevs:
        try:
            spec = specs.from_dict({k: v for k, v in entry.items() if not k.startswith("x-")})
        except SpecError as exc:
            raise Refused(f"the source's table has a bad chardev: {exc}") from None
        source[spec.id] = spec
    result = dict(source)
    for mine in own:
        theirs = source.get(mine.id)
        if mine.local_incoming:
            if theirs is None:
                raise Refused(f"chardev {mine.id}: local-incoming=on, but the source has no such chardev")
            if not live:
                raise Refused(f"chardev {mine.id}: local-incoming=on, but the source's capability "
                              "local-char-socket is off, so no fd can arrive")
            if not theirs.support_local_migration:
                raise Refused(f"chardev {mine.id}: local-incoming=on, but the source does not mark it "
                              "support-local-migration=on")
            if (mine.address, mine.role) != (theirs.address, theirs.role) and theirs.kind not in ("fd", "fdname"):
                raise Refused(f"chardev {mine.id}: {mine.role} {mine.address} here, but "
                              f"{theirs.role} {theirs.address} on the source")
        result[mine.id] = mine
    order = [e["id"] for e in table.chardevs] + [m.id for m in own if m.id not in source]
    try:
        specs.check_set(list(result.values()))
    except SpecError as exc:
        raise Refused(f"the chardevs do not fit together: {exc}") from None
    return Plan(result, order, {k: bool(v) for k, v in table.capabilities.items()})


def check_fd(fd: int, role: str, spec, label: str) -> socket.socket:
    """Take ownership of `fd` (closed if refused) as a non-blocking socket. A
    received fd must be a stream socket of the family the spec says, listening or
    connected as its role says, at the spec's address."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise Refused(f"chardev {label}: the {role} fd is not a socket ({exc.strerror})") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise Refused(f"chardev {label}: the {role} fd is not a stream socket")
        if spec.kind in ("unix", "inet"):
            want = socket_family(spec)
            families = (socket.AF_INET, socket.AF_INET6) if spec.kind == "inet" else (want,)
            if sock.family not in families:
                raise Refused(f"chardev {label}: the {role} fd is an {sock.family.name} socket, "
                              f"but the spec says {spec.address}")
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        if listening != (role == "listener"):
            raise Refused(f"chardev {label}: the {role} fd is {'a listening' if listening else 'a connected'} socket")
        if role == "listener" and not spec.server:
            raise Refused(f"chardev {label}: a listening fd arrived for a client chardev")
        if spec.kind == "unix":
            name = sock.getsockname() if spec.server else sock.getpeername()
            if name != spec.path:
                raise Refused(f"chardev {label}: the {role} fd is bound to '{name}', not to {spec.path}")
        elif spec.kind == "inet":
            port = (sock.getsockname() if spec.server else sock.getpeername())[1]
            if spec.port and port != spec.port:
                raise Refused(f"chardev {label}: the {role} fd is on port {port}, not {spec.port}")
    except Refused:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise Refused(f"chardev {label}: cannot inspect the {role} fd: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def fd_headroom() -> int:
    """Fds this process may still open, keeping the reserve every instance keeps."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - len(os.listdir("/proc/self/fd")) - FD_RESERVE


def stage(instance, plan: Plan) -> dict:
    """Register every chardev of the plan, unopened; a bridge after its partner."""
    ordered = specs.partners_first(plan.specs[label] for label in plan.order)
    return {spec.id: instance.register(spec) for spec in ordered}


class Received:
    def __init__(self, hello, plan, sections, sockets, released_info, chan):
        self.hello = hello
        self.plan = plan
        self.sections = sections  # label -> wire.Section
        self.sockets = sockets  # label -> {role: socket}
        self.released_info = released_info
        self.chan = chan


async def session(instance, sock: socket.socket, own: list, info: dict) -> Received:
    """One source's attempt. Returns what was received after the commit; raises
    Refused (the source was told why) or a protocol/channel error."""
    deadline = time.monotonic() + SESSION_TIMEOUT
    chan = channel.Channel(sock, wire.Role.TARGET)
    sockets: dict[str, dict[str, socket.socket]] = {}
    try:
        hello = await chan.next_event(deadline)
        if not isinstance(hello, wire.Hello):
            raise Refused("the source closed the channel before saying hello")
        if hello.name != instance.name:
            raise Refused(f"source instance '{hello.name}' is foreign: this target waits for '{instance.name}'")
        faults.point("target-after-hello")
        table = await chan.next_event(deadline)
        if not isinstance(table, wire.Table):
            raise Refused("the source closed the channel before sending its table")
        plan = make_plan(own, table)
        coming = sum(min(int(e.get("x-fds", 0)), 2) for e in table.chardevs if isinstance(e.get("x-fds", 0), int))
        headroom = fd_headroom()
        if coming > headroom:
            raise Refused(f"{coming} fds would come, more than the {headroom} this target "
                          "can still open (RLIMIT_NOFILE)")
        faults.point("target-after-table")
        # Build the chardevs before accepting: the source still serves meanwhile,
        # so this work stays out of the downtime.
        instance.migrating = True
        instance.poller.pause()  # until the takeover: a restored chardev is watched, never read
        chardevs = stage(instance, plan)
        gc.disable()  # no collection pause inside the downtime; on again at the resume
        await chan.send(wire.Accept(info), deadline)
        sections = {}  # label -> the latest wire.Section
        fresh = {m.id for m in own if not m.local_incoming}  # we open these afresh

        def take(batch, seen: set):
            # The precopy's sections (fds and state, the source still serving), then
            # those of the chardevs that changed since (quiesced: their state, the
            # held fds they keep, the fds of connections made since), each worked
            # on as its frame arrives, while the source still encodes the rest.
            for section in batch:
                spec = plan.specs.get(section.label)
                if spec is None or section.label in seen:
                    raise Refused(f"chardev {section.label}: a section for a chardev not in the table, or twice")
                seen.add(section.label)
                if section.label in fresh:
                    continue
                sections[section.label] = section
                by_role = sockets.setdefault(section.label, {})
                keep = section.meta.get("held", [])
                for role in keep if isinstance(keep, list) else [None]:
                    if type(role) is not str or role not in by_role or role in section.fds:
                        raise Refused(f"chardev {section.label}: the section names a held fd {_show(role)}, "
                                      f"but the precopy brought {sorted(by_role) or 'none'} for it")
                chardev = chardevs[section.label]
                if section.fds or set(keep) != by_role.keys():
                    chardev.unprime()  # its sockets change
                    for role in [r for r in by_role if r not in keep]:
                        by_role.pop(role).close()  # gone on the source since the precopy
                    for role, index in section.fds.items():  # into what the failure path closes
                        by_role[role] = check_fd(chan.take(index), role, spec, section.label)
                chardev.restore(section.meta, section.outbuf, by_role.get("conn"), by_role.get("listener"))
                if not by_role:
                    del sockets[section.label]  # nothing moves: opened afresh, as unmarked ones
                elif not chardev.primed:
                    chardev.prime()
            faults.point("target-after-batch")

        async def receive(kind, what: str) -> None:
            seen: set = set()
            event = await chan.next_event(deadline, progress=lambda: take(chan.codec.take_sections(), seen))
            if not isinstance(event, kind):
                raise Refused(f"the source closed the channel before sending {what}")
            take(event.sections, seen)

        await receive(wire.Precopy, "its precopy")
        faults.point("target-after-precopy")
        await chan.send(wire.Held(), deadline)
        await receive(wire.Transfer, "the state")
        for mine in own:
            if mine.local_incoming and not sockets.get(mine.id):
                raise Refused(f"chardev {mine.id}: local-incoming=on, but no fd arrived for it")
        faults.point("target-before-ack")
        try:
            await chan.send(wire.Ack(), deadline)
            faults.point("target-after-ack")
            # The commit point is the source reading our ACK; it may still roll back
            # if its timeout fires first, so nothing is read until it says RELEASED.
            final = await chan.next_event(time.monotonic() + RELEASE_TIMEOUT)
        except channel.ChannelTimeout:
            # Nothing read yet, and the channel closes: a source that wakes up finds
            # it so and rolls back. Waiting on could keep this target forever.
            raise Refused(f"the source did not let go within {RELEASE_TIMEOUT:g} s of our acknowledgement") from None
        except (OSError, wire.RemoteProtocolError) as exc:
            final = exc
        if isinstance(final, wire.Abort):
            raise Refused(f"the source rolled back after our acknowledgement: {final.reason}")
        if isinstance(final, wire.Released):
            released = dict(final.info)
        elif await wait_exit(hello.pid, timeout=10.0):
            # It died with everything sent: nobody else can read these fds any more,
            # and taking them over keeps every connection alive.
            log.warning("source pid %d died before letting go; taking over what it sent", hello.pid)
            released = {}
        else:
            raise Refused("the source closed the channel before letting go, and lives on")
        faults.point("target-after-released")
        return Received(hello, plan, sections, sockets, released, chan)
    except BaseException as exc:
        for chardev in instance.chardevs.values():
            chardev.discard()  # staged, never opened
        for by_role in sockets.values():
            for s in by_role.values():
                s.close()
        instance.chardevs.clear()
        instance.poller.resume()
        instance.migrating = False
        gc.enable()
        if isinstance(exc, (Refused, wire.RemoteProtocolError)):
            try:
                if chan.codec.state not in (wire.State.FAILED, wire.State.RELEASED):
                    await chan.send(wire.Abort(str(exc)), time.monotonic() + 1)
            except (OSError, wire.ProtocolError, channel.ChannelTimeout):
                pass
        chan.close()
        raise


async def wait_exit(pid: int, timeout: float | None = None) -> bool:
    """Whether process `pid` has exited within `timeout` (its pidfd readable)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def receive(instance, path: str, own: list, timeout: float | None, info: dict) -> Received:
    """Listen at `path` until one source migrates successfully."""
    from fdmig.control import claim_path
    claim_path(path, what="a migration target")
    listener = paths.bind_private(path)
    inode = os.stat(path).st_ino
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout if timeout else None
    log.info("waiting for a source on unix:%s", path)
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutExpired(f"no migration arrived on unix:{path} within {timeout:g} s")
            try:
                sock, _ = await asyncio.wait_for(loop.sock_accept(listener), remaining)
            except asyncio.TimeoutError:
                continue
            pid, uid = paths.peercred(sock)
            if not paths.peer_allowed(uid):
                log.warning("refused a source of uid %d (pid %d): only uid %d or root may migrate here",
                            uid, pid, os.geteuid())
                sock.close()
                continue
            instance.set_migration("active", error=None, source_pid=pid)
            try:
                return await session(instance, sock, own, info)
            except (Refused, wire.RemoteProtocolError) as exc:
                reason = f"refused source pid {pid}: {exc}"
            except channel.ChannelTimeout:
                reason = f"dropped source pid {pid}: it stalled for {SESSION_TIMEOUT:g} s"
            except OSError as exc:
                reason = f"lost source pid {pid}: {exc}"
            log.warning("%s; still waiting", reason)
            # What query-migrate says on <name>.incoming.sock until the next source.
            instance.set_migration("failed", error=reason)
    finally:
        listener.close()
        paths.remove_own_socket(path, inode)


async def take_over(instance, received: Received) -> None:
    """After RELEASED: the moved chardevs resume first (that ends the downtime),
    then the rest are opened afresh and the control path is ours."""
    from fdmig.control import ControlServer
    plan = received.plan
    instance.migrating = True
    instance.poller.pause()  # every moved chardev starts reading at the same instant
    moved = [instance.chardevs[label] for label in received.sockets]
    for chardev in moved:
        chardev.resume()
    instance.poller.resume()
    resumed_at = time.monotonic()
    gc.enable()
    # TAKEN before the first read (the loop has not run since the resume): a source
    # that never hears it knows we read nothing and may serve on.
    received.chan.send_now(wire.Taken())
    received.chan.close()
    instance.migrating = False
    instance.run_state = "running"
    for name, state in plan.capabilities.items():
        if name in instance.capabilities:
            instance.capabilities[name] = state
    info = received.released_info
    apply_counters(instance, received.sockets, info.get("counters"))
    quiesce_at = info.get("quiesce-at")
    started_at = info.get("started-at")
    instance.set_migration(
        "completed", chardevs=len(moved), error=None,
        downtime_ms=round((resumed_at - quiesce_at) * 1000, 3) if isinstance(quiesce_at, float) else None,
        total_ms=round((resumed_at - started_at) * 1000, 3) if isinstance(started_at, float) else None,
        setup_ms=info.get("setup-ms"), source_pid=received.hello.pid)
    for label, chardev in list(instance.chardevs.items()):
        if label in received.sockets:
            continue
        try:
            await instance.open_registered(chardev)
        except FdmigError as exc:
            log.warning("chardev %s: not moved and cannot be opened afresh: %s", label, exc)
    instance.control = ControlServer(instance)
    instance.control.bind(instance.control_path, take_over=True)
    instance.control.start()
    log.info("migration completed: %d chardev(s) moved live from pid %d, downtime %s ms",
             len(moved), received.hello.pid, instance.migration.get("downtime-ms"))


def apply_counters(instance, moved, counters) -> None:
    """The byte counts of chardevs that moved bytes, but nothing else, since the
    precopy: the source sends them with RELEASED, out of the downtime's way. The
    loop has not run since the resume, so no byte has been counted here yet."""
    if not isinstance(counters, list):
        return
    for entry in counters:
        if (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0] in moved
                and all(type(n) is int and n >= 0 for n in entry[1:])):
            chardev = instance.chardevs[entry[0]]
            chardev.rx_bytes, chardev.tx_bytes = entry[1], entry[2]
        else:
            log.warning("ignored a malformed byte count from the source: %s", _show(entry))


def exec_handover(received: Received, argv: list[str]) -> None:
    """Hand the moved fds to `argv` by systemd's socket-activation protocol: from fd
    3 on, in label order, each chardev's connection named by its label and a
    server's listener after it as LABEL.listener; blocking, close-on-exec cleared."""
    from fdmig import systemd
    names, socks = [], []
    for label in sorted(received.sockets):
        by_role = received.sockets[label]
        section = received.sections[label]
        if "conn" in by_role:
            conn = by_role["conn"]
            conn.setblocking(True)
            if section.outbuf:
                conn.sendall(section.outbuf)  # carried bytes go first, as in serve
            names.append(label)
            socks.append(conn)
        if "listener" in by_role:
            names.append(f"{label}.listener")
            socks.append(by_role["listener"])
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
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        log.error("cannot exec %s: %s; the moved connections are lost", argv[0], exc.strerror)
        os._exit(1)
