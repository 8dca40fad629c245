"""What an instance does with the bytes a chardev receives (QEMU's frontends).

A frontend answers two questions for its chardev, as QEMU's chr_can_read and
chr_read do: may the chardev read now (backpressure), and where do bytes go.
Bytes only ever wait in one place: the out-buffer of the chardev they are for, so a
migration carries exactly those buffers and nothing else.
"""

# Stop reading a chardev while the buffer it feeds holds this much; resume once the
# buffer drains below the low mark. A read adds at most READ_SIZE, so a buffer
# never exceeds HIGH_WATER + READ_SIZE, well under a migration frame.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
READ_SIZE = 64 * 1024


class Frontend:
    name = "hold"
    reads = False

    def __init__(self, chardev):
        self.chardev = chardev

    def target(self):
        """The chardev whose out-buffer this frontend fills, if any."""
        return None

    def can_receive(self) -> bool:
        target = self.target()
        return target is None or len(target.outbuf) < HIGH_WATER

    def received(self, data: bytes) -> None:
        pass


class Hold(Frontend):
    """Keep the fd, never read it: an fd store."""


class Sink(Frontend):
    name = "sink"
    reads = True


class Echo(Frontend):
    name = "echo"
    reads = True

    def target(self):
        return self.chardev

    def received(self, data: bytes) -> None:
        self.chardev.write(data)


class Bridge(Frontend):
    """Relay to the partner chardev; each side of a bridge holds one of these."""

    name = "bridge"
    reads = True

    def __init__(self, chardev, partner):
        super().__init__(chardev)
        self.partner = partner

    def target(self):
        return self.partner

    def received(self, data: bytes) -> None:
        self.partner.write(data)


def make(chardev, partner=None) -> Frontend:
    if partner is not None:
        return Bridge(chardev, partner)
    return {"hold": Hold, "echo": Echo, "sink": Sink}[chardev.spec.frontend](chardev)
