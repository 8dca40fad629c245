"""Drives the migration codec over a non-blocking unix socket on the asyncio loop:
moves bytes, and fds through fdmig.fdpass, nothing else. Every fd received is kept
in `received` until the caller takes it, so an abort can close them all."""

import asyncio
import socket
import time

from fdmig import faults, fdpass
from fdmig.migration import wire

READ_SIZE = 1 << 20


class ChannelTimeout(Exception):
    pass


class Channel:
    def __init__(self, sock: socket.socket, role: wire.Role):
        sock.setblocking(False)
        self.sock = sock
        self.codec = wire.MigrationCodec(role)
        self.received: list[int | None] = []  # fds in order of arrival; None once taken
        self._loop = asyncio.get_running_loop()

    async def send(self, event, deadline: float | None = None) -> None:
        for chunk in self.codec.send(event):
            await self._send_chunk(chunk, deadline)
            if chunk.fds:
                faults.point(f"{self.codec.role.value}-after-batch")

    def send_now(self, event) -> None:
        """Send a small event without waiting (it fits the socket buffer); a peer
        that has gone is no error here."""
        try:
            for chunk in self.codec.send(event):
                self.sock.send(chunk.data)
        except (OSError, wire.ProtocolError):
            pass

    async def _send_chunk(self, chunk: wire.Chunk, deadline: float | None) -> None:
        data = memoryview(chunk.data)
        fds = chunk.fds
        while data:
            try:
                sent = fdpass.send_with_fds(self.sock, data, fds) if fds else self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_writer, self._loop.remove_writer, deadline)
                continue
            fds = ()  # the fds rode on the first byte
            data = data[sent:]

    async def next_event(self, deadline: float | None = None, progress=None):
        """The next event; `progress()` runs whenever the codec has taken all the
        data there is and more is awaited (to work on sections as they arrive)."""
        while True:
            event = self.codec.next_event()
            if event is not wire.NEED_DATA:
                return event
            if progress is not None:
                progress()
            try:
                data, fds = fdpass.recv_with_fds(self.sock, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_reader, self._loop.remove_reader, deadline)
                continue
            except ConnectionResetError:
                data, fds = b"", []
            self.received.extend(fds)
            self.codec.receive_data(data, len(fds))

    async def _ready(self, add, remove, deadline: float | None) -> None:
        future = self._loop.create_future()
        fd = self.sock.fileno()
        add(fd, lambda: future.done() or future.set_result(None))
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise ChannelTimeout() from None
        finally:
            remove(fd)

    def take(self, index: int) -> int:
        fd = self.received[index]
        self.received[index] = None
        return fd

    def close(self) -> None:
        """Close the channel and every received fd nobody took."""
        fdpass.close_fds(fd for fd in self.received if fd is not None)
        self.received.clear()
        self.sock.close()


async def connect(path: str, deadline: float | None, abandoned: asyncio.Event | None = None,
                  on_wait=None) -> socket.socket:
    """Connect to a target's channel, waiting for it to listen until `deadline`;
    `on_wait()` once when it does not listen yet. Set `abandoned` ends the wait
    (ConnectionAbortedError): whoever asked for it has gone."""
    loop = asyncio.get_running_loop()
    abandoned = abandoned or asyncio.Event()
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            await loop.sock_connect(sock, path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if deadline is None:
                raise ConnectionRefusedError(f"no target listens on unix:{path} ({exc.strerror})") from None
            if time.monotonic() >= deadline:
                raise ChannelTimeout(f"no target listens on unix:{path}") from None
            if on_wait is not None:
                on_wait()
                on_wait = None
        except OSError:
            sock.close()
            raise
        try:  # polling a path: the kernel has no event for "now bound"
            await asyncio.wait_for(abandoned.wait(), 0.02)
        except asyncio.TimeoutError:
            continue
        raise ConnectionAbortedError(f"no target listened on unix:{path}, and the client that asked "
                                     "for the migration has gone")
