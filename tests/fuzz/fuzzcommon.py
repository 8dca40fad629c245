"""What both fuzz harnesses share: the fuzzer's input as decisions and bytes
(atheris's FuzzedDataProvider, or the same in pure Python when atheris is absent),
the stand-ins that record decisions to make and check seeds, and the entry point.

The harnesses import it as a sibling (`tests/fuzz` is put on sys.path), so they
run as plain scripts, which is how libFuzzer re-runs them for -merge and -jobs.
"""

import os
import sys

try:
    import atheris
except ImportError:  # the in-process corpus replay does not need it
    atheris = None


class PyDataProvider:
    """The part of atheris.FuzzedDataProvider this harness uses, in pure Python and
    with the same results for the same bytes (tests/test_fuzz.py checks that):
    ConsumeIntInRange reads bytes from the end of the input, most significant
    first, as few as the range needs, and reduces modulo the range's size;
    ConsumeBytes reads from the front. Either returns what is left (the minimum,
    or fewer bytes) once the input is used up."""

    def __init__(self, data: bytes):
        self._data = bytes(data)
        self._front = 0
        self._back = len(self._data)

    def remaining_bytes(self) -> int:
        return self._back - self._front

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:
        if lo > hi:
            raise ValueError("lo > hi")
        span = hi - lo
        result = offset = 0
        while offset < 64 and (span >> offset) > 0 and self._back > self._front:
            self._back -= 1
            result = (result << 8) | self._data[self._back]
            offset += 8
        return lo + result % (span + 1) if span < (1 << 64) - 1 else lo + result

    def ConsumeBytes(self, count: int) -> bytes:
        count = max(0, min(count, self.remaining_bytes()))
        out = self._data[self._front:self._front + count]
        self._front += count
        return out


def provider(data: bytes):
    return atheris.FuzzedDataProvider(data) if atheris is not None else PyDataProvider(data)


class Scripted:
    """Base of the seed-making stand-ins for the provider (a harness's Recorder)."""


def decide(fdp, lo: int, hi: int, what: str, hint: int | None = None) -> int:
    """One fuzzer decision. `what` and `hint` only matter when making seeds."""
    if isinstance(fdp, Scripted):
        return fdp.choose(lo, hi, what, hint)
    return fdp.ConsumeIntInRange(lo, hi)


class Recorder(Scripted):
    """Stands in for the provider while a harness's run() plays a seed script,
    and records every decision, so that encode() can build the input that makes
    a real provider take the same ones: the bytes read from the front, the
    decisions from the end. A harness's Recorder says how it picks each value."""

    def __init__(self, data: bytes, fixed: dict):
        self.data, self.fixed = data, fixed
        self.front = 0
        self.ints: list[tuple[int, int, int]] = []
        self.trace: list = []

    def remaining_bytes(self) -> int:
        return len(self.data) - self.front

    def pick(self, lo: int, hi: int, what: str, hint: int | None) -> int:
        raise NotImplementedError

    def choose(self, lo, hi, what, hint=None):
        value = self.pick(lo, hi, what, hint)
        if not lo <= value <= hi:
            raise ValueError(f"{what}={value} outside {lo}..{hi}")
        self.ints.append((lo, hi, value))
        self.trace.append((what, value))
        return value

    def ConsumeBytes(self, count: int) -> bytes:
        if count > self.remaining_bytes() > 0:
            raise ValueError("a seed script asked for more bytes than it has")
        out = self.data[self.front:self.front + count]
        self.front += len(out)
        self.trace.append(("bytes", len(out)))
        return out

    def encode(self) -> bytes:
        tail = bytearray()
        for lo, hi, value in self.ints:
            width = ((hi - lo).bit_length() + 7) // 8
            tail += (value - lo).to_bytes(width, "big")
        return self.data[:self.front] + bytes(reversed(tail))


class Tracer(Scripted):
    """Wraps a real provider and records its decisions, to check a seed."""

    def __init__(self, inner):
        self.inner, self.trace = inner, []

    def remaining_bytes(self):
        return self.inner.remaining_bytes()

    def choose(self, lo, hi, what, hint=None):
        value = self.inner.ConsumeIntInRange(lo, hi)
        self.trace.append((what, value))
        return value

    def ConsumeBytes(self, count):
        out = self.inner.ConsumeBytes(count)
        self.trace.append(("bytes", len(out)))
        return out


def write_seeds(directory: str, seeds, run) -> None:
    """Write `seeds` (name, bytes, recorded decisions), each checked first: the
    real provider must take the recorded decisions on those bytes."""
    os.makedirs(directory, exist_ok=True)
    for name, data, trace in seeds:
        tracer = Tracer(provider(data))
        run(tracer)
        if tracer.trace != trace:
            raise SystemExit(f"seed {name}: replay diverges:\n{trace}\n{tracer.trace}")
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(data)
        print(f"seed-{name}: {len(data)} bytes")


def main(argv: list[str], harness_file: str, test_one_input, make_seeds, instrumented=()) -> None:
    if len(argv) == 3 and argv[1] == "--make-seeds":
        make_seeds(argv[2])
        return
    if atheris is None:
        raise SystemExit("atheris is not installed: pip install atheris")
    for func in instrumented:
        atheris.instrument_func(func)  # the harness's own branches count as coverage too
    # libFuzzer re-runs argv[0] through the shell for -merge, -jobs and -fork:
    # make that this interpreter running this file, executable bit or not.
    argv = [f"{sys.executable} {os.path.abspath(harness_file)}"] + argv[1:]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
