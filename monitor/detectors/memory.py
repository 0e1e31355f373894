"""Memory arithmetic for the memory detector: limits and the growth trend. Pure."""

from __future__ import annotations

from collections.abc import Sequence

MIN_TREND_SAMPLES = 4
MIN_TREND_SPAN_S = 1.0


def growth_rate(samples: Sequence[tuple[float, int]]) -> float | None:
    """Least-squares slope of RSS over time (bytes/s), or None with too little evidence."""
    if len(samples) < MIN_TREND_SAMPLES:
        return None
    t0 = samples[0][0]
    span = samples[-1][0] - t0
    if span < MIN_TREND_SPAN_S:
        return None
    n = len(samples)
    xs = [t - t0 for t, _ in samples]
    ys = [float(rss) for _, rss in samples]
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def seconds_to_limit(rss: int, limit: int, rate: float | None) -> float | None:
    """When RSS growing at `rate` crosses `limit`, or None if it is not growing toward it."""
    if rate is None or rate <= 0 or rss >= limit:
        return None
    return (limit - rss) / rate


def human_bytes(value: float) -> str:
    """1536 -> '1.5 KiB', for finding details."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover
