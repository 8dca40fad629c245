"""TCP_REPAIR: the one module that puts TCP sockets into the kernel's repair mode,
dumps an established connection's state (fdmig.tcpstate) and builds it again on
another host, as CRIU's libsoccr does. Needs CAP_NET_ADMIN.

In repair mode a socket sends nothing and a close is silent (no FIN, no reset):
that is what lets a source let go of a connection a target has taken, and a
target drop one it restored, without the peer hearing of either. The address must
leave the old host before its socket closes, or the kernel there answers the
peer's next segment with a reset (the caller's --release-cmd)."""

import errno
import fcntl
import functools
import _socket
import socket
import struct

from fdmig.tcpstate import TcpState

# linux/tcp.h
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_WP = 1, 0, -1
NO_QUEUE, RECV_QUEUE, SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED = 1
# linux/sockios.h, asm-generic/ioctls.h
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
_WINDOW = struct.Struct("=5I")
# struct tcp_info as far as tcpi_notsent_bytes (Linux 4.6; TCP_REPAIR_WINDOW
# needs 4.8): state, options, the window scales, packets in flight
# (tcpi_unacked) and bytes never sent.
_INFO = struct.Struct("=B4xBB17xI116xI")
_I32 = struct.Struct("=i")
_TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
               7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
_CAP_NET_ADMIN = 12


class RepairError(Exception):
    """A connection that cannot be dumped or restored; the message says why."""


def capable() -> bool:
    """Whether this process has CAP_NET_ADMIN, which TCP_REPAIR needs."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def _set(sock: socket.socket, option: int, value: int) -> None:
    # As a C int, which Python passes without packing (a third of the call's
    # time, thousands of times in a downtime); the kernel reads the same bits.
    value &= 0xFFFFFFFF
    sock.setsockopt(socket.IPPROTO_TCP, option, value - (value >> 31 << 32))


def _get_u32(sock: socket.socket, option: int) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, option) & 0xFFFFFFFF


# The family as the int it is: socket.family makes an enum of it each time
# (a tenth of a connection's dump).
_family = _socket.socket.family.__get__


def _ioctl_int(sock: socket.socket, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, buf, True)
    return _I32.unpack(buf)[0]


def enter(sock: socket.socket) -> None:
    """Repair mode: the socket stops sending, and closing it is silent."""
    try:
        _set(sock, TCP_REPAIR, REPAIR_ON)
    except PermissionError:
        raise RepairError("TCP_REPAIR needs CAP_NET_ADMIN") from None


def leave(sock: socket.socket, probe: bool = True) -> None:
    """Out of repair mode, with a window probe: the peer's answer (an ACK) tells
    the socket at once where the peer stands, and the probe itself acknowledges
    what the socket holds. A quiet() connection needs neither: `probe` False
    spares the kernel a packet (most of this call's cost). (The repair queue it
    was last set to counts only in repair mode: no call to reset it.)"""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, REPAIR_OFF if probe else REPAIR_OFF_NO_WP)
    except OSError as exc:
        if exc.errno != errno.EINVAL or probe:
            raise
        _set(sock, TCP_REPAIR, REPAIR_OFF)  # a kernel before TCP_REPAIR_OFF_NO_WP


def quiet(state: TcpState) -> bool:
    """Whether the connection was idle both ways at the dump, so that it may leave
    repair mode without a window probe: no byte in its send queue (none for the
    peer to acknowledge), its last ACK sent for all it had received (rcv_wup at
    rcv_nxt: none owed, such as a delayed ACK the release cut off), and a peer
    window open (none of its window updates to wait for)."""
    if state.send_queue or state.window is None:
        return False
    _, snd_wnd, _, _, rcv_wup = state.window
    return rcv_wup == state.recv_seq and snd_wnd > 0


def _peek_queue(sock: socket.socket, queue: int, length: int) -> tuple[int, bytes]:
    """(the queue's end seq, its bytes), in repair mode."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    seq = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    if not length:
        return seq, b""
    buf = bytearray(length + 1)  # one more: a queue that grew would show
    got = sock.recv_into(buf, length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if got != length:
        raise RepairError(f"the {'send' if queue == SEND_QUEUE else 'receive'} queue held {got} bytes, "
                          f"not the {length} counted")
    return seq, bytes(buf[:length])


def dump(sock: socket.socket, names: tuple | None = None) -> TcpState:
    """The state of `sock`, an established connection already in repair mode;
    `names`, its (local, peer) addresses if already known (they never change)."""
    getsockopt = sock.getsockopt
    info = getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _INFO.size)
    if len(info) < _INFO.size:
        raise RepairError("this kernel's TCP_INFO says nothing of bytes never sent (Linux 4.6 and later do)")
    state, options, wscale, in_flight, unsent = _INFO.unpack(info)
    if state != TCP_ESTABLISHED:
        raise RepairError(f"its TCP connection is {_TCP_STATES.get(state, state)}; "
                          "x-tcp-repair moves only ESTABLISHED ones")
    if in_flight or unsent:
        outq, unsent = _ioctl_int(sock, SIOCOUTQ), _ioctl_int(sock, SIOCOUTQNSD)
    else:
        outq = 0  # nothing sent unacknowledged, nothing unsent: an empty send queue (most, idle)
    inq = _ioctl_int(sock, SIOCINQ)
    send_seq, send_queue = _peek_queue(sock, SEND_QUEUE, outq)
    recv_seq, recv_queue = _peek_queue(sock, RECV_QUEUE, inq)
    timestamps = bool(options & TCPI_OPT_TIMESTAMPS)
    local, peer = names or (sock.getsockname()[:2], sock.getpeername()[:2])
    return TcpState(
        _family(sock), local, peer, send_seq, recv_seq,
        getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG),  # the clamp, in repair mode
        send_queue, unsent, recv_queue, bool(options & TCPI_OPT_SACK), timestamps,
        (wscale & 0xF, wscale >> 4) if options & TCPI_OPT_WSCALE else None,
        _get_u32(sock, TCP_TIMESTAMP) if timestamps else 0,
        _WINDOW.unpack(getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.size)))


def _write_queue(sock: socket.socket, queue: int, data: bytes) -> None:
    _set(sock, TCP_REPAIR_QUEUE, queue)
    level, option = socket.SOL_SOCKET, (socket.SO_SNDBUF if queue == SEND_QUEUE else socket.SO_RCVBUF)
    if sock.getsockopt(level, option) < 2 * len(data):
        # The source's buffer had grown (autotuning); ours starts small.
        sock.setsockopt(level, SO_SNDBUFFORCE if option == socket.SO_SNDBUF else SO_RCVBUFFORCE, 2 * len(data))
    view, chunk = memoryview(data), len(data)
    while view:
        try:
            sent = sock.send(view[:chunk], socket.MSG_DONTWAIT)
        except OSError as exc:
            # The kernel takes a queue in pieces it can allocate (CRIU halves too).
            if exc.errno in (errno.ENOMEM, errno.EAGAIN) and chunk > 1024:
                chunk //= 2
                continue
            raise
        view = view[sent:]


def blank(family: int) -> socket.socket:
    """A socket for restore(), in repair mode already, its receive queue the
    one TCP_QUEUE_SEQ sets: made before a migration's downtime, it leaves
    restore() only the connection's own state to set. It may be bound to the
    connection's local address meanwhile (restore()'s `bound`)."""
    # Non-blocking from the start: in repair mode connect() completes at once.
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        enter(sock)
        # Transparent, not only free-bound: the route to the peer is looked up from
        # an address this host may not hold yet (restore() ends it).
        _transparent(sock, 1)
        _set(sock, TCP_REPAIR_QUEUE, RECV_QUEUE)
    except BaseException:
        sock.close()
        raise
    return sock


def opaque(sock: socket.socket) -> None:
    """A restored socket no longer transparent (blank() made it so for the route
    its connect() looks up): from here on it sends only from an address this
    host holds. Its timers run on in repair mode, and the day it moves on from
    here a transparent socket would still send from the address --release-cmd
    took away: a second host on one connection, its timestamps ahead of the new
    host's, so that the peer refuses the new host's segments (PAWS) until their
    first retransmission timeout, 1 s. Until then, the host holds the address."""
    _transparent(sock, 0)


def _transparent(sock: socket.socket, on: int) -> None:
    if _family(sock) == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, on)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, on)


@functools.lru_cache(maxsize=256)
def _options(mss: int, wscale: tuple[int, int] | None, sack: bool, timestamps: bool) -> bytes:
    """TCP_REPAIR_OPTIONS' argument. Cached: a host's connections share a few."""
    options = [(TCPOPT_MAXSEG, mss)]
    if wscale is not None:
        options.append((TCPOPT_WINDOW, wscale[0] | wscale[1] << 16))
    if sack:
        options.append((TCPOPT_SACK_PERM, 0))
    if timestamps:
        options.append((TCPOPT_TIMESTAMP, 0))
    return b"".join(struct.pack("=II", code, value) for code, value in options)


def restore(state: TcpState, sock: socket.socket | None = None, bound: bool = False,
            transparent: bool = False) -> socket.socket:
    """`sock` (a blank() of the state's family, or a new one) holding the
    connection `state` describes, still in repair mode: nothing is sent until
    leave(). Its unsent bytes are the caller's to write after that. The address
    may reach this host only once the connection is ready to resume (the
    caller's --claim-cmd). `bound`: `sock` is bound to the state's local
    address already. `transparent`: it stays so, for the caller to end with
    opaque() once it has resumed, out of the downtime. On a failure, a socket
    made here is closed; `sock` stays the caller's (a poller may watch its fd:
    it must let go first)."""
    made = sock is None
    try:
        sock = sock or blank(state.family)
    except OSError as exc:
        raise RepairError(f"cannot make a socket in repair mode: {exc.strerror or exc}") from None
    setsockopt, recv_queue, send_queue = sock.setsockopt, state.recv_queue, state.send_queue
    try:
        _set(sock, TCP_QUEUE_SEQ, state.recv_seq - len(recv_queue))  # blank()'s queue
        setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
        _set(sock, TCP_QUEUE_SEQ, state.send_seq - len(send_queue))
        if not bound:
            sock.bind(state.local)
        sock.connect(state.peer)  # in repair mode: no SYN, straight to ESTABLISHED
        if not transparent:
            opaque(sock)
        setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS,
                   _options(state.mss, state.wscale, state.sack, state.timestamps))
        if state.timestamps:
            _set(sock, TCP_TIMESTAMP, state.timestamp)
        # Most connections hold nothing in either queue: no calls for them.
        if recv_queue:
            _write_queue(sock, RECV_QUEUE, recv_queue)
        if len(send_queue) > state.unsent:
            _write_queue(sock, SEND_QUEUE, state.sent)
        if state.window is not None:
            setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.pack(*state.window))
    except OSError as exc:
        if made:
            sock.close()
        raise RepairError(f"cannot restore the connection {state.local[0]}:{state.local[1]} -> "
                          f"{state.peer[0]}:{state.peer[1]}: {exc.strerror or exc}") from None
    return sock
