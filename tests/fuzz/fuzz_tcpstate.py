#!/usr/bin/env python3
"""Atheris harness for fdmig.tcpstate, the codec of a TCP connection's state.

The properties, both checked on every input:

  - bytes: decode() of the input as it is returns a TcpState or raises
    TcpStateError, nothing else (a target decodes whatever a source sends);
    a decoded state is within the bounds decode() promises (ports, mss, window
    scales, unsent within the send queue, sent + unsent is the send queue) and
    re-encodes to exactly the input: encode(decode(b)) == b;
  - states: a TcpState built from the same input read as decisions (below) is
    either refused by encode() with TcpStateError, or encoded to bytes that
    decode() turns back into that state: decode(encode(s)) == s. parts() of
    the encoding joins back to it, in pieces no larger than asked.

The input is read with a FuzzedDataProvider (integers from the end, bytes from
the front), for the second property:

    family; the two addresses (4 or 16 bytes each) and ports; send and recv
    seq, mss, timestamp; sack, timestamps; window scales (or none); the five
    window fields (or none); the send queue, how much of it is unsent, the recv
    queue (each queue's bytes from the front); the piece size for parts().

Each number is drawn either from decode()'s bounds or, one time in eight, from
its whole field on the wire (u8, u16, u32), where decode() refuses some values:
encode() must then refuse them too.

The seeds are valid encodings (and a truncated one), so that the fuzzer mutates
real headers for the first property from the start.

Run it:   python tests/fuzz/fuzz_tcpstate.py tests/fuzz/corpus/tcpstate -max_total_time=3600
Seeds:    python tests/fuzz/fuzz_tcpstate.py --make-seeds tests/fuzz/corpus/tcpstate
Replay:   python tests/fuzz/fuzz_tcpstate.py path/to/crash-...   (runs that input once)

TestOneInput is importable without atheris (tests/test_fuzz.py replays the corpus
in-process with the pure-Python provider, which matches atheris').
"""

import ipaddress
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzzcommon import PyDataProvider, atheris, decide, provider  # noqa: E402,F401
import fuzzcommon  # noqa: E402

if __name__ == "__main__" and atheris is not None and "--make-seeds" not in sys.argv:
    with atheris.instrument_imports(include=["fdmig"]):
        from fdmig import tcpstate
else:
    from fdmig import tcpstate

from fdmig.tcpstate import TcpState, TcpStateError  # noqa: E402 (the module is loaded above)

U8, U16, U32 = (1 << 8) - 1, (1 << 16) - 1, (1 << 32) - 1
MAX_FUZZ_QUEUE = 4096  # what one input can hold anyway (libFuzzer's default -max_len)


class Bug(AssertionError):
    """The codec broke one of its documented promises (not just raised)."""


def _check_state(state: TcpState) -> None:
    """What decode() promises about a state it returns."""
    if not isinstance(state, TcpState):
        raise Bug(f"decode() returned {state!r}")
    if state.family not in (socket.AF_INET, socket.AF_INET6):
        raise Bug(f"family {state.family}")
    for host, port in (state.local, state.peer):
        if not 0 < port <= U16:
            raise Bug(f"port {port}")
        if ipaddress.ip_address(host).version != (4 if state.family == socket.AF_INET else 6):
            raise Bug(f"address {host} in a connection of family {state.family}")
    if not 0 < state.mss <= U16:
        raise Bug(f"mss {state.mss}")
    if state.wscale is not None and not all(0 <= w <= tcpstate.MAX_WSCALE for w in state.wscale):
        raise Bug(f"window scale {state.wscale}")
    if not 0 <= state.unsent <= len(state.send_queue) <= tcpstate.MAX_QUEUE:
        raise Bug(f"{state.unsent} unsent bytes in a send queue of {len(state.send_queue)}")
    if len(state.recv_queue) > tcpstate.MAX_QUEUE:
        raise Bug(f"a recv queue of {len(state.recv_queue)} bytes")
    if state.sent + state.unsent_bytes != state.send_queue or len(state.unsent_bytes) != state.unsent:
        raise Bug(f"sent {len(state.sent)} + unsent {len(state.unsent_bytes)} is not the send queue "
                  f"of {len(state.send_queue)} with {state.unsent} unsent")


def check_bytes(data: bytes) -> None:
    """decode() of any bytes: a state that re-encodes to them, or TcpStateError."""
    try:
        state = tcpstate.decode(data)
    except TcpStateError as exc:
        if not str(exc):
            raise Bug("a TcpStateError without a message") from None
        return
    _check_state(state)
    again = tcpstate.encode(state)
    if again != data:
        raise Bug(f"decode() then encode() changes the bytes:\n{data[:tcpstate.HEADER_SIZE].hex()}\n"
                  f"{again[:tcpstate.HEADER_SIZE].hex()}\n({state!r})")


def _number(fdp, lo: int, hi: int, field: int, what: str) -> int:
    """Within decode()'s bounds lo..hi, or one time in eight anywhere in the field."""
    if decide(fdp, 0, 7, f"{what}-anywhere") == 7:  # not 0: an input used up gives the minimum
        return decide(fdp, 0, field, what)
    return decide(fdp, lo, hi, what)


def _address(fdp, family: int) -> str:
    size = 4 if family == socket.AF_INET else 16
    raw = fdp.ConsumeBytes(size).ljust(size, b"\0")
    return str(ipaddress.ip_address(raw))


def make_state(fdp) -> tuple[TcpState, int]:
    """A TcpState from the fuzzer's input, and a piece size for parts()."""
    family = (socket.AF_INET, socket.AF_INET6)[decide(fdp, 0, 1, "family")]
    local = (_address(fdp, family), _number(fdp, 1, U16, U16, "local-port"))
    peer = (_address(fdp, family), _number(fdp, 1, U16, U16, "peer-port"))
    send_seq, recv_seq = decide(fdp, 0, U32, "send-seq"), decide(fdp, 0, U32, "recv-seq")
    mss = _number(fdp, 1, U16, U32, "mss")
    timestamp = decide(fdp, 0, U32, "timestamp")
    sack, timestamps = bool(decide(fdp, 0, 1, "sack")), bool(decide(fdp, 0, 1, "timestamps"))
    wscale = None
    if decide(fdp, 0, 1, "wscale"):
        wscale = tuple(_number(fdp, 0, tcpstate.MAX_WSCALE, U8, what) for what in ("snd-wscale", "rcv-wscale"))
    window = None
    if decide(fdp, 0, 1, "window"):
        window = tuple(decide(fdp, 0, U32, what) for what in ("snd-wl1", "snd-wnd", "max-window", "rcv-wnd", "rcv-wup"))
    send_queue = fdp.ConsumeBytes(decide(fdp, 0, MAX_FUZZ_QUEUE, "send-queue"))
    unsent = _number(fdp, 0, len(send_queue), U32, "unsent")
    recv_queue = fdp.ConsumeBytes(decide(fdp, 0, MAX_FUZZ_QUEUE, "recv-queue"))
    piece = decide(fdp, 1, 256, "piece")
    state = TcpState(family, local, peer, send_seq, recv_seq, mss, send_queue, unsent, recv_queue,
                     sack, timestamps, wscale, timestamp, window)
    return state, piece


def check_state(state: TcpState, piece: int) -> None:
    """encode() refuses `state` with TcpStateError, or decode() gives it back."""
    try:
        blob = tcpstate.encode(state)
    except TcpStateError:
        return
    try:
        back = tcpstate.decode(blob)
    except TcpStateError as exc:
        raise Bug(f"encode() wrote bytes that decode() refuses: {exc}\n({state!r})") from None
    if back != state:
        raise Bug(f"decode(encode(s)) != s:\n{state!r}\n{back!r}")
    if tcpstate.encode(back) != blob:
        raise Bug(f"encode() of the decoded state differs ({state!r})")
    pieces = tcpstate.parts(blob, piece)
    if b"".join(pieces) != blob or not pieces or any(len(p) > piece for p in pieces) \
            or any(not p for p in pieces[:-1]):
        raise Bug(f"parts(blob of {len(blob)}, {piece}) gave pieces of {[len(p) for p in pieces]}")


def run(fdp) -> None:
    check_state(*make_state(fdp))


def TestOneInput(data: bytes) -> None:
    check_bytes(data)
    run(provider(data))


# ---------------------------------------------------------------------------
# Seeds: valid encodings, written by the codec itself


V4 = ("192.0.2.10", 443), ("198.51.100.7", 51234)
V6 = ("2001:db8::1", 8443), ("2001:db8:0:1::42", 40000)


def seeds():
    """(name, input): valid encodings of IPv4 and IPv6 states, bare and with
    everything set, and a truncated one."""
    full = dict(send_queue=b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", unsent=16, recv_queue=b"HTTP/1.1 200 OK\r\n",
                sack=True, timestamps=True, wscale=(7, 9), timestamp=0x5E0A1B2C,
                window=(0x10000000, 65535, 131072, 64240, 0x20000000))
    states = {
        "v4-bare": TcpState(socket.AF_INET, *V4, send_seq=1000, recv_seq=2000, mss=1460),
        "v4-full": TcpState(socket.AF_INET, *V4, send_seq=0xFFFFFFF0, recv_seq=17, mss=1460, **full),
        "v4-queues": TcpState(socket.AF_INET, *V4, send_seq=5, recv_seq=6, mss=536,
                              send_queue=b"\x00" * 40, recv_queue=b"\xff" * 3),
        "v4-all-unsent": TcpState(socket.AF_INET, *V4, send_seq=12, recv_seq=34, mss=1460,
                                  send_queue=b"never sent", unsent=10),
        "v6-bare": TcpState(socket.AF_INET6, *V6, send_seq=1, recv_seq=U32, mss=1440),
        "v6-full": TcpState(socket.AF_INET6, *V6, send_seq=77, recv_seq=88, mss=1440, **full),
        "v6-window-only": TcpState(socket.AF_INET6, ("::1", 1), ("::ffff:192.0.2.1", 65535), send_seq=3, recv_seq=4,
                                   mss=65535, window=(1, 2, 3, 4, 5)),
        "v6-timestamps-only": TcpState(socket.AF_INET6, *V6, send_seq=9, recv_seq=10, mss=1220,
                                       timestamps=True, timestamp=123456789, wscale=(0, 14)),
    }
    out = [(name, tcpstate.encode(state)) for name, state in states.items()]
    out.append(("v4-full-truncated", tcpstate.encode(states["v4-full"])[:-5]))
    return out


def write_seeds(directory: str) -> None:
    """Each seed checked first: the valid ones decode, the truncated one does not."""
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds():
        try:
            tcpstate.decode(data)
        except TcpStateError:
            if not name.endswith("-truncated"):
                raise
        else:
            if name.endswith("-truncated"):
                raise SystemExit(f"seed {name} decodes")
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(data)
        print(f"seed-{name}: {len(data)} bytes")


if __name__ == "__main__":
    fuzzcommon.main(sys.argv, __file__, TestOneInput, write_seeds,
                    (run, check_bytes, check_state, make_state, _check_state, _number, _address))
