import compileall
import os
import resource
import statistics

import fdmig


def compile_fdmig() -> None:
    """Write fdmig's bytecode, as installing it does: with PYTHONDONTWRITEBYTECODE
    set, every fdmig process would otherwise compile each changed module again."""
    compileall.compile_dir(os.path.dirname(fdmig.__file__), quiet=1)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, for this process and those it
    starts (thousands of chardevs, their peers); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def median_ms(samples) -> float | None:
    """The median of samples in seconds, in milliseconds; None with no sample."""
    return round(statistics.median(samples) * 1000, 3) if samples else None
