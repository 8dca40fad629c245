#!/usr/bin/env python3
"""Atheris harness for fdmig.qmp's server side: ServerCodec and JSONSplitter.

The property: no input, cut into reads however the fuzzer likes, makes them
raise. Every item that comes out is a Request, BadRequest or Overflow, and gets
the reply the server would send (gate() then reply() or error()), which must be
one line of JSON carrying the request's id exactly when it had one. Also:

  - nothing comes out after an Overflow (the server closes the connection);
  - how the stream was cut into reads does not change what comes out (compared
    against one read of the whole input, as tests/test_qmp.py does);
  - a second JSONSplitter with small, fuzzer-chosen bounds takes the same reads,
    so the size and depth overflows are reached too (no comparison there: at
    small bounds a stray token can overflow or not depending on the cut).

The input is read with a FuzzedDataProvider: decisions (the splitter's bounds,
each read's size) from the end, the stream's bytes from the front.

Run it:   python tests/fuzz/fuzz_qmp.py tests/fuzz/corpus/qmp -max_total_time=3600
Seeds:    python tests/fuzz/fuzz_qmp.py --make-seeds tests/fuzz/corpus/qmp
Replay:   python tests/fuzz/fuzz_qmp.py path/to/crash-...   (runs that input once)

TestOneInput is importable without atheris (tests/test_fuzz.py replays the corpus
in-process with the pure-Python provider, which matches atheris').
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzzcommon import PyDataProvider, atheris, decide, provider  # noqa: E402,F401
import fuzzcommon  # noqa: E402

if __name__ == "__main__" and atheris is not None and "--make-seeds" not in sys.argv:
    with atheris.instrument_imports(include=["fdmig"]):
        from fdmig import qmp
else:
    from fdmig import qmp




class Bug(AssertionError):
    """The codec broke one of its documented promises (not just raised)."""


def _canon(value) -> str:
    # Equality that holds for NaN too: what encode() would write.
    return json.dumps(value)


def _check_reply(line: bytes, item) -> None:
    if not isinstance(line, bytes) or not line.endswith(b"\n") or line.count(b"\n") != 1:
        raise Bug(f"a reply must be one line: {line[:200]!r}")
    msg = json.loads(line)
    has_id = item is not None and item.has_id
    if ("id" in msg) != has_id:
        raise Bug(f"reply {line[:200]!r} to {item!r}: id present {'id' in msg}, expected {has_id}")
    if has_id and _canon(msg["id"]) != _canon(item.id):
        raise Bug(f"reply {line[:200]!r}: id is not {item.id!r}")


def _answer(codec: qmp.ServerCodec, items) -> bool:
    """Replies to `items` as fdmig.control does; True if one was an Overflow."""
    overflow = False
    for item in items:
        if isinstance(item, qmp.Request):
            if not isinstance(item.execute, str) or not isinstance(item.arguments, dict):
                raise Bug(f"malformed Request {item!r}")
            negotiated = codec.negotiated
            gate = codec.gate(item)
            expected = (item.execute != "qmp_capabilities") if not negotiated else (item.execute == "qmp_capabilities")
            if (gate is not None) != expected:
                raise Bug(f"gate({item.execute!r}) with negotiated={negotiated} gave {gate!r}")
            line = qmp.ServerCodec.error(item, *gate) if gate else qmp.ServerCodec.reply(item, item.arguments)
            _check_reply(line, item)
        elif isinstance(item, qmp.BadRequest):
            if not isinstance(item.desc, str):
                raise Bug(f"BadRequest.desc is {item.desc!r}")
            _check_reply(qmp.ServerCodec.error(item, "GenericError", item.desc), item)
        elif isinstance(item, qmp.Overflow):
            _check_reply(qmp.ServerCodec.error(None, "GenericError", item.desc), None)
            overflow = True
        else:
            raise Bug(f"receive_data() gave {item!r}")
    return overflow


def run(fdp) -> None:
    bounded = decide(fdp, 0, 3, "bounded")  # 0: ServerCodec only
    splitter = None
    if bounded:
        splitter = qmp.JSONSplitter(max_size=decide(fdp, 1, 300, "max-size"), max_depth=decide(fdp, 1, 70, "max-depth"))
    codec = qmp.ServerCodec()
    stream = bytearray()
    items = []
    overflowed = split_overflowed = False
    while fdp.remaining_bytes():
        size = decide(fdp, 1, 256, "size")
        data = fdp.ConsumeBytes(size)
        if not data:
            break
        stream += data
        got = codec.receive_data(data)
        if overflowed and got:
            raise Bug(f"after an Overflow receive_data() still gave {got!r}")
        items += got
        overflowed |= _answer(codec, got)
        if splitter is not None:
            pieces = splitter.feed(data)
            if split_overflowed and pieces:
                raise Bug(f"after an Overflow feed() still gave {pieces!r}")
            for piece in pieces:
                if isinstance(piece, qmp.Overflow):
                    split_overflowed = True
                elif not isinstance(piece, (bytes, qmp.BadRequest)):
                    raise Bug(f"feed() gave {piece!r}")
    # How the stream was cut into reads must not matter.
    whole = qmp.ServerCodec().receive_data(bytes(stream))
    if repr(whole) != repr(items):
        raise Bug(f"one read gives {whole!r}\nthe fuzzer's reads give {items!r}")


def TestOneInput(data: bytes) -> None:
    run(provider(data))


# ---------------------------------------------------------------------------
# Seeds


class Recorder(fuzzcommon.Recorder):
    """Plays the provider for run() (see fuzzcommon.Recorder): `data` in reads of
    `sizes` (the last one repeats), other decisions fixed by keyword, else the
    range's minimum."""

    def __init__(self, data: bytes, sizes=(256,), **fixed):
        super().__init__(data, fixed)
        self.sizes = list(sizes)

    def pick(self, lo, hi, what, hint):
        if what == "size":
            value = self.sizes.pop(0) if len(self.sizes) > 1 else self.sizes[0]
            return max(lo, min(value, hi, self.remaining_bytes()))
        return self.fixed.get(what.replace("-", "_"), lo)


SEEDS = {
    # What qemu.qmp and fdmig's own client send.
    "negotiate": b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1}',
    "negotiate-lines": b'{"execute":"qmp_capabilities","id":1}\r\n{"execute":"query-chardev","id":2}\n',
    "chardev-add": (b'{"execute": "qmp_capabilities"}\n{"execute": "chardev-add", "arguments": {"id": "c0", '
                    b'"backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/run/c0"}}, '
                    b'"server": true, "wait": false}}}, "id": "q\\u00e9{[\\"]}"}'),
    "getfd": b'{"execute":"qmp_capabilities"} {"execute":"getfd","arguments":{"fdname":"fd0"},"id":[1,{"a":null}]}',
    "twice-negotiated": b'{"execute":"qmp_capabilities"}{"execute":"qmp_capabilities","id":2}',
    # Malformed requests, each answered.
    "no-execute": b'{"id": 7}',
    "arguments-list": b'{"execute": "x", "arguments": [], "id": 7}',
    "unexpected-member": b'{"execute": "x", "colour": 1, "id": 7}',
    "exec-oob": b'{"exec-oob": "x", "id": 7, "control": {}}',
    "not-an-object": b'[1, 2, {"execute": "x"}]',
    "not-utf8": b'{"execute": "\xff\xfe"}',
    "stray-tokens": b'true 12 "str" {"execute":"x"} null\n{"execute":"y"}',
    "stray-closers": b'}]{"execute":"x"}]',
    "invalid-bytes": b'{"execute": \x00 "x"}\x80\x81{"execute":"qmp_capabilities"}',
    "unclosed-then-invalid": b'{"execute": "x", "arguments": {\x01{"execute":"y"}',
    "escapes": b'{"execute": "a\\\\", "arguments": {"s": "\\"}{[", "u": "\\ud800\\u0000"}}',
    # Ids of every JSON type, and JSON Python accepts beyond the standard.
    "ids": (b'{"execute":"x","id":null}{"execute":"x","id":1.5e400}{"execute":"x","id":-0.0}'
            b'{"execute":"x","id":NaN}{"execute":"x","id":-Infinity}{"execute":"x","id":{"a":{"b":[]}}}'
            b'{"execute":"x","id":"\\udfff"}{"execute":"x","id":true}'),
    "big-int": b'{"execute": "x", "id": ' + b"9" * 4400 + b"}",
    "nesting-64": b'{"execute": "x", "arguments": {"a": ' + b"[" * 62 + b"]" * 62 + b"}}",
    "nesting-65": b'{"execute": "x", "arguments": {"a": ' + b"[" * 63 + b"]" * 63 + b"}}",
    "duplicate-keys": b'{"execute": "x", "execute": "qmp_capabilities", "id": 1, "id": 2}',
}


def seeds():
    out = [(name, Recorder(data)) for name, data in SEEDS.items()]
    out.append(("negotiate-bytewise", Recorder(SEEDS["negotiate"], sizes=[1])))
    out.append(("chardev-add-reads-of-5", Recorder(SEEDS["chardev-add"], sizes=[5])))
    out.append(("bounded-size", Recorder(SEEDS["negotiate"], sizes=[7], bounded=1, max_size=20, max_depth=4)))
    out.append(("bounded-depth", Recorder(SEEDS["getfd"], bounded=1, max_size=300, max_depth=2)))
    out.append(("bounded-stray", Recorder(b"abcdefghijklmnop {}", sizes=[4], bounded=1, max_size=8, max_depth=8)))
    for _name, rec in out:
        run(rec)
    return [(name, rec.encode(), rec.trace) for name, rec in out]


def write_seeds(directory: str) -> None:
    fuzzcommon.write_seeds(directory, seeds(), run)


if __name__ == "__main__":
    fuzzcommon.main(sys.argv, __file__, TestOneInput, write_seeds, (run, _answer, _check_reply))
