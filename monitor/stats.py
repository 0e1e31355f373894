"""Plain counters the ingest path keeps; the Prometheus exporter reads them at scrape."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

REJECTION_REASONS = (
    "invalid_body", "batch_too_large", "invalid_event", "invalid_json", "missing_field",
    "unknown_field", "invalid_field", "unknown_state", "unknown_execution", "agent_mismatch",
    "kind_mismatch", "invalid_transition", "final_state", "stale_seq",
)  # fmt: skip
"""Every reason a rejection can carry: its series start at 0."""
SHED_REASONS = ("ingest_in_flight",)
"""Why a request can be shed (answered 503 before any work)."""


@dataclass(slots=True)
class IngestStats:
    """What the ingest path saw, as plain numbers (cheaper than a metric object per event)."""

    received: Counter[str] = field(default_factory=Counter)
    """Events by `type` ("invalid" when the event could not be parsed)."""
    rejected: Counter[str] = field(
        default_factory=lambda: Counter(dict.fromkeys(REJECTION_REASONS, 0))
    )
    """Rejected events (and bodies) by reason."""
    duplicates: int = 0
    shed: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(SHED_REASONS, 0)))
    """Requests answered 503 + Retry-After before any work, by reason."""
    in_flight: int = 0
    """POST /v1/events requests being applied or committed right now."""
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
