"""The segments peers send while their connections' address is on neither host
(capability x-tcp-repair): from --release-cmd until the target's --claim-cmd,
what a peer sends reaches a host that no longer answers the address and is
dropped there. A peer that had bytes on the wire then waits out its
retransmission timer (200 ms at least, doubling), or, if its Nagle is holding
what it writes next behind them, sends nothing at all until then.

The source watches its interfaces for them from before the release (a packet
socket, filtered in the kernel to TCP for the moved addresses), and once the
target has the address sends each segment that brings a moved connection
something its dump did not have to the address again, from the peer's address
(a raw IP socket): the target's kernel takes it as the peer's, acknowledges it,
and the peer goes on at once. It does so again once the target has taken over,
for what reached the old host meanwhile.

The one module that opens packet or raw sockets; needs CAP_NET_RAW, and without
it the peers retransmit on their own, as before."""

import ctypes
import errno
import functools
import ipaddress
import logging
import socket
import struct

from fdmig import nbio, segments

log = logging.getLogger("fdmig")
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33
SOL_PACKET, PACKET_STATISTICS = 263, 6
PACKET_HOST = 0
IP_MTU, IPV6_MTU = 14, 24
MIN_MTU = {socket.AF_INET: 576, socket.AF_INET6: 1280}  # what every route takes, when the kernel will not say
ARPHRD_LOOPBACK = 772
BUFFER = 8 << 20  # what the kernel holds for us between two reads
MAX_PACKET = 65535


class Forwarder:
    """Opened before the release with the moved connections' local addresses;
    told each connection's receive seq as it is dumped (track()); forward()
    sends on what has been caught, and is called again as more arrives."""

    def __init__(self, addresses):
        self.captures: list[socket.socket] = []
        self.raw: dict[int, socket.socket] = {}
        self.tracked: dict[tuple, tuple[int, int]] = {}  # (peer, local) -> (recv seq, mss)
        self.held: list[bytes] = []
        self.forwarded = self.failed = 0
        by_version: dict[int, list[bytes]] = {}
        for address in map(_plain, addresses):
            by_version.setdefault(address.version, []).append(address.packed)
        try:
            for version, packed in sorted(by_version.items()):
                capture = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                        socket.htons(ETH_P_IP if version == 4 else ETH_P_IPV6))
                self.captures.append(capture)
                _attach(capture, _program(version, packed))
                _buffer(capture)
                # IPPROTO_RAW: the packet comes with its IP header, in either family.
                self.raw[version] = socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6,
                                                  socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                                  socket.IPPROTO_RAW)
        except OSError:
            self.close()
            raise

    def track(self, local, peer, recv_seq: int, mss: int) -> None:
        self.tracked[((_written(peer[0]), peer[1]), (_written(local[0]), local[1]))] = (recv_seq, mss)

    def filenos(self) -> list[int]:
        return [capture.fileno() for capture in self.captures]

    def catch(self) -> None:
        """Take what the kernel holds for us (before it has to drop any)."""
        for capture in self.captures:
            while True:
                try:
                    packet, address = capture.recvfrom(MAX_PACKET)
                except BlockingIOError:
                    break
                # Only what came to this host: not what we send ourselves, nor what
                # loops back on lo, nor another host's frames a promiscuous NIC shows.
                if address[2] == PACKET_HOST and address[3] != ARPHRD_LOOPBACK:
                    self.held.append(packet)

    def forward(self, here: bool = False) -> int:
        """Send on, in the order caught, every caught segment that brings a moved
        connection something it has not had, if its address is on another host
        (`here` False: the target's, after the commit) or on this one (`here`
        True: taken back, after a rollback); a host that answers the address
        without the connection would reset it, and this one, before the
        rollback, would answer for the target. How many were sent."""
        self.catch()
        held, self.held = self.held, []
        sent, routes = 0, {}  # address -> its MTU, or None where it may not go
        for at, packet in enumerate(held):
            segment = segments.parse(packet)
            tracked = segment and self.tracked.get((segment.src, segment.dst))
            if not (tracked and segments.news(segment, tracked[0])):
                continue
            address = segment.dst[0]
            if address not in routes:
                family = socket.AF_INET if segment.family == 4 else socket.AF_INET6
                routes[address] = _route_mtu(family, address) if nbio.holds(family, address) == here else None
            if routes[address] is None:
                continue
            try:
                for piece in segments.packets(segment, tracked[1], routes[address]):
                    self.raw[segment.family].sendto(piece, (address, 0))
            except OSError as exc:
                if not self.failed:  # the first says why; LateSegments.close() how many
                    log.warning("cannot forward a segment from %s:%d to %s:%d: %s", *segment.src, *segment.dst,
                                exc.strerror or exc)
                self.failed += 1
                if isinstance(exc, BlockingIOError) or exc.errno == errno.ENOBUFS:
                    self.failed += len(held) - at - 1  # no waiting in the loop: the rest too
                    break
                continue
            sent += 1
        self.forwarded += sent
        return sent

    def dropped(self) -> int:
        """Packets the kernel dropped because we did not read them in time."""
        total = 0
        for capture in self.captures:
            total += struct.unpack("=II", capture.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]
        return total

    def close(self) -> None:
        for sock in [*self.captures, *self.raw.values()]:
            sock.close()
        self.captures.clear()
        self.raw.clear()


def _route_mtu(family: int, address: str) -> int:
    """The MTU of the route to `address` (the kernel's, as a connected UDP socket sees it)."""
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect((address, 9))  # no datagram is sent
            if family == socket.AF_INET:
                return probe.getsockopt(socket.IPPROTO_IP, IP_MTU)
            return probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
        except OSError:
            return MIN_MTU[family]


@functools.lru_cache(maxsize=4096)
def _written(address: str) -> str:
    """_plain(), written as segments.parse() writes a packet's address. Cached:
    a downtime tracks thousands of connections with a few addresses among them."""
    return str(_plain(address))


def _plain(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address as it is on the wire: a dual-stack socket's IPv4 peer is
    ::ffff:a.b.c.d to it, and a.b.c.d in the packets."""
    address = ipaddress.ip_address(address)
    return getattr(address, "ipv4_mapped", None) or address


def _program(version: int, addresses: list[bytes]) -> list[tuple[int, int, int, int]]:
    """Classic BPF over the network header: TCP to one of `addresses` (each
    compared a word at a time; a miss goes on to the next address). A program
    whose jumps would not fit a byte takes all TCP: the rest is sorted here."""
    ld_b, ld_w, jeq, ret = 0x30, 0x20, 0x15, 0x06
    proto_at, dst_at = (9, 16) if version == 4 else (6, 24)
    words = [struct.unpack(f"!{len(a) // 4}I", a) for a in addresses]
    body = 2 * sum(len(w) for w in words)
    if body > 250:
        words, body = [], 0
    drop, accept = 2 + body, 3 + body
    program = [(ld_b, 0, 0, proto_at), (jeq, 0 if words else accept - 2, drop - 2, segments.TCP_PROTO)]
    for address in words:
        miss = len(program) + 2 * len(address)  # the next address's first load, or the drop
        for i, word in enumerate(address):
            program.append((ld_w, 0, 0, dst_at + 4 * i))
            here = len(program)
            hit = accept if i == len(address) - 1 else here + 1
            program.append((jeq, hit - here - 1, miss - here - 1, word))
    return program + [(ret, 0, 0, 0), (ret, 0, 0, MAX_PACKET)]


def _attach(sock: socket.socket, program) -> None:
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code)
    prog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def _buffer(sock: socket.socket) -> None:
    """BUFFER for the kernel to hold, beyond rmem_max if we may (CAP_NET_ADMIN)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
