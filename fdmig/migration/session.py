"""One side of one migration is a session: an object with one method per step,
fed the peer's events by `drive`, the codec's shape one level up. A session says
what it expects next (`expected`); a step returns None to go on, or the outcome."""

from fdmig.migration import wire


class Session:
    chan = None  # channel.Channel
    deadline: float | None = None
    # The events awaited inside the downtime: polled for (channel.SPIN), not slept on.
    in_downtime: tuple = ()
    # (event type, the step that takes it, what the peer is to do, for a message)
    expected: tuple

    async def begin(self) -> None:
        """The first step, before any event from the peer."""

    async def progress(self) -> None:
        """Awaited while a long event (a precopy, a transfer) is still arriving."""

    def refused(self, reason: str) -> Exception:
        """The exception for the peer's ABORT."""
        raise NotImplementedError

    def closed_early(self, what: str) -> Exception:
        """The exception for any event but the expected one (the channel closed)."""
        raise NotImplementedError


async def drive(session: Session):
    """Run `session` from its first step to the outcome one of its steps returns."""
    await session.begin()
    while True:
        kind, step, what = session.expected
        event = await session.chan.next_event(session.deadline, progress=session.progress,
                                             spin=kind in session.in_downtime)
        if isinstance(event, kind):
            outcome = await step(event)
            if outcome is not None:
                return outcome
        elif isinstance(event, wire.Abort):
            raise session.refused(event.reason)
        else:
            raise session.closed_early(what)
