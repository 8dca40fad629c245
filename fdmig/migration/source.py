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
import os
import time

from fdmig import __version__, faults, paths, systemd
from fdmig.migration import channel, wire

log = logging.getLogger("fdmig")
# After the commit: how long the target may take to say TAKEN, and how much longer
# it is given once SIGTERM asks the source to stop.
TAKEN_TIMEOUT = 10.0
STOP_GRACE = 1.0


class MigrationFailed(Exception):
    """The migration cannot go on; the message is the reason, for query-migrate."""


class MigrationCancelled(MigrationFailed):
    pass


def blockers(instance) -> list[str]:
    """Why a migration now would lose a chardev (QEMU's migration blockers): one
    the target cannot reopen that would not move live, or a bridge one side of
    which would move while the other reopened, splicing a live peer onto a new
    session. Empty when nothing would be lost."""
    live = instance.capabilities["local-char-socket"]
    moves = {label: live and c.spec.support_local_migration for label, c in instance.chardevs.items()}
    reasons = []
    inherited = [c.label for c in instance.chardevs.values()
                 if c.spec.kind in ("fd", "fdname") and not moves[c.label] and c.sockets()]
    if inherited:
        how = ("mark them support-local-migration=on" if live else
               "enable capability local-char-socket (and mark them support-local-migration=on)")
        reasons.append(f"chardev(s) {', '.join(inherited)} hold an inherited fd (fd=/fdname=) that the "
                       f"target cannot reopen, and would not move live: {how}")
    for chardev in instance.chardevs.values():
        partner = chardev.spec.bridge
        if partner and partner in moves and moves[chardev.label] != moves[partner]:
            stays = partner if moves[chardev.label] else chardev.label
            reasons.append(f"bridge {chardev.label}-{partner}: {stays} is not support-local-migration=on, "
                           "so its side would reopen under a live peer's session; mark both or neither")
    return reasons


def table_entry(chardev, live: bool) -> dict:
    """The chardev's spec, and how many fds will come for it, so the target can
    refuse before the commit a migration that would exceed its fd limit."""
    entry = chardev.spec.to_dict()
    if live and chardev.spec.support_local_migration:
        entry["x-fds"] = (chardev.listener is not None) + (chardev.conn is not None)
    return entry


async def migrate(instance, path: str, timeout: float | None, abandoned: asyncio.Event | None = None) -> None:
    """Run one migration to the target listening at `path`. Never raises: the
    outcome is in instance.migration and the MIGRATION events. `abandoned` set
    while no target listens yet cancels it: the client that asked has gone."""
    started = time.monotonic()
    deadline = started + timeout if timeout else None
    live = instance.capabilities["local-char-socket"]
    instance.set_migration("setup", chardevs=0, error=None, downtime_ms=None, total_ms=None, setup_ms=None)
    quiesced = []
    chan = None
    committed = instance.migration_committed = False
    try:
        def waiting():
            log.info("migration: waiting for a target to listen on unix:%s", path)
            if instance.control is not None:
                instance.control.broadcast("X_FDMIG_MIGRATION_WAITING", {"channel": f"unix:{path}"})
        try:
            sock = await channel.connect(path, deadline, abandoned, on_wait=waiting)
        except ConnectionAbortedError as exc:
            raise MigrationCancelled(str(exc)) from None
        except OSError as exc:
            raise MigrationFailed(str(exc) if isinstance(exc, ConnectionRefusedError) else
                                  f"cannot connect to unix:{path}: {exc.strerror}") from None
        _, uid = paths.peercred(sock)
        if not paths.peer_allowed(uid):
            sock.close()
            raise MigrationFailed(f"the target on unix:{path} runs as uid {uid}, not as uid {os.geteuid()}")
        chan = channel.Channel(sock, wire.Role.SOURCE)
        await chan.send(wire.Hello(instance.name, os.getpid(), __version__), deadline)
        await chan.send(wire.Table(dict(instance.capabilities),
                                   [table_entry(c, live) for c in instance.chardevs.values()]), deadline)
        faults.point("source-after-table")
        target_info = dict((await expect(chan, wire.Accept, "accepting the table", deadline)).info)
        # QEMU's setup-time: until the precopy (its iterations) begins.
        setup_ms = (time.monotonic() - started) * 1000
        instance.set_migration("active", setup_ms=round(setup_ms, 3))
        precopied = await _precopy(instance, chan, live, deadline)
        await expect(chan, wire.Held, "holding the precopy", deadline)

        # Quiesce everything, moved or not: a chardev that stays behind must not
        # keep filling the out-buffer of one whose state has already been sent.
        quiesce_at = time.monotonic()
        gc.disable()  # no collection pause inside the downtime; on again when it ends
        instance.migrating = True
        instance.poller.pause()
        for chardev in instance.chardevs.values():
            chardev.quiesce()
            quiesced.append(chardev)
        faults.point("source-after-quiesce")
        sections = []
        counters = []  # [label, rx-bytes, tx-bytes] of the rest that moved bytes: after the commit
        moved = 0
        for chardev in instance.chardevs.values():
            if not (live and chardev.spec.support_local_migration):
                continue  # the target opens it afresh
            fingerprint, sockets, counted = precopied.get(chardev.label, (None, None, None))
            if fingerprint == chardev.fingerprint() and not chardev.outbuf:
                moved += 1  # the target has it from the precopy, bar the byte counts
                if counted != (chardev.rx_bytes, chardev.tx_bytes):
                    counters.append([chardev.label, chardev.rx_bytes, chardev.tx_bytes])
                continue
            meta, outbuf, fds = chardev.section(True, sockets)
            # With no socket, a section still carries bytes (and an EOF) waiting for
            # a connection the target makes afresh: a bridge's client side connecting.
            if fds or sockets or outbuf or "stream" in meta:
                moved += bool(fds or meta.get("held"))
                sections.append(wire.Section(chardev.label, meta, outbuf, fds))
        await chan.send(wire.Transfer(sections), deadline)
        faults.point("source-after-transfer")
        await expect(chan, wire.Ack, "acknowledging", deadline)
        committed = instance.migration_committed = True  # from here on, the connections are the target's
    except channel.ChannelTimeout as exc:
        waiting = f": {exc}" if str(exc) else ""
        _roll_back(instance, quiesced, chan, f"timed out after {timeout:g} s{waiting}", timed_out=True)
        return
    except MigrationCancelled as exc:
        _roll_back(instance, quiesced, chan, str(exc), status="cancelled")
        return
    except MigrationFailed as exc:
        _roll_back(instance, quiesced, chan, str(exc))
        return
    except wire.RemoteProtocolError as exc:
        _roll_back(instance, quiesced, chan, f"the target broke the protocol: {exc}")
        return
    except (BrokenPipeError, ConnectionResetError):
        _roll_back(instance, quiesced, chan, f"the target closed the channel during {chan.codec.state.name.lower()}")
        return
    except (OSError, wire.ProtocolError) as exc:
        _roll_back(instance, quiesced, chan, f"channel error: {exc}")
        return
    except asyncio.CancelledError:
        if not committed:
            _roll_back(instance, quiesced, chan, "cancelled", status="cancelled")
            return
        raise
    faults.point("source-after-ack")
    await _hand_over(instance, chan, started, quiesce_at, moved, target_info, quiesced, counters)


async def _precopy(instance, chan, live: bool, deadline) -> dict:
    """Send the moved chardevs' fds and state while every chardev still serves,
    a frame's worth at a time with the loop running in between, so no peer
    waits on the encoding of thousands. Returns, by label, the fingerprint,
    sockets and byte counts sent. Each chardev keeps the sockets it closes meanwhile open until
    the end (Chardev.pin): a number in a frame not yet sent must not come to
    name another socket."""
    precopied, batch, pinned = {}, [], []
    fds_in_batch = 0
    try:
        for chardev in list(instance.chardevs.values()):
            sockets = chardev.sockets()
            if not (live and chardev.spec.support_local_migration and sockets):
                continue
            chardev.pin()
            pinned.append(chardev)
            precopied[chardev.label] = chardev.fingerprint(), sockets, (chardev.rx_bytes, chardev.tx_bytes)
            meta, _, fds = chardev.section(True)  # bytes to carry go at the quiesce
            batch.append(wire.Section(chardev.label, meta, b"", fds))
            fds_in_batch += len(fds)
            if fds_in_batch >= wire.MAX_FDS_PER_FRAME - 1:
                await chan.send(wire.Precopy(batch, more=True), deadline)
                batch, fds_in_batch = [], 0
                await asyncio.sleep(0)  # the chardevs' turn
        await chan.send(wire.Precopy(batch), deadline)
    finally:
        for chardev in pinned:
            chardev.unpin()
    faults.point("source-after-precopy")
    return precopied


async def expect(chan, kind, step: str, deadline):
    """The target's next event, which must be `kind`; anything else fails the migration."""
    reply = await chan.next_event(deadline)
    if isinstance(reply, wire.Abort):
        raise MigrationFailed(f"the target refused: {reply.reason}")
    if not isinstance(reply, kind):
        raise MigrationFailed(f"the target closed the channel before {step}")
    return reply


def _roll_back(instance, quiesced, chan, reason: str, timed_out: bool = False, status: str = "failed") -> None:
    if chan is not None:
        chan.send_now(wire.Abort(reason))  # first: the target holds dups of our fds and must drop them
        chan.close()
    for chardev in quiesced:
        chardev.resume()
    instance.poller.resume()
    instance.migrating = False
    gc.enable()
    instance.report_status()
    log.warning("migration %s: %s; every chardev serves as before", status, reason)
    instance.set_migration(status, error=reason, error_class="timeout" if timed_out else None)


async def _wait_taken(instance, chan) -> bool | None:
    """Whether the target said TAKEN; None if it stayed silent for TAKEN_TIMEOUT, or
    for STOP_GRACE once the instance is asked to stop. Every wait after the commit
    has a deadline: a stopped target must not keep the source alive through SIGTERM."""
    receive = asyncio.ensure_future(chan.next_event(None))
    stop = asyncio.ensure_future(instance.stopping.wait())
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another uid
    return True


async def _hand_over(instance, chan, started, quiesce_at, moved, target_info, quiesced, counters) -> None:
    """After the commit: tell the target at once (its reading ends the downtime),
    wait for TAKEN, then close our copies, let go of the control path and exit.
    A target that dies before TAKEN has read nothing (it says TAKEN before its
    first read), so then every chardev resumes here instead."""
    if target_info.get("pid"):
        # The main process may name its successor: systemd (NotifyAccess=all) then
        # follows the handover even if we exit before the target has said so itself.
        systemd.notify(f"MAINPID={target_info['pid']}")
    try:
        await chan.send(wire.Released({"quiesce-at": quiesce_at, "started-at": started, "counters": counters,
                                       "setup-ms": instance.migration.get("setup-ms")}), None)
        released_at = time.monotonic()
        gc.enable()
        faults.point("source-after-released")
        taken = await _wait_taken(instance, chan)
    except (OSError, wire.ProtocolError):
        taken = False
    if taken is None:
        pid = target_info.get("pid")
        if type(pid) is int and pid > 0 and _alive(pid):
            # Silent, but alive (stopped, say): it holds every connection, and has
            # read nothing yet. Resuming here could make two readers; letting go cannot.
            log.warning("the target (pid %d) has not said it took over; it holds every connection, "
                        "so this source lets go of them", pid)
            taken = True
    if not taken:
        if target_info.get("pid"):
            systemd.notify(f"MAINPID={os.getpid()}")
        instance.migration_committed = False
        _roll_back(instance, quiesced, chan, "the target died after the commit, before taking over "
                                             "(it had read nothing)")
        return
    for chardev in instance.chardevs.values():
        chardev.release()
    instance.run_state = "postmigrate"
    instance.set_migration("completed", chardevs=moved, downtime_ms=round((released_at - quiesce_at) * 1000, 3),
                           total_ms=round((released_at - started) * 1000, 3), target=target_info)
    log.info("migration completed: %d chardev(s) moved to pid %s", moved, target_info.get("pid"))
    instance.control.close(unlink=False, flush=True)
    chan.close()
    instance.handed_over = True
    instance.stopping.set()
