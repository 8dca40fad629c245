"""The TCP state codec (fdmig.tcpstate), with no sockets: what a source encodes
the target decodes back, and bytes that are not a state are refused with a
TcpStateError that says which field is wrong."""

import socket
import struct

import pytest

from fdmig.tcpstate import (
    HEADER_SIZE,
    MAGIC,
    MAX_QUEUE,
    SACK,
    TIMESTAMPS,
    VERSION,
    WINDOW,
    WSCALE,
    TcpState,
    TcpStateError,
    decode,
    encode,
    parts,
)

# The layout in fdmig.tcpstate's docstring, written out here so that the tests
# can build headers the encoder would never write.
HEADER = struct.Struct("!4s6B16sH16sH4I5I3I")
FIELDS = ("magic", "version", "family", "flags", "snd_wscale", "rcv_wscale", "reserved",
          "local", "local_port", "peer", "peer_port", "send_seq", "recv_seq", "mss", "timestamp",
          "snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup", "send_len", "unsent", "recv_len")

V4 = TcpState(socket.AF_INET, ("192.0.2.10", 443), ("198.51.100.7", 51234), send_seq=0xFFFFFFF0, recv_seq=17,
              mss=1460, send_queue=b"GET / HTTP/1.1\r\n\r\n", unsent=4, recv_queue=b"HTTP/1.1 200 OK\r\n",
              sack=True, timestamps=True, wscale=(7, 9), timestamp=0x5E0A1B2C,
              window=(0x10000000, 65535, 131072, 64240, 0x20000000))
V6 = TcpState(socket.AF_INET6, ("2001:db8::1", 8443), ("fe80::1:2", 40000), send_seq=1, recv_seq=0xFFFFFFFF,
              mss=1440, send_queue=bytes(range(256)) * 3, recv_queue=b"\0" * 10, wscale=(0, 14))


def header(**fields) -> bytes:
    """A header with `fields` changed from a valid, bare IPv4 state's."""
    values = dict(zip(FIELDS, HEADER.unpack(encode(TcpState(socket.AF_INET, ("10.0.0.1", 1000), ("10.0.0.2", 2000),
                                                               send_seq=5, recv_seq=6, mss=1460)))))
    values.update(fields)
    return HEADER.pack(*(values[name] for name in FIELDS))


def test_the_header_is_the_documented_layout():
    assert HEADER.size == HEADER_SIZE
    assert decode(header()) == TcpState(socket.AF_INET, ("10.0.0.1", 1000), ("10.0.0.2", 2000), 5, 6, 1460)


# ---------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("state", [V4, V6], ids=["ipv4", "ipv6"])
def test_a_state_round_trips_with_queues_window_and_options(state):
    blob = encode(state)
    assert len(blob) == HEADER_SIZE + len(state.send_queue) + len(state.recv_queue)
    assert decode(blob) == state
    assert encode(decode(blob)) == blob


@pytest.mark.parametrize("family, local, peer", [
    (socket.AF_INET, ("127.0.0.1", 1), ("127.0.0.1", 65535)),
    (socket.AF_INET6, ("::1", 1), ("::1", 65535)),
], ids=["ipv4", "ipv6"])
def test_a_bare_state_round_trips_with_no_options(family, local, peer):
    state = TcpState(family, local, peer, send_seq=0, recv_seq=0, mss=65535)
    back = decode(encode(state))
    assert back == state
    assert (back.wscale, back.window, back.sack, back.timestamps) == (None, None, False, False)
    assert back.send_queue == back.recv_queue == b""


def test_options_set_their_flags_on_the_wire():
    flags = HEADER.unpack(encode(V4)[:HEADER_SIZE])[FIELDS.index("flags")]
    assert flags == SACK | TIMESTAMPS | WSCALE | WINDOW
    # A window scale of (0, 0) is still scaling, and a window of zeros still a window.
    state = TcpState(socket.AF_INET, ("10.0.0.1", 1), ("10.0.0.2", 2), 1, 2, 536, wscale=(0, 0), window=(0,) * 5)
    assert decode(encode(state)) == state


# ---------------------------------------------------------------------------
# The send queue: what was sent, what never was


def test_the_send_queue_splits_into_sent_and_unsent():
    state = TcpState(socket.AF_INET, ("10.0.0.1", 1), ("10.0.0.2", 2), 100, 200, 1460,
                     send_queue=b"in flight|never sent", unsent=10)
    back = decode(encode(state))
    assert back.sent == b"in flight|"
    assert back.unsent_bytes == b"never sent"
    assert back.sent + back.unsent_bytes == back.send_queue


@pytest.mark.parametrize("unsent, sent, rest", [(0, b"abcdef", b""), (6, b"", b"abcdef"), (1, b"abcde", b"f")])
def test_the_split_at_its_ends(unsent, sent, rest):
    state = decode(encode(TcpState(socket.AF_INET6, ("::1", 1), ("::2", 2), 0, 0, 1220,
                                   send_queue=b"abcdef", unsent=unsent)))
    assert (state.sent, state.unsent_bytes) == (sent, rest)


def test_an_empty_send_queue_has_nothing_sent_or_unsent():
    state = decode(header())
    assert state.sent == state.unsent_bytes == b""


# ---------------------------------------------------------------------------
# What decode refuses: each message names the field


def _ipv4_with(which: str) -> bytes:
    return header(**{which: bytes([10, 0, 0, 1]) + b"\0" * 11 + b"\x01"})


REJECTED = {
    "bad magic": (header(magic=b"FTCQ"), r"magic b'FTCQ', not b'FTCP'"),
    "wrong version": (header(version=VERSION + 1), rf"version {VERSION + 1}; this fdmig reads version {VERSION}"),
    "version 0": (header(version=0), r"version 0"),
    "unknown family": (header(family=5), r"family 5; accepted: 4, 6"),
    "unknown flags": (header(flags=0x10), r"unknown flags 0x10"),
    "known and unknown flags": (header(flags=SACK | 0x80), r"unknown flags 0x80"),
    "reserved byte set": (header(reserved=1), r"the reserved byte is 1, not 0"),
    "local port 0": (header(local_port=0), r"ports 0 and \d+; accepted: 1 to 65535"),
    "peer port 0": (header(peer_port=0), r"ports \d+ and 0; accepted: 1 to 65535"),
    "mss 0": (header(mss=0), r"mss 0; accepted: 1 to 65535"),
    "mss 65536": (header(mss=65536), r"mss 65536; accepted: 1 to 65535"),
    "snd window scale 15": (header(flags=WSCALE, snd_wscale=15), r"window scale 15/0; accepted: 0 to 14"),
    "rcv window scale 255": (header(flags=WSCALE, rcv_wscale=255), r"window scale 0/255; accepted: 0 to 14"),
    # Headers only: the bound is checked before the length, so no 64 MiB is needed.
    "send queue over the bound": (header(send_len=MAX_QUEUE + 1),
                                  rf"a queue of {MAX_QUEUE + 1} bytes; the bound is {MAX_QUEUE}"),
    "recv queue over the bound": (header(recv_len=0xFFFFFFFF),
                                  rf"a queue of {0xFFFFFFFF} bytes; the bound is {MAX_QUEUE}"),
    "unsent beyond the send queue": (header(send_len=3, unsent=4) + b"abc", r"4 unsent bytes in a send queue of 3"),
    "unsent with no send queue": (header(unsent=1), r"1 unsent bytes in a send queue of 0"),
    "queues shorter than the header says": (header(send_len=3, recv_len=2) + b"abcd",
                                            rf"{HEADER_SIZE + 4} bytes, but the header says {HEADER_SIZE + 5}"),
    "bytes after the queues": (header() + b"x", rf"{HEADER_SIZE + 1} bytes, but the header says {HEADER_SIZE}"),
    "local IPv4 address with trailing bytes": (_ipv4_with("local"), r"local address: an IPv4 address with bytes after"),
    "peer IPv4 address with trailing bytes": (_ipv4_with("peer"), r"peer address: an IPv4 address with bytes after"),
    "empty": (b"", rf"0 bytes, shorter than the {HEADER_SIZE}-byte header"),
    "one byte short of a header": (header()[:-1], rf"{HEADER_SIZE - 1} bytes, shorter than the {HEADER_SIZE}-byte"),
    "the magic alone": (MAGIC, rf"4 bytes, shorter than the {HEADER_SIZE}-byte header"),
    # One encoding per state: a field its flag leaves unset is 0.
    "window scale without its flag": (header(snd_wscale=3), r"window scale bytes set without the window-scale flag"),
    "window without its flag": (header(snd_wnd=1), r"window fields set without the window flag"),
    "timestamp without its flag": (header(timestamp=7), r"a timestamp without the timestamps flag"),
}


@pytest.mark.parametrize("data, message", REJECTED.values(), ids=REJECTED.keys())
def test_decode_refuses_naming_the_bad_field(data, message):
    with pytest.raises(TcpStateError, match=message):
        decode(data)


def test_a_truncated_encoding_is_refused():
    blob = encode(V4)
    for cut in (1, len(V4.recv_queue), len(blob) - HEADER_SIZE, len(blob) - HEADER_SIZE + 1):
        with pytest.raises(TcpStateError, match=r"bytes"):
            decode(blob[:-cut])


def test_a_window_scale_of_14_is_the_largest_accepted():
    assert decode(header(flags=WSCALE, snd_wscale=14, rcv_wscale=14)).wscale == (14, 14)
    with pytest.raises(TcpStateError, match=r"window scale 14/15"):
        decode(header(flags=WSCALE, snd_wscale=14, rcv_wscale=15))


def test_an_ipv6_address_may_use_all_16_bytes():
    raw = bytes(range(1, 17))
    state = decode(header(family=6, local=raw, peer=raw))
    assert state.family == socket.AF_INET6
    assert state.local[0] == "102:304:506:708:90a:b0c:d0e:f10"


def test_encode_refuses_an_address_of_the_other_family():
    with pytest.raises(TcpStateError, match=r"address '::1' is not an IP address of the connection's family"):
        encode(TcpState(socket.AF_INET, ("::1", 1), ("10.0.0.2", 2), 1, 2, 1460))
    with pytest.raises(TcpStateError, match=r"address '10.0.0.2' is not an IP address of the connection's family"):
        encode(TcpState(socket.AF_INET6, ("::1", 1), ("10.0.0.2", 2), 1, 2, 1460))


# ---------------------------------------------------------------------------
# parts(): a blob in bounded pieces


@pytest.mark.parametrize("blob, size, pieces", [
    (b"abcdefg", 3, [b"abc", b"def", b"g"]),
    (b"abcdef", 3, [b"abc", b"def"]),
    (b"ab", 5, [b"ab"]),
    (b"abc", 1, [b"a", b"b", b"c"]),
])
def test_parts_splits_into_pieces_of_at_most_size(blob, size, pieces):
    assert parts(blob, size) == pieces
    assert b"".join(parts(blob, size)) == blob


def test_parts_of_an_empty_blob_is_one_empty_piece():
    assert parts(b"", 4096) == [b""]


def test_an_encoded_state_sent_in_parts_decodes_once_joined():
    blob = encode(V6)
    pieces = parts(blob, 100)
    assert len(pieces) == -(-len(blob) // 100) and all(len(p) <= 100 for p in pieces)
    assert decode(b"".join(pieces)) == V6


BARE = TcpState(socket.AF_INET, ("10.0.0.1", 1000), ("10.0.0.2", 2000), send_seq=5, recv_seq=6, mss=1460)
ENCODE_REFUSED = {
    "port 0": (dict(local=("10.0.0.1", 0)), r"ports 0 and 2000"),
    "mss 0": (dict(mss=0), r"mss 0"),
    "window scale 15": (dict(wscale=(15, 0)), r"window scale 15/0"),
    "three window scales": (dict(wscale=(1, 2, 3)), r"3 window scales; accepted: two"),
    "no window scale in the tuple": (dict(wscale=()), r"0 window scales; accepted: two"),
    "unsent beyond the queue": (dict(send_queue=b"ab", unsent=3), r"3 unsent bytes in a send queue of 2"),
    "negative seq": (dict(send_seq=-1), r"a field out of its range"),
    "not an address": (dict(peer=("example.org", 2000)), r"'example.org' is not an IP address of the connection's family"),
    "scoped address": (dict(family=socket.AF_INET6, local=("fe80::1%eth0", 1000), peer=("fe80::2", 2000)),
                       r"a scoped address names an interface of this host only"),
    "an address not written as the kernel writes it": (
        dict(family=socket.AF_INET6, local=("::1", 1000), peer=("::ffff:ffff", 2000)),
        r"'::ffff:ffff' is not written as the kernel writes it: '::255.255.255.255'"),
    "unix family": (dict(family=socket.AF_UNIX), r"family .*; accepted: AF_INET, AF_INET6"),
    "timestamp without the option": (dict(timestamp=9), r"a timestamp without the timestamps option"),
}


@pytest.mark.parametrize("change, message", ENCODE_REFUSED.values(), ids=ENCODE_REFUSED.keys())
def test_encode_refuses_what_decode_would(change, message):
    import dataclasses
    with pytest.raises(TcpStateError, match=message):
        encode(dataclasses.replace(BARE, **change))


# ---------------------------------------------------------------------------
# Which connections leave repair mode without a window probe (fdmig.tcprepair.quiet)


@pytest.mark.parametrize("change, quiet", [
    ({}, True),
    ({"send_queue": b"in flight"}, False),  # the peer's ACK of it is wanted
    ({"send_queue": b"never sent", "unsent": 10}, False),
    ({"window": (7, 65535, 65535, 65535, 150)}, False),  # an ACK owed for 50 bytes
    ({"window": (7, 0, 65535, 65535, 200)}, False),  # the peer's window is shut
    ({"window": None}, False),  # not known
])
def test_only_a_connection_idle_both_ways_leaves_repair_mode_unprobed(change, quiet):
    from fdmig import tcprepair
    idle = dict(family=socket.AF_INET, local=("10.0.0.1", 1), peer=("10.0.0.2", 2), send_seq=100, recv_seq=200,
                mss=1460, window=(7, 65535, 65535, 65535, 200))
    assert tcprepair.quiet(TcpState(**{**idle, **change})) is quiet
