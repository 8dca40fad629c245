"""Drives the migration codec over a non-blocking unix socket on the asyncio loop:
moves bytes, and fds through fdmig.fdpass, nothing else. Every fd received is kept
in `received` until the caller takes it, so an abort can close them all."""

import asyncio
import functools
import os
import socket
import ssl
import time

from fdmig import faults, fdpass
from fdmig.migration import wire

READ_SIZE = 1 << 20
LINGER = 0.5  # how long a refused TLS peer is read from, so that it reads our alert
# Inside the downtime each side waits for the other's next message (TRANSFER,
# ACK, RELEASED) by polling the socket, yielding the CPU between two tries, for
# this long at most before it sleeps in the loop: a process woken from sleep
# took 0.2 to 0.3 ms to run again here, three times in every downtime, most of
# a downtime of 100 chardevs. Only where this process may run on two CPUs: on
# one, the peer it waits for needs that CPU.
SPIN = 0.002


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
        # Frames without fds go out together, in one send: each send wakes the
        # peer, and inside a downtime every wake-up is a scheduling delay.
        plain: list[bytes] = []
        for chunk in self.codec.send(event):
            if not chunk.fds:
                plain.append(chunk.data)
                continue
            if plain:
                await self._send_chunk(wire.Chunk(b"".join(plain)), deadline)
                plain = []
            await self._send_chunk(chunk, deadline)
            faults.point(f"{self.codec.role.value}-after-batch")
        if plain:
            await self._send_chunk(wire.Chunk(b"".join(plain)), deadline)

    def send_now(self, event) -> None:
        """Send a small event without waiting (it fits the socket buffer); a peer
        that has gone is no error here."""
        try:
            for chunk in self.codec.send(event):
                self.sock.send(chunk.data)
        except (OSError, wire.ProtocolError):
            pass

    async def _send_chunk(self, chunk: wire.Chunk, deadline: float | None) -> None:
        await self._send_raw(chunk.data, chunk.fds, deadline)

    async def _send_raw(self, data: bytes, fds, deadline: float | None) -> None:
        data = memoryview(data)
        while data:
            try:
                sent = fdpass.send_with_fds(self.sock, data, fds) if fds else self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_writer, self._loop.remove_writer, deadline)
                continue
            fds = ()  # the fds rode on the first byte
            data = data[sent:]

    def _recv(self) -> tuple[bytes, list[int]]:
        """What the socket has now (b"" at EOF), with its fds; BlockingIOError if nothing."""
        try:
            return fdpass.recv_with_fds(self.sock, READ_SIZE)
        except ConnectionResetError:
            return b"", []

    async def next_event(self, deadline: float | None = None, progress=None, spin: bool = False):
        """The next event; `progress()` is awaited whenever the codec has taken all
        the data there is and more is to come (to work on sections as they arrive).
        `spin`: poll for it, for SPIN at most, before sleeping (inside the downtime)."""
        spin_until = time.monotonic() + SPIN if spin and _two_cpus() else 0.0
        while True:
            event = self.codec.next_event()
            if event is not wire.NEED_DATA:
                return event
            if progress is not None:
                await progress()
            try:
                data, fds = self._recv()
            except (BlockingIOError, InterruptedError):
                if spin_until and time.monotonic() < spin_until:
                    os.sched_yield()  # to whatever else would run on this CPU, the peer included
                    continue
                await self._ready(self._loop.add_reader, self._loop.remove_reader, deadline)
                continue
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


class TlsChannel(Channel):
    """A channel over TCP, in TLS (ssl.SSLObject over memory BIOs: the same
    non-blocking loop drives it). No fd crosses it."""

    def __init__(self, sock: socket.socket, role: wire.Role, context: ssl.SSLContext):
        super().__init__(sock, role)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming, self._outgoing, server_side=role is wire.Role.TARGET)

    async def handshake(self, deadline: float | None) -> None:
        """ssl.SSLError if the peer is refused (no certificate from the CA, or no TLS)."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush(deadline)
                await self._fill(deadline)
        await self._flush(deadline)

    async def _fill(self, deadline: float | None) -> None:
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_reader, self._loop.remove_reader, deadline)
                continue
            if not data:
                raise ConnectionResetError("the peer closed the connection during the TLS handshake")
            self._incoming.write(data)
            return

    async def _flush(self, deadline: float | None) -> None:
        pending = self._outgoing.read()
        if pending:
            await self._send_raw(pending, (), deadline)

    async def _send_chunk(self, chunk: wire.Chunk, deadline: float | None) -> None:
        if chunk.fds:
            raise wire.LocalProtocolError("fds cannot cross a TCP channel")
        self.tls.write(chunk.data)
        await self._flush(deadline)

    def send_now(self, event) -> None:
        try:
            for chunk in self.codec.send(event):
                self.tls.write(chunk.data)
            self.sock.send(self._outgoing.read())
        except (OSError, ssl.SSLError, wire.ProtocolError):
            pass

    async def refuse(self) -> None:
        """Close after a failed handshake so that the peer reads why (the alert):
        it may have sent frames already (TLS 1.3 ends its side of the handshake
        first), and closing with them unread would reset the connection instead."""
        try:
            self.sock.send(self._outgoing.read())
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER
            while True:
                try:
                    if not self.sock.recv(READ_SIZE):
                        break  # the peer has read the alert and closed
                except (BlockingIOError, InterruptedError):
                    await self._ready(self._loop.add_reader, self._loop.remove_reader, deadline)
        except (OSError, ChannelTimeout):
            pass
        self.close()

    def close(self) -> None:
        """What TLS still has to say (an alert: why the peer was refused) goes first."""
        try:
            self.sock.send(self._outgoing.read())
        except OSError:
            pass
        super().close()

    def _recv(self) -> tuple[bytes, list[int]]:
        while True:
            try:
                return self.tls.read(READ_SIZE), []
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"", []
            try:
                data = self.sock.recv(READ_SIZE)  # BlockingIOError: nothing yet
            except ConnectionResetError:
                return b"", []
            if not data:
                return b"", []
            self._incoming.write(data)


@functools.cache
def _two_cpus() -> bool:
    return len(os.sched_getaffinity(0)) >= 2


async def connect(address, deadline: float | None, abandoned: asyncio.Event | None = None,
                  on_wait=None) -> socket.socket:
    """Connect to a target's channel (a paths.ChannelAddress), waiting for it to
    listen until `deadline`; `on_wait()` once when it does not listen yet. Set
    `abandoned` ends the wait (ConnectionAbortedError): whoever asked has gone."""
    loop = asyncio.get_running_loop()
    abandoned = abandoned or asyncio.Event()
    if address.tcp:
        infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        family, _, _, _, target = infos[0]
        not_yet = (ConnectionRefusedError,)
    else:
        family, target, not_yet = socket.AF_UNIX, address.path, (FileNotFoundError, ConnectionRefusedError)
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            await loop.sock_connect(sock, target)
            if address.tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except not_yet as exc:
            sock.close()
            if deadline is None:
                raise ConnectionRefusedError(f"no target listens on {address} ({exc.strerror})") from None
            if time.monotonic() >= deadline:
                raise ChannelTimeout(f"no target listens on {address}") from None
            if on_wait is not None:
                on_wait()
                on_wait = None
        except OSError:
            sock.close()
            raise
        try:  # polling: the kernel has no event for "now bound"
            await asyncio.wait_for(abandoned.wait(), 0.02)
        except asyncio.TimeoutError:
            continue
        raise ConnectionAbortedError(f"no target listened on {address}, and the client that asked "
                                     "for the migration has gone")
