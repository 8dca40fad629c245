"""Every chardev fd in one epoll of its own, which the asyncio loop watches as a
single fd. Two reasons: registering an fd here is one epoll_ctl, not asyncio's
Python bookkeeping (thousands of chardevs move in one migration), and a migration
pauses every chardev at once by unwatching one fd (for reading: see __init__),
then resumes them the same way."""

import asyncio
import collections
import itertools
import operator
import select
import time

from fdmig import marks

# Per loop iteration, so the control socket is never starved; the first after a
# migration's resume serves every ranked fd that is ready (see resume()).
MAX_EVENTS = 512
MARKED_TURN = 0.0005  # a dispatch this long goes on the timeline (fdmig.marks)

IN = select.EPOLLIN
OUT = select.EPOLLOUT
HANGUP = select.EPOLLRDHUP
_READ_LIKE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_WRITE_LIKE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_HANGUP_LIKE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_MASK = operator.itemgetter(0)  # of a handler


class Poller:
    def __init__(self, loop):
        self._loop = loop
        self._epoll = select.epoll()
        self._handlers: dict[int, tuple] = {}  # fd -> (mask, on_read, on_write)
        # While paused, fds new to the epoll go in with no events, and wait here to
        # be given theirs at resume(), in the order it is given: epoll then reports
        # ready fds in that order (a ready fd joins its ready list as its events are
        # set). Setting events (EPOLL_CTL_MOD) costs half of adding (EPOLL_CTL_ADD).
        self._deferred: dict[int, None] = {}
        self.paused = False
        # Never called: an epoll fd is never writable. It keeps our epoll in the
        # loop's while paused, so that pause and resume change its events
        # (EPOLL_CTL_MOD) instead of removing and adding it: adding an epoll to
        # another makes the kernel walk every fd in it (its loop check), a few
        # hundred us at a thousand chardevs, inside the downtime.
        loop.add_writer(self._epoll.fileno(), _never)
        loop.add_reader(self._epoll.fileno(), self._dispatch)
        self._turn: list | None = None  # [future, events still owed] (after_turn)
        self._rank: dict | None = None  # fd -> its place in the first dispatch after a resume

    def watch(self, fd: int, on_read=None, on_write=None, on_hangup=None, defer: bool = True,
              half_close: bool = True) -> None:
        """Watch fd for reading, writing and/or the peer hanging up (an fd that is
        held, never read, still learns that its peer left); all None stops. A
        hangup is the peer's half-close too, unless `half_close` is off: then only
        its whole close (POLLHUP), after an EOF already read. While paused, an fd
        new to the epoll gets its events at resume(), in the order it is given,
        unless `defer` is off: then at once (a syscall each, which inside a
        downtime only an fd whose order matters is worth)."""
        mask = (IN if on_read else 0) | (OUT if on_write else 0) | (HANGUP if on_hangup and half_close else 0)
        old = self._handlers.get(fd)
        if not mask and on_hangup is None:
            if old is not None:
                del self._handlers[fd]
                self._deferred.pop(fd, None)
                self._epoll.unregister(fd)  # now, before its fd may close
            return
        self._handlers[fd] = (mask, on_read, on_write, on_hangup)
        if old is None:
            if self.paused and defer:
                self._epoll.register(fd, 0)
                self._deferred[fd] = None
            else:
                self._epoll.register(fd, mask)
        elif old[0] != mask and fd not in self._deferred:
            self._epoll.modify(fd, mask)

    def watch_errors(self, fd: int, on_error) -> None:
        """Watch fd only for POLLHUP and POLLERR, which epoll reports whatever the
        mask (a stored fd, never read). OSError (EPERM) for a regular file."""
        self._epoll.register(fd, 0)
        self._handlers[fd] = (0, None, None, on_error)

    def pause(self) -> None:
        if not self.paused:
            self._loop.remove_reader(self._epoll.fileno())
            self.paused = True

    def resume(self, first=()) -> None:
        """Watch again; fds registered while paused get their events now, those in
        `first` before the rest and in its order (a migration's target: the order
        in which the source would have served them next). The first dispatch
        serves the fds of `first` that are ready in its order too, whenever they
        got their events: a target registers its streaming peers' fds with their
        events before the downtime, which leaves only this order inside it."""
        if self.paused:
            deferred, self._deferred = self._deferred, {}
            # Thousands inside a downtime: the loops run in C, bar the syscalls.
            order = dict.fromkeys(itertools.chain(filter(deferred.__contains__, first), deferred))
            handlers = self._handlers
            collections.deque(map(self._epoll.modify, order, map(_MASK, map(handlers.__getitem__, order))),
                              maxlen=0)
            # Watched at once and not in `first`: -1, before the ranked ones, in epoll's order.
            self._rank = dict(zip(dict.fromkeys(itertools.chain(first, order)), itertools.count())) if first \
                else None
            self._loop.add_reader(self._epoll.fileno(), self._dispatch)
            self.paused = False

    def after_turn(self, owed: int) -> asyncio.Future:
        """A future done once `owed` more events are served, or once a dispatch
        leaves nothing more ready (it served fewer than MAX_EVENTS): one full turn
        of the fds ready now. A migration's target gives its first turn after the
        resume the CPU before its own bookkeeping (and the source's teardown)."""
        future = self._loop.create_future()
        if owed <= 0:
            future.set_result(None)
        else:
            self._turn = [future, owed]
        return future

    def serve_now(self) -> None:
        """One dispatch now, not at the loop's next turn: a migration's target
        serves the fds ready at its resume in the same turn (the loop's select and
        callback cost a tenth of a millisecond, a third of a downtime of one)."""
        if not self.paused:
            self._dispatch()

    def _dispatch(self) -> None:
        if marks.on():
            began = time.monotonic()
            self._serve()
            if time.monotonic() - began > MARKED_TURN:
                marks.span("serve", began)
        else:
            self._serve()

    def _serve(self) -> None:
        if self._rank is None:
            ready = self._epoll.poll(0, MAX_EVENTS)
        else:
            # The first turn after a resume, whole and in the order resume() ranked:
            # what is left in epoll's ready list comes in the order fds became
            # ready, during the precopy, which is no order at all.
            rank, self._rank = self._rank, None
            ready = self._epoll.poll(0, len(rank) + MAX_EVENTS)
            ready.sort(key=lambda event: rank.get(event[0], -1))
        if self._turn is not None:
            self._turn[1] -= len(ready)
            if self._turn[1] <= 0 or len(ready) < MAX_EVENTS:
                future, self._turn = self._turn[0], None
                if not future.done():  # a waiter that timed out has cancelled it
                    future.set_result(None)  # its waiter runs after this dispatch
        for fd, events in ready:
            handler = self._handlers.get(fd)
            if handler is None:
                continue
            mask, on_read, on_write, on_hangup = handler
            if on_hangup is not None and events & _HANGUP_LIKE:
                on_hangup()
                continue
            if on_read is not None and events & _READ_LIKE:
                on_read()
                handler = self._handlers.get(fd)  # the callback may have changed it
                if handler is None:
                    continue
                on_write = handler[2]
            if on_write is not None and events & _WRITE_LIKE:
                on_write()

    def close(self) -> None:
        if not self.paused:
            self._loop.remove_reader(self._epoll.fileno())
        self._loop.remove_writer(self._epoll.fileno())
        self._epoll.close()
        self._handlers.clear()


def _never() -> None:
    raise AssertionError("an epoll fd reported writable")
