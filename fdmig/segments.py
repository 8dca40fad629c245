"""TCP segments as IP packets, for the ones a peer sends while its connection's
address moves between hosts (fdmig.tcpforward): which connection a packet is for,
whether it brings anything past what the source had dumped, and the same
segment again with a checksum that holds, cut to a size the route takes. Sans-IO:
pure functions over bytes; a packet they cannot read is None, never an error.

Only IPv4 and IPv6 with TCP right after the fixed header (no IPv6 extension
headers, no IPv4 fragments) are read: anything else is left to the peer's
retransmission, as before."""

import ipaddress
import struct
from dataclasses import dataclass

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
TCP_PROTO = 6
FIN, RST, PSH = 0x01, 0x04, 0x08
_SEQ_SPACE = 1 << 32


@dataclass(frozen=True)
class Segment:
    family: int  # 4 or 6
    src: tuple[str, int]  # the peer
    dst: tuple[str, int]  # the moved connection's local end
    seq: int
    flags: int
    header: bytes  # the IP header, as it came
    tcp_header: bytes  # with its options
    payload: bytes

    @property
    def end(self) -> int:
        """The sequence number after this segment (a FIN takes one)."""
        return (self.seq + len(self.payload) + bool(self.flags & FIN)) % _SEQ_SPACE


def parse(packet: bytes) -> Segment | None:
    """The TCP segment in the IP packet `packet` (from its IP header on), or None."""
    if len(packet) < 1:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < _IP4.size:
            return None
        vihl, _, total, _, frag, _, proto, _, src, dst = _IP4.unpack_from(packet)
        ihl = (vihl & 0xF) * 4
        if proto != TCP_PROTO or frag & 0x3FFF or ihl < _IP4.size or not ihl <= total <= len(packet):
            return None
        header, rest = packet[:ihl], packet[ihl:total]
    elif version == 6:
        if len(packet) < _IP6.size:
            return None
        _, length, proto, _, src, dst = _IP6.unpack_from(packet)
        if proto != TCP_PROTO or _IP6.size + length > len(packet):
            return None
        header, rest = packet[:_IP6.size], packet[_IP6.size:_IP6.size + length]
    else:
        return None
    if len(rest) < _TCP.size:
        return None
    sport, dport, seq, _, offset, flags, _, _, _ = _TCP.unpack_from(rest)
    offset = (offset >> 4) * 4
    if not _TCP.size <= offset <= len(rest):
        return None
    return Segment(version, (_address(src), sport), (_address(dst), dport), seq, flags,
                   bytes(header), bytes(rest[:offset]), bytes(rest[offset:]))


def _address(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def news(segment: Segment, recv_seq: int) -> bool:
    """Whether `segment` brings a connection whose receive queue ended at
    `recv_seq` anything it has not had: bytes or a FIN past it, or a reset at or
    past it. A bare ACK does not count (the peer answers the target's window
    probe with one anyway)."""
    if segment.flags & RST:
        return _after(segment.seq, recv_seq) or segment.seq == recv_seq
    if not segment.payload and not segment.flags & FIN:
        return False
    return _after(segment.end, recv_seq)


def _after(a: int, b: int) -> bool:
    """a comes after b in sequence space."""
    return 0 < (a - b) % _SEQ_SPACE < _SEQ_SPACE // 2


def packets(segment: Segment, mss: int, mtu: int) -> list[bytes]:
    """`segment` as IP packets again of at most `mtu` bytes each, its payload
    cut into pieces of at most `mss` bytes (a packet captured after the
    receiving NIC merged segments may be bigger than the route takes; and the
    MSS the peer was told counts no TCP option), each with its checksum
    computed afresh (a captured one may hold only the pseudo-header's sum the
    sender's NIC was to finish)."""
    mss = max(1, min(mss, mtu - len(segment.header) - len(segment.tcp_header)))
    pieces = [segment.payload[i:i + mss] for i in range(0, len(segment.payload), mss)] or [b""]
    out, seq = [], segment.seq
    for i, piece in enumerate(pieces):
        flags = segment.flags if i == len(pieces) - 1 else segment.flags & ~(FIN | PSH)  # the last piece's
        out.append(_packet(segment, seq, flags, piece))
        seq = (seq + len(piece)) % _SEQ_SPACE
    return out


def _packet(segment: Segment, seq: int, flags: int, payload: bytes) -> bytes:
    tcp = bytearray(segment.tcp_header)
    struct.pack_into("!I", tcp, 4, seq)
    tcp[13] = flags
    struct.pack_into("!H", tcp, 16, 0)
    length = len(tcp) + len(payload)
    header = bytearray(segment.header)
    if segment.family == 4:
        struct.pack_into("!H", header, 2, len(header) + length)
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, _checksum(bytes(header)))
        pseudo = bytes(header[12:20]) + struct.pack("!BBH", 0, TCP_PROTO, length)
    else:
        struct.pack_into("!H", header, 4, length)
        pseudo = bytes(header[8:40]) + struct.pack("!IxxxB", length, TCP_PROTO)
    struct.pack_into("!H", tcp, 16, _checksum(pseudo + bytes(tcp) + payload))
    return bytes(header) + bytes(tcp) + payload


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
