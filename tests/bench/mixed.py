"""Mixed load on one host: N chardevs, S of them streaming ping-pong from a process
of their own, the others idle; handoffs over QMP. For each mix, the peers' longest
pause against the same with no handoff plus the downtime, and where each
handoff's longest pause fell: what the instances were doing meanwhile (their
spans, fdmig.marks), the span that covered most of it first.

    python -m tests.bench.mixed [STREAMING:CHARDEVS ...] [--repeats R]
"""

import argparse
import sys
import tempfile

from tests.bench import compile_fdmig, handoff, median_ms

MIXES = ((8, 1000), (50, 1000), (8, 3000), (50, 3000), (8, 5000), (50, 5000))


def measure(streaming: int, n: int, repeats: int, workdir: str) -> dict:
    h = handoff.measure_handoff(n, repeats, workdir, streams=streaming, where=True)
    # Each handoff's own ratio too: the goal is for every run, not only the median.
    ratios = [round(p / (q + d), 2) for p, q, d in zip(h["pause"], h["quiet-pause"], h["qmp-downtime"])]
    return {"n": n, "streaming": h["streams"], "repeats": repeats,
            "downtime-ms": median_ms(h["downtime"]), "peer-pause-ms": median_ms(h["pause"]),
            "quiet-pause-ms": median_ms(h["quiet-pause"]), "ratios": ratios, "where": h["where"],
            "marked": h["marked"]}


def parse_mixes(texts) -> list[tuple[int, int]]:
    """(streaming, chardevs) of each STREAMING:CHARDEVS."""
    return [tuple(map(int, text.split(":"))) for text in texts if text]


def cause(where: dict) -> str:
    """The span that covered most of one longest pause, with how much of it."""
    if not where["spans"]:
        return f"none ({where['gap-ms']:.1f} ms)"
    name, ms = next(iter(where["spans"].items()))
    return f"{name} {ms:.1f} of {where['gap-ms']:.1f} ms"


def markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["### Mixed load", "",
             "N chardevs, S of them streaming ping-pong, the rest idle; handoffs over QMP (tests/bench/mixed.py). "
             "Ratio: the longest pause against the longest with no handoff (a window as long) plus the "
             "downtime, of the medians, then of each handoff. Where: what covered most of each handoff's "
             "longest pause (fdmig.marks: the instances' paced work, turns of serving over 0.5 ms, collections, "
             "the downtime's steps).", "",
             "| chardevs | streaming | downtime | longest pause | no handoff | ratio | each handoff | where |",
             "|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        ratio = row["peer-pause-ms"] / (row["quiet-pause-ms"] + row["downtime-ms"])
        lines.append(f"| {row['n']} | {row['streaming']} | {row['downtime-ms']} ms | {row['peer-pause-ms']} ms | "
                     f"{row['quiet-pause-ms']} ms | {ratio:.2f} | {', '.join(map(str, row['ratios']))} | "
                     f"{'; '.join(map(cause, row['where']))} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.mixed", description=__doc__.splitlines()[0])
    parser.add_argument("mixes", nargs="*", help="STREAMING:CHARDEVS (default: 8 and 50 among 1000, 3000, 5000)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    mixes = parse_mixes(args.mixes) or MIXES
    compile_fdmig()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fdm-mix-", dir="/tmp") as workdir:
        for streaming, n in mixes:
            print(f"{streaming} streaming among {n} ...", file=sys.stderr, flush=True)
            rows.append(measure(streaming, n, args.repeats, tempfile.mkdtemp(dir=workdir)))
    print("\n".join(markdown(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
