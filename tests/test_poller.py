"""The chardevs' epoll (fdmig.poller): while paused (a migration's downtime), fds
new to it are added only at resume, in the order the migration asks, and epoll
then serves ready fds in that order: the peer that has waited longest first."""

import asyncio
import socket

from fdmig.poller import Poller


def _close(poller, pairs) -> None:
    poller.close()
    for pair in pairs:
        for sock in pair:
            sock.close()


def test_fds_registered_while_paused_are_served_at_resume_in_the_order_given():
    async def main():
        poller = Poller(asyncio.get_running_loop())
        pairs = [socket.socketpair() for _ in range(6)]
        for mine, theirs in pairs:
            mine.setblocking(False)
            theirs.send(b"x")  # every one readable before the resume
        served = []
        poller.pause()
        for mine, _ in pairs:  # registered in table order, as a target's precopy does
            poller.watch(mine.fileno(), on_read=lambda sock=mine: served.append(sock.recv(1) and sock.fileno()))
        first = [mine.fileno() for mine, _ in reversed(pairs[2:])]  # the source's order: these, last first
        poller.resume(first)
        while len(served) < len(pairs):
            await asyncio.sleep(0)
        rest = [mine.fileno() for mine, _ in pairs[:2]]
        _close(poller, pairs)
        return served, first, rest

    served, first, rest = asyncio.run(main())
    assert served == first + rest


def test_fds_watched_at_once_while_paused_are_served_first_in_the_order_given():
    # A target registers its streaming peers' fds with their events during the
    # precopy (nothing is read while paused) and gives their order at the resume:
    # it, not the order in which they became ready, is the order they are served in.
    async def main():
        poller = Poller(asyncio.get_running_loop())
        pairs = [socket.socketpair() for _ in range(5)]
        served = []
        poller.pause()
        for mine, theirs in pairs:
            mine.setblocking(False)
            poller.watch(mine.fileno(), on_read=lambda sock=mine: served.append(sock.recv(1) and sock.fileno()),
                         defer=False)
        for mine, theirs in pairs:
            theirs.send(b"x")  # ready in table order
        for _ in range(20):
            await asyncio.sleep(0)
        before = list(served)
        first = [pairs[i][0].fileno() for i in (3, 1, 4, 0, 2)]
        poller.resume(first)
        while len(served) < len(pairs):
            await asyncio.sleep(0)
        _close(poller, pairs)
        return before, served, first

    before, served, first = asyncio.run(main())
    assert before == [] and served == first


def test_an_fd_unwatched_while_paused_is_never_added_and_one_watched_before_stays():
    async def main():
        poller = Poller(asyncio.get_running_loop())
        old, new = socket.socketpair(), socket.socketpair()
        seen = []
        poller.watch(old[0].fileno(), on_read=lambda: seen.append("old") or old[0].recv(1))
        poller.pause()
        poller.watch(new[0].fileno(), on_read=lambda: seen.append("new"))
        poller.watch(new[0].fileno())  # gone again before the resume: it must not be added
        new[0].close()  # and its fd may close meanwhile
        old[1].send(b"x")
        poller.resume()
        while not seen:
            await asyncio.sleep(0)
        poller.close()
        for sock in (*old, new[1]):
            sock.close()
        return seen

    assert asyncio.run(main()) == ["old"]


def test_an_fd_watched_while_paused_without_defer_is_in_the_epoll_before_the_deferred_ones():
    # A target adds an idle peer's fd at once and a streaming one's at the resume,
    # in the source's order: the idle one, already there, is reported first.
    async def main():
        poller = Poller(asyncio.get_running_loop())
        pairs = [socket.socketpair() for _ in range(3)]
        served = []
        poller.pause()
        for index, (mine, theirs) in enumerate(pairs):
            mine.setblocking(False)
            theirs.send(b"x")
            poller.watch(mine.fileno(), on_read=lambda sock=mine: served.append(sock.recv(1) and sock.fileno()),
                         defer=index != 2)
        poller.resume([pairs[1][0].fileno(), pairs[0][0].fileno()])
        while len(served) < len(pairs):
            await asyncio.sleep(0)
        poller.close()
        order = [mine.fileno() for mine, _ in (pairs[2], pairs[1], pairs[0])]
        for pair in pairs:
            for sock in pair:
                sock.close()
        return served, order

    served, order = asyncio.run(main())
    assert served == order


def test_after_turn_is_done_once_the_fds_ready_now_have_been_served_and_not_before():
    """A migration's target waits for one full turn of serving before its own
    bookkeeping: done after `owed` events, or once a dispatch leaves nothing ready;
    at once when nothing is owed."""
    from fdmig import poller as pollers

    async def main():
        poller = Poller(asyncio.get_running_loop())
        n = pollers.MAX_EVENTS + 10  # two dispatches
        pairs = [socket.socketpair() for _ in range(n)]
        served = []
        for mine, theirs in pairs:
            mine.setblocking(False)
            theirs.send(b"x")
            poller.watch(mine.fileno(), on_read=lambda sock=mine: served.append(sock.recv(1)))
        assert poller.after_turn(0).done()
        whole = poller.after_turn(n)
        await whole
        at_whole = len(served)
        for _, theirs in pairs[:3]:
            theirs.send(b"y")
        short = poller.after_turn(n)  # owed more than is ready: the first short dispatch ends the turn
        await short
        at_short = len(served)
        _close(poller, pairs)
        return n, at_whole, at_short

    n, at_whole, at_short = asyncio.run(main())
    assert at_whole == n  # not done after the first dispatch's MAX_EVENTS
    assert at_short == n + 3


def test_serve_now_serves_the_ready_fds_at_once_and_counts_toward_the_turn_and_not_while_paused():
    """A migration's target serves the fds ready at its resume in that same turn
    of the loop, not the next: serve_now dispatches at once, and that dispatch
    counts toward after_turn."""
    async def main():
        poller = Poller(asyncio.get_running_loop())
        pairs = [socket.socketpair() for _ in range(3)]
        served = []
        poller.pause()
        for mine, theirs in pairs:
            mine.setblocking(False)
            theirs.send(b"x")
            poller.watch(mine.fileno(), on_read=lambda sock=mine: served.append(sock.recv(1)))
        poller.serve_now()
        while_paused = len(served)
        poller.resume()
        turn = poller.after_turn(len(pairs))
        poller.serve_now()  # no await between the resume and here: the loop has not run
        now, done = len(served), turn.done()
        _close(poller, pairs)
        return while_paused, now, done

    while_paused, now, done = asyncio.run(main())
    assert while_paused == 0
    assert now == 3 and done
