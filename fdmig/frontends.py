"""What an instance does with the bytes a chardev receives (QEMU's frontends).

A frontend answers, for its chardev, what QEMU's chr_can_read and chr_read do: may
the chardev read now (backpressure), and where do bytes go; and what the end of
a peer's stream means (its EOF, or its loss). Bytes only ever wait in one place:
the out-buffer of the chardev they are for, so a migration carries exactly those
buffers and nothing else.
"""

import logging

log = logging.getLogger("fdmig")

# Stop reading a chardev while the buffer it feeds holds this much; resume once the
# buffer drains below the low mark. A read adds at most READ_SIZE, so a buffer
# never exceeds HIGH_WATER + READ_SIZE, well under a migration frame.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
READ_SIZE = 64 * 1024


class Frontend:
    name = "hold"
    reads = False
    waits_close = False  # after the peer's EOF, watch for its close (Bridge)
    watched = True  # the chardev watches its sockets at all
    on_demand = False  # connects only for a session (a bridge's client side)

    def __init__(self, chardev):
        self.chardev = chardev

    def target(self):
        """The chardev whose out-buffer this frontend fills, if any."""
        return None

    def can_receive(self) -> bool:
        target = self.target()
        return target is None or (target.pending < HIGH_WATER and (target.pipe is None or target.pipe.room > 0))

    def splice_target(self):
        """The chardev whose pipe the bytes read may go to with splice(2), if any."""
        return None

    def may_accept(self) -> bool:
        """Whether a server chardev may take its next peer now."""
        return True

    def received(self, data: bytes) -> None:
        pass

    def connected(self) -> None:
        """The chardev has a new peer."""

    def eof(self) -> None:
        """The peer sent EOF (and may still read): the chardev has stopped reading it."""
        self.chardev.finish("peer closed the connection")

    def eof_sent(self) -> None:
        """An EOF the chardev was asked to pass on has reached its peer."""

    def ended(self, reason: str, undelivered: int, lost: bool) -> None:
        """The chardev's connection is over, `lost` if the peer went away (reset, a
        failed write, a vanished peer): `undelivered` bytes for it were dropped."""


class Hold(Frontend):
    """Keep the fd, never read it: an fd store."""


class Service(Frontend):
    """A `run` instance's service owns the fd: fdmig passes it on and never
    touches it (a server's listener is the service's to accept on)."""

    name = "service"
    watched = False

    def may_accept(self) -> bool:
        return False


class Sink(Frontend):
    name = "sink"
    reads = True


class Echo(Frontend):
    """Write back what is read; at the peer's EOF, the echoes still owed go out
    first, then the connection closes."""

    name = "echo"
    reads = True

    def target(self):
        return self.chardev

    def received(self, data: bytes) -> None:
        self.chardev.write(data)


class Bridge(Frontend):
    """One side of a proxy: each side of a bridge holds one of these, and the two
    connections they relay between are one session (DESIGN "Bridges are proxies").

    A client side whose partner is a server connects afresh for each peer of the
    partner (`on_demand`) and is closed when that peer's session ends. A half-close
    crosses over once every byte before it is written; the session ends when both
    directions are done, or at once when one side is lost, the other side then
    closed after what can still be delivered to it."""

    name = "bridge"
    reads = True

    def __init__(self, chardev, partner):
        super().__init__(chardev)
        self.partner = partner

    @property
    def on_demand(self) -> bool:
        return self.chardev.spec.role == "client" and self.partner.spec.server

    def target(self):
        return self.partner

    def may_accept(self) -> bool:
        # A new peer is a new session: not while the last one's partner still drains.
        return not self.partner.closing

    def received(self, data: bytes) -> None:
        self.partner.write(data)

    def splice_target(self):
        # Spliced only while nothing waits in user space for the partner (bytes a
        # migration carried), so order holds; and only bytes we need not see (no logfile).
        partner = self.partner
        if partner.conn is None or partner.outbuf or self.chardev.logging or not (partner.stream and
                                                                                   self.chardev.stream):
            return None
        return partner if partner.has_pipe() else None

    def connected(self) -> None:
        partner = self.partner
        if partner.frontend.on_demand and partner.conn is None and not partner.connecting:
            partner.connect_for_session()

    @property
    def waits_close(self) -> bool:
        # A pty's program, a line, a FIFO neither take an EOF nor send one: after
        # its peer's half-close, the session goes on delivering to the peer until
        # the peer closes.
        return not self.partner.stream

    def eof(self) -> None:
        if self.waits_close:
            return
        self.partner.pass_eof()
        self._end_if_done()

    def eof_sent(self) -> None:
        self._end_if_done()

    def _end_if_done(self) -> None:
        mine, partner = self.chardev, self.partner
        if mine.eof_read and mine.eof_sent and partner.eof_read and partner.eof_sent:
            mine.finish("session ended (both directions closed)")
            partner.finish("session ended (both directions closed)")

    def ended(self, reason: str, undelivered: int, lost: bool) -> None:
        partner = self.partner
        if partner.closing:
            return  # the session's end is under way already
        if not partner.stream:
            # A pty's program, a line, a FIFO: no session of theirs ends with a peer's.
            log.info("bridge %s-%s: %s's peer left (%s); %s stays open for the next one", self.chardev.label,
                     partner.label, self.chardev.label, reason, partner.label)
            partner.end_session()
            return
        had_session = partner.conn is not None
        dropped = undelivered + (0 if had_session else partner.pending)
        if lost and (had_session or dropped):
            # Said before the other side closes: whoever sees that close can read why.
            log.warning("bridge %s-%s: %s lost (%s); %s closed after what could still be delivered; "
                        "%d byte(s) could not be delivered", self.chardev.label, partner.label,
                        self.chardev.label, reason, partner.label, dropped)
        partner.end_session()


def make(chardev, partner=None) -> Frontend:
    if partner is not None:
        return Bridge(chardev, partner)
    return {"hold": Hold, "echo": Echo, "sink": Sink, "service": Service}[chardev.spec.frontend](chardev)
