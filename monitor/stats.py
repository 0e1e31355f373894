"""Plain counters the ingest path keeps; the Prometheus exporter reads them at scrape."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class IngestStats:
    """What the ingest path saw, as plain numbers (cheaper than a metric object per event)."""

    received: Counter[str] = field(default_factory=Counter)
    """Events by `type` ("invalid" when the event could not be parsed)."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejected events (and bodies) by reason."""
    duplicates: int = 0
    accepted: int = 0
    store_failures: int = 0
    sink_failures: Counter[str] = field(default_factory=Counter)
    """Exceptions raised by a sink (an exporter), by sink name."""
    exporter_failures: Counter[str] = field(default_factory=Counter)
    """Exports a backend failed (OTLP down, ...), by exporter."""
    spans_finished: int = 0
    """Spans handed to the span processor."""
    spans_exported: int = 0
    """Spans a backend accepted: the gap to spans_finished is queued, dropped or failed."""
    ingest_lag_s: float = 0.0
    """Receipt time minus `ts` of the newest event that carried a `ts` in the last batch that
    had one: how far behind the senders' reports arrive (buffering, retries, clock skew)."""
