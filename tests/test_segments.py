"""The TCP segment codec (fdmig.segments), with no sockets: a segment a peer sent
while its address moved is read back out of its IP packet, judged against the
dumped receive seq, and written again as packets whose checksums hold (checked
here by a sum of our own, not the codec's)."""

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from fdmig import segments

ACK, PSH = 0x10, 0x08


def ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_checksum_holds(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0xF) * 4
        tcp = packet[ihl:]
        pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
        if ones_complement_sum(packet[:ihl]) != 0xFFFF:
            return False
    else:
        tcp = packet[40:]
        pseudo = packet[8:40] + struct.pack("!IxxxB", len(tcp), 6)
    return ones_complement_sum(pseudo + tcp) == 0xFFFF


def packet(version=4, src=("198.18.0.1", 40000), dst=("198.18.0.10", 7000), seq=1000, flags=ACK | PSH,
           payload=b"hello\n", options=b"", checksum=0xBEEF) -> bytes:
    """An IP packet as a capture shows it: the TCP checksum as the sender's NIC
    would have finished it, or not (`checksum`)."""
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, 77, offset << 4, flags, 512, checksum, 0) + options
    if version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000, 64, 6, 0,
                         ipaddress.ip_address(src[0]).packed, ipaddress.ip_address(dst[0]).packed)
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64,
                         ipaddress.ip_address(src[0]).packed, ipaddress.ip_address(dst[0]).packed)
    return ip + tcp + payload


def test_a_captured_segment_reads_back_with_its_connection_and_seq():
    segment = segments.parse(packet(options=b"\x01\x01\x08\x0a" + b"\0" * 8) + b"ethernet padding")
    assert (segment.family, segment.src, segment.dst) == (4, ("198.18.0.1", 40000), ("198.18.0.10", 7000))
    assert (segment.seq, segment.payload, segment.end) == (1000, b"hello\n", 1006)
    assert len(segment.tcp_header) == 32
    six = segments.parse(packet(6, src=("2001:db8::1", 1), dst=("2001:db8::a", 2)))
    assert (six.family, six.src, six.dst, six.payload) == (6, ("2001:db8::1", 1), ("2001:db8::a", 2), b"hello\n")


def test_what_is_not_a_whole_tcp_segment_is_none():
    whole = packet()
    udp = bytearray(whole)
    udp[9] = 17
    fragment = bytearray(whole)
    fragment[6:8] = b"\x20\x00"  # more fragments follow
    for broken in (b"", whole[:19], whole[:30], bytes(udp), bytes(fragment), b"\x70" + whole[1:],
                   packet(6)[:50], whole[:20] + b"\x00" * 12 + b"\x10" + whole[33:]):  # TCP offset 4 bytes
        assert segments.parse(broken) is None


@given(st.binary(max_size=200))
def test_no_bytes_make_the_parser_raise(data):
    for version in (b"\x45", b"\x60"):
        segments.parse(version + data)


def test_news_is_what_the_dump_had_not_had():
    def seg(seq, payload=b"", flags=ACK):
        return segments.parse(packet(seq=seq % (1 << 32), payload=payload, flags=flags))
    recv = 5000
    assert not segments.news(seg(4990, b"x" * 10), recv)  # ends where the dump's queue ended
    assert segments.news(seg(4995, b"x" * 10), recv)  # straddles it
    assert segments.news(seg(5000, b"x"), recv)
    assert not segments.news(seg(5000), recv)  # a bare ACK
    assert segments.news(seg(5000, flags=ACK | segments.FIN), recv)
    assert not segments.news(seg(4999, flags=ACK | segments.FIN), recv)  # that FIN was had
    assert segments.news(seg(5000, flags=segments.RST), recv)
    assert not segments.news(seg(4000, flags=segments.RST), recv)
    # Across the wrap of sequence space.
    assert segments.news(seg(0, b"x"), (1 << 32) - 1)
    assert not segments.news(seg((1 << 32) - 20, b"x" * 10), 5)


@given(version=st.sampled_from([4, 6]), seq=st.integers(0, (1 << 32) - 1), payload=st.binary(max_size=3000),
       fin=st.booleans(), mss=st.integers(1, 1500), mtu=st.integers(200, 9000),
       options=st.sampled_from([b"", b"\x01\x01\x08\x0a" + b"\0" * 8]))
def test_packets_cut_a_segment_into_pieces_that_checksum_and_add_up(version, seq, payload, fin, mss, mtu, options):
    flags = ACK | PSH | (segments.FIN if fin else 0)
    hosts = (("198.18.0.1", 40000), ("198.18.0.10", 7000)) if version == 4 else \
        (("2001:db8::1", 40000), ("2001:db8::a", 7000))
    original = segments.parse(packet(version, *hosts, seq=seq, flags=flags, payload=payload, options=options))
    out = segments.packets(original, mss, mtu)
    pieces = [segments.parse(p) for p in out]
    assert all(tcp_checksum_holds(p) for p in out)
    assert all(len(p) <= mtu for p in out)  # else the raw socket refuses it (EMSGSIZE)
    assert b"".join(p.payload for p in pieces) == payload
    assert all(0 < len(p.payload) <= mss for p in pieces) or (payload == b"" and len(pieces) == 1)
    at = seq
    for piece in pieces:
        assert (piece.src, piece.dst, piece.tcp_header[20:]) == (original.src, original.dst, options)
        assert piece.seq == at
        at = (at + len(piece.payload)) % (1 << 32)
    assert [p.flags & (segments.FIN | PSH) for p in pieces[:-1]] == [0] * (len(pieces) - 1)
    assert pieces[-1].flags == flags and pieces[-1].end == original.end
