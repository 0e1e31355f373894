"""Plain counters the ingest path keeps; the Prometheus exporter reads them at scrape."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

REJECTION_REASONS = (
    "invalid_body", "batch_too_large", "invalid_event", "invalid_json", "missing_field",
    "unknown_field", "invalid_field", "unknown_state", "unknown_execution", "agent_mismatch",
    "kind_mismatch", "invalid_transition", "final_state", "stale_seq", "forbidden_tenant",
    "forbidden_field",
)  # fmt: skip
"""Every reason a rejection can carry: its series start at 0."""
SHED_REASONS = ("ingest_in_flight", "stream_consumers")
"""Why a request can be shed (answered 503 before any work)."""
AUTH_FAILURES = ("missing_token", "invalid_token", "forbidden_tenant")
"""Why a request can be refused 401 (no token, a bad one) or 403 (another tenant)."""


@dataclass(slots=True)
class StreamStats:
    """What GET /v1/stream did: events published, consumers open, dropped and reset."""

    published: int = 0
    consumers: int = 0
    dropped: int = 0
    """Consumers let go because their socket stopped taking data."""
    resets: int = 0
    """Reconnects told to re-list: what they missed had left the ring, or the daemon restarted."""


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
    auth_failures: Counter[str] = field(
        default_factory=lambda: Counter(dict.fromkeys(AUTH_FAILURES, 0))
    )
    """Requests refused by authentication (401) or tenant isolation (403), by reason."""
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
    stream: StreamStats = field(default_factory=StreamStats)
    ingest_lag_s: float = 0.0
    """Receipt time minus `ts` of the newest event that carried a `ts` in the last batch that
    had one: how far behind the senders' reports arrive (buffering, retries, clock skew)."""
