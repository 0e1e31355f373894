"""Exposition of execwatch's own families: Prometheus text and OpenMetrics, fast.

prometheus_client builds a Sample (a namedtuple with a dict of labels) per series and
re-escapes every label on every scrape: ~5 us to build and ~6 us to render a series,
so 11k series took ~110 ms (measured). Here a family is a list of plain tuples, and the
`name{labels}` part of every series is rendered once and cached (series repeat from
scrape to scrape). Values and exemplars are formatted with prometheus_client's own
functions, and a test checks that both formats come out byte for byte as
prometheus_client's encoders write the same families.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    Exemplar,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString as _go_float


def floatToGoString(value: float) -> str:
    """prometheus_client's own value formatting (typed)."""
    text: str = _go_float(value)  # type: ignore[no-untyped-call]
    return text


Sample = tuple[str, tuple[str, ...], float, Exemplar | None]
"""(suffix, label values, value, exemplar): `_bucket` samples carry `le` as a last value."""
MAX_CACHED = 200_000


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class Family:
    """One metric family: name (counters without `_total`), type, help and samples."""

    __slots__ = ("help", "kind", "label_names", "name", "samples")

    def __init__(self, name: str, kind: str, help_text: str, label_names: Sequence[str] = ()):
        self.name = name
        self.kind = kind
        self.help = help_text
        self.label_names = tuple(label_names)
        self.samples: list[Sample] = []

    def add(self, values: Sequence[str], value: float) -> None:
        """A gauge or counter sample."""
        self.samples.append(
            ("_total" if self.kind == "counter" else "", tuple(values), value, None)
        )

    def add_histogram(
        self,
        values: Sequence[str],
        buckets: Iterable[tuple[str, float, Exemplar | None]],
        total: float,
    ) -> None:
        """A histogram series: cumulative buckets (le, count, exemplar), then count, sum."""
        values = tuple(values)
        count = 0.0
        for bound, count, exemplar in buckets:
            self.samples.append(("_bucket", (*values, bound), count, exemplar))
        self.samples.append(("_count", values, count, None))
        self.samples.append(("_sum", values, total, None))

    def to_prometheus(self) -> Metric:
        """The same family as prometheus_client's own types (the reference for tests)."""
        names = list(self.label_names)
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.help, labels=names)
            series: dict[tuple[str, ...], list[Any]] = {}
            for suffix, values, value, exemplar in self.samples:
                key = values[:-1] if suffix == "_bucket" else values
                entry = series.setdefault(key, [[], 0.0])
                if suffix == "_bucket":
                    bucket = (
                        (values[-1], value) if exemplar is None else (values[-1], value, exemplar)
                    )
                    entry[0].append(bucket)
                elif suffix == "_sum":
                    entry[1] = value
            for key, (buckets, total) in series.items():
                histogram.add_metric(list(key), buckets, total)
            return histogram
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = cls(self.name, self.help, labels=names)
        for _, values, value, _ in self.samples:
            family.add_metric(list(values), value)
        return family


class Encoder:
    """Renders families, caching each series' `name{labels}` prefix across scrapes."""

    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, tuple[str, ...], tuple[str, ...]], str] = {}

    def _prefix(self, name: str, label_names: tuple[str, ...], values: tuple[str, ...]) -> str:
        key = (name, label_names, values)
        prefix = self._prefixes.get(key)
        if prefix is None:
            if len(self._prefixes) > MAX_CACHED:
                self._prefixes.clear()
            if values:
                pairs = sorted(zip(label_names, values, strict=True))
                prefix = name + "{" + ",".join(f'{k}="{_label(v)}"' for k, v in pairs) + "}"
            else:
                prefix = name
            self._prefixes[key] = prefix
        return prefix

    def render(self, families: Iterable[Family], openmetrics: bool) -> str:
        """The families in Prometheus text, or in OpenMetrics (without the final `# EOF`)."""
        out: list[str] = []
        append = out.append
        prefix_of = self._prefix
        for family in families:
            name, kind = family.name, family.kind
            if openmetrics:
                append(f"# HELP {name} {_label(family.help)}\n# TYPE {name} {kind}\n")
            else:
                shown = name + "_total" if kind == "counter" else name
                help_text = family.help.replace("\\", r"\\").replace("\n", r"\n")
                append(f"# HELP {shown} {help_text}\n# TYPE {shown} {kind}\n")
            names = family.label_names
            bucket_names = (*names, "le")
            for suffix, values, value, exemplar in family.samples:
                prefix = prefix_of(
                    name + suffix, bucket_names if suffix == "_bucket" else names, values
                )
                if openmetrics and exemplar is not None:
                    labels = ",".join(
                        f'{k}="{_label(v)}"' for k, v in sorted(exemplar.labels.items())
                    )
                    tail = f" # {{{labels}}} {floatToGoString(exemplar.value)}"
                    if exemplar.timestamp is not None:
                        tail += f" {exemplar.timestamp}"
                    append(f"{prefix} {floatToGoString(value)}{tail}\n")
                else:
                    append(f"{prefix} {floatToGoString(value)}\n")
        return "".join(out)
