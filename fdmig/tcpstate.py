"""A TCP connection's state as it crosses hosts (capability x-tcp-repair): what
fdmig.tcprepair dumps on the source and restores on the target, as bytes. Sans-IO:
pure functions, every field bounded, so a target can decode whatever a source
sends (and the fuzz tests do). The layout, big-endian:

    magic b"FTCP" | version u8 | family u8 (4 or 6) | flags u8 | snd-wscale u8
    | rcv-wscale u8 | reserved u8 (0)
    local address (16 bytes; IPv4 in the first 4, the rest 0) | local port u16
    peer address (16) | peer port u16
    send seq u32 | recv seq u32 | mss u32 | timestamp u32
    window: snd-wl1 | snd-wnd | max-window | rcv-wnd | rcv-wup (u32 each)
    send queue length u32 | unsent length u32 | recv queue length u32
    the send queue's bytes | the recv queue's bytes

The send seq is the end of the send queue (the kernel's write_seq) and the recv
seq the end of the recv queue (rcv_nxt), as TCP_QUEUE_SEQ reads them: a restore
sets each to its end minus its queue's length, then writes the queue. The last
`unsent` bytes of the send queue were never sent: they are written afresh after
the repair, not restored as sent."""

import functools
import socket
import struct
from dataclasses import dataclass

MAGIC = b"FTCP"
VERSION = 1
# Well above what any kernel's tcp_wmem/tcp_rmem lets one socket queue.
MAX_QUEUE = 64 << 20
MAX_WSCALE = 14  # RFC 7323
_HEADER = struct.Struct("!4s6B16sH16sH4I5I3I")
HEADER_SIZE = _HEADER.size

# flags
SACK = 1
TIMESTAMPS = 2
WSCALE = 4
WINDOW = 8  # the window fields are set (TCP_REPAIR_WINDOW was read)
_FLAGS = SACK | TIMESTAMPS | WSCALE | WINDOW
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_NO_WINDOW = (0, 0, 0, 0, 0)


class TcpStateError(ValueError):
    """Bytes that are not a TCP state this fdmig can restore; the message says why."""


@dataclass(slots=True)  # not frozen: a frozen one takes twice as long to make, thousands in a downtime
class TcpState:
    family: int  # socket.AF_INET or AF_INET6
    local: tuple[str, int]  # (host, port)
    peer: tuple[str, int]
    send_seq: int
    recv_seq: int
    mss: int
    send_queue: bytes = b""  # sent but not acknowledged, then `unsent` bytes never sent
    unsent: int = 0
    recv_queue: bytes = b""  # received, not yet read
    sack: bool = False
    timestamps: bool = False
    wscale: tuple[int, int] | None = None  # (snd, rcv), if window scaling is on
    timestamp: int = 0
    window: tuple[int, int, int, int, int] | None = None  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup

    @property
    def sent(self) -> bytes:
        """The send queue's bytes the peer may have: restored in repair mode."""
        return self.send_queue[: len(self.send_queue) - self.unsent]

    @property
    def unsent_bytes(self) -> bytes:
        return self.send_queue[len(self.send_queue) - self.unsent:]


@functools.lru_cache(maxsize=4096)  # a downtime packs thousands, of a few addresses
def _pack_address(family: int, host: str) -> bytes:
    if "%" in host:
        raise TcpStateError(f"address {host}: a scoped address names an interface of this host only")
    try:
        packed = socket.inet_pton(family, host)  # a tenth of ipaddress's time: thousands go in a downtime
    except (OSError, ValueError):
        raise TcpStateError(f"address {host!r} is not an IP address of the connection's family") from None
    canonical = socket.inet_ntop(family, packed)
    if host != canonical:
        # As getsockname() writes it, so that a state decodes to what was encoded.
        raise TcpStateError(f"address {host!r} is not written as the kernel writes it: {canonical!r}")
    return packed.ljust(16, b"\0")


def check_address(family: int, host) -> None:
    """TcpStateError unless `host` is an address of `family` as a state would
    hold it (as getsockname() writes it)."""
    if type(host) is not str:
        raise TcpStateError(f"address {host!r} is not a string")
    _pack_address(family, host)


@functools.lru_cache(maxsize=4096)
def _unpack_address(version: int, raw: bytes, what: str) -> str:
    if version == 4:
        if any(raw[4:]):
            raise TcpStateError(f"{what} address: an IPv4 address with bytes after its 4")
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _check(local_port, peer_port, mss, wscale, send_len, unsent, recv_len) -> None:
    """The bounds both ends hold a state to: encode refuses what decode would.
    (Plain comparisons: thousands of states are encoded in a downtime.)"""
    if not (0 < local_port < 65536 and 0 < peer_port < 65536):
        raise TcpStateError(f"ports {local_port} and {peer_port}; accepted: 1 to 65535")
    if not 0 < mss < 65536:
        raise TcpStateError(f"mss {mss}; accepted: 1 to 65535")
    if wscale is not None:
        if len(wscale) != 2:
            raise TcpStateError(f"{len(wscale)} window scales; accepted: two (send, receive)")
        if not (0 <= wscale[0] <= MAX_WSCALE and 0 <= wscale[1] <= MAX_WSCALE):
            raise TcpStateError(f"window scale {wscale[0]}/{wscale[1]}; accepted: 0 to {MAX_WSCALE}")
    if send_len > MAX_QUEUE or recv_len > MAX_QUEUE:
        raise TcpStateError(f"a queue of {max(send_len, recv_len)} bytes; the bound is {MAX_QUEUE}")
    if not 0 <= unsent <= send_len:
        raise TcpStateError(f"{unsent} unsent bytes in a send queue of {send_len}")


def encode(state: TcpState) -> bytes:
    """`state` as bytes; TcpStateError if decode would refuse them."""
    family, send_queue, recv_queue, wscale, window = (state.family, state.send_queue, state.recv_queue,
                                                      state.wscale, state.window)
    if family == socket.AF_INET:
        version = 4
    elif family == socket.AF_INET6:
        version = 6
    else:
        raise TcpStateError(f"family {family}; accepted: AF_INET, AF_INET6")
    if state.timestamp and not state.timestamps:
        raise TcpStateError("a timestamp without the timestamps option")
    local, peer = state.local, state.peer
    _check(local[1], peer[1], state.mss, wscale, len(send_queue), state.unsent, len(recv_queue))
    flags = (SACK * state.sack) | (TIMESTAMPS * state.timestamps) | (WSCALE * (wscale is not None)) \
        | (WINDOW * (window is not None))
    snd_wscale, rcv_wscale = wscale or (0, 0)
    try:
        header = _HEADER.pack(MAGIC, VERSION, version, flags, snd_wscale, rcv_wscale, 0,
                              _pack_address(family, local[0]), local[1],
                              _pack_address(family, peer[0]), peer[1],
                              state.send_seq, state.recv_seq, state.mss, state.timestamp,
                              *(window or _NO_WINDOW), len(send_queue), state.unsent, len(recv_queue))
    except struct.error as exc:
        raise TcpStateError(f"a field out of its range: {exc}") from None
    if send_queue or recv_queue:
        return header + bytes(send_queue) + bytes(recv_queue)
    return header


def decode(data: bytes) -> TcpState:
    """The state `data` holds; TcpStateError naming the first thing wrong."""
    if len(data) < HEADER_SIZE:
        raise TcpStateError(f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    fields = _HEADER.unpack_from(data)
    (magic, version, family, flags, snd_wscale, rcv_wscale, reserved, local, local_port, peer, peer_port,
     send_seq, recv_seq, mss, timestamp) = fields[:15]
    window = fields[15:20]
    send_len, unsent, recv_len = fields[20:]
    if magic != MAGIC:
        raise TcpStateError(f"magic {magic!r}, not {MAGIC!r}")
    if version != VERSION:
        raise TcpStateError(f"version {version}; this fdmig reads version {VERSION}")
    if family not in _FAMILIES:
        raise TcpStateError(f"family {family}; accepted: 4, 6")
    if flags & ~_FLAGS:
        raise TcpStateError(f"unknown flags {flags & ~_FLAGS:#x}")
    if reserved:
        raise TcpStateError(f"the reserved byte is {reserved}, not 0")
    # Fields their flag leaves unset must be 0: one encoding for each state.
    if not flags & WSCALE and (snd_wscale or rcv_wscale):
        raise TcpStateError("window scale bytes set without the window-scale flag")
    if not flags & WINDOW and any(window):
        raise TcpStateError("window fields set without the window flag")
    if not flags & TIMESTAMPS and timestamp:
        raise TcpStateError("a timestamp without the timestamps flag")
    wscale = (snd_wscale, rcv_wscale) if flags & WSCALE else None
    _check(local_port, peer_port, mss, wscale, send_len, unsent, recv_len)
    if len(data) != HEADER_SIZE + send_len + recv_len:
        raise TcpStateError(f"{len(data)} bytes, but the header says {HEADER_SIZE + send_len + recv_len}")
    # Most connections hold no bytes in either queue: no slices to make.
    send_queue = bytes(data[HEADER_SIZE: HEADER_SIZE + send_len]) if send_len else b""
    recv_queue = bytes(data[HEADER_SIZE + send_len:]) if recv_len else b""
    return TcpState(_FAMILIES[family], (_unpack_address(family, local, "local"), local_port),
                    (_unpack_address(family, peer, "peer"), peer_port), send_seq, recv_seq, mss,
                    send_queue, unsent, recv_queue, bool(flags & SACK), bool(flags & TIMESTAMPS),
                    wscale, timestamp, window if flags & WINDOW else None)


def parts(blob: bytes, size: int) -> list[bytes]:
    """`blob` in pieces of at most `size` bytes (at least one piece), for frames
    that are bounded: a send queue may hold megabytes. Most states are one
    piece, thousands of them in a downtime: that case makes no slices."""
    if len(blob) <= size:
        return [blob]
    return [blob[i: i + size] for i in range(0, len(blob), size)]
