"""A chardev's migration form: the section that carries it, the fingerprint that
says whether it changed since the precopy, and how a target takes a section in.
The chardev itself only quiesces, resumes and holds sockets that moved."""

import operator
import os

from fdmig.generation import Phase
from fdmig.migration import wire


def pin(chardev) -> None:
    """Keep every socket the chardev closes open until unpin(): while a precopy is
    going out, their numbers are in frames not yet sent and must not come to name
    another socket."""
    chardev.pinned = []


def unpin(chardev) -> None:
    pinned, chardev.pinned = chardev.pinned or [], None
    for sock in pinned:
        sock.close()


def stream_flags(chardev) -> tuple[str, ...]:
    """Where the stream's end stands (a half-close under way, a session ending)."""
    on = (chardev.eof_read, chardev.eof_pending, chardev.eof_sent, chardev.closing)
    if not any(on):
        return ()  # the common case, and inside the downtime once per chardev
    return tuple(name for name, flag in zip(wire.STREAM_FLAGS, on) if flag)


def _set_stream_flags(chardev, flags) -> None:
    if not flags:  # the common case, thousands of times in a precopy
        chardev.eof_read = chardev.eof_pending = chardev.eof_sent = chardev.closing = False
        return
    chardev.eof_read, chardev.eof_pending, chardev.eof_sent, chardev.closing = (
        name in flags for name in wire.STREAM_FLAGS)


# What a section depends on, bar the counters and the carried bytes: a chardev
# whose fingerprint is the same at the quiesce as at the precopy, with nothing to
# carry, needs no new section. An attrgetter: inside the downtime it is taken of
# thousands, in C.
fingerprint = operator.attrgetter("settled", "conn", "listener", "eof_read", "eof_pending", "eof_sent", "closing")


def section(chardev, precopied: dict | None = None, carry: bool = True, streaming: bool = False) -> wire.Section:
    """The chardev's section, with its fds by role and, if `carry`, the bytes it
    holds for its peer. A socket the target already holds from the precopy
    (`precopied`, by role) is named in the state's `held` instead of sent again.
    `streaming`: its peer was served since the migration began (wire.SectionState)."""
    fds, held = {}, []
    for role, sock in chardev.sockets().items():
        if precopied and precopied.get(role) is sock:
            held.append(role)
        else:
            fds[role] = sock.fileno()
    meta = wire.SectionState.meta(chardev.rx_bytes, chardev.tx_bytes, chardev.migrations, chardev.connected_since,
                                  chardev.peer, stream_flags(chardev), held, streaming)
    return wire.Section(chardev.label, meta, bytes(chardev.outbuf) if carry else b"", fds)


def forget(chardev) -> None:
    """On the target: a chardev staged from the precopy whose connection did not
    come after all, back as registered, to be opened afresh (its fds closed by
    the caller, once it is no longer watched)."""
    chardev.outbuf = bytearray()
    chardev.rx_bytes = chardev.tx_bytes = chardev.migrations = 0
    _set_stream_flags(chardev, ())
    chardev.take_moved(None, None, None, None)
    chardev.peer = chardev.connected_since = None


def restore(chardev, state: wire.SectionState, outbuf: bytes, conn, listener) -> None:
    """On the target: take over a moved chardev, from the precopy and then again
    if its state changed before the quiesce. Carried bytes go out first. With no
    socket, the bytes (and an EOF) wait for a connection the target makes afresh,
    as a bridge's client side holds them while it connects for its partner's peer."""
    chardev.outbuf = bytearray(outbuf)
    if conn is None and listener is None:
        _set_stream_flags(chardev, state.stream)
        chardev.take_moved(None, None, None, None)
        return
    chardev.rx_bytes, chardev.tx_bytes = state.rx_bytes, state.tx_bytes
    chardev.migrations = state.migrations + 1
    _set_stream_flags(chardev, state.stream if conn is not None else ())
    chardev.take_moved(conn, listener, state.peer, state.connected_since)



def moves_live(chardev, live: bool) -> bool:
    """Whether a migration moves the chardev's sockets live: marked, a `run`
    instance's service chardev, whose service holds them and goes on using them,
    or a pty, which no target can open again (its program would be hung up)."""
    spec = chardev.spec
    return live and (spec.support_local_migration or spec.frontend == "service" or spec.kind == "pty")


def stdio_section() -> list[wire.Section]:
    """Our stdout and stderr (those open), for a target that takes them up at
    the commit, so that the instance's log goes on where it went."""
    fds = {}
    for name, fd in wire.STDIO.items():
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds[name] = fd
    return [wire.Section(wire.STDIO_SECTION, {}, b"", fds)] if fds else []


def service_sections(service, store) -> list[wire.Section]:
    """A `run` instance's service: its state and notify socket, then each stored
    fd in the order stored. Sent inside the downtime: the notify socket is not
    read from the quiesce on, so the store cannot change after these are built."""
    options = service.options
    state = wire.ServiceState(tuple(service.argv), service.main_pid, service.state.value, service.ready,
                              service.status_text, service.restarts, options.notify_ready, options.restart,
                              int(options.stop_signal), float(options.stop_timeout), store.limit, store.refused,
                              options.overlap, float(options.ready_delay),
                              tuple((g.pid, g.since, g.kill_at, g.phase is Phase.KILLED)
                                    for g in service.draining if g.alive))
    sections = [wire.Section(wire.SERVICE_SECTION, state.to_meta(), b"", {"notify": service.sock.fileno()})]
    for index, entry in enumerate(store.entries):
        stored = wire.StoredState(entry.name, entry.poll, entry.stored_at)
        sections.append(wire.Section(f"{wire.STORED_SECTION}{index}", stored.to_meta(), b"", {"fd": entry.fd}))
    return sections
