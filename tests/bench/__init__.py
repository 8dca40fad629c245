import statistics


def median_ms(samples) -> float | None:
    """The median of samples in seconds, in milliseconds; None with no sample."""
    return round(statistics.median(samples) * 1000, 3) if samples else None
