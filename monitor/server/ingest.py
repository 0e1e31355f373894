"""The ingest path: decode, validate, apply, commit durably, then fan out to the sinks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from monitor.errors import DuplicateEvent, Rejection
from monitor.events import EventType, decode_body, parse_event
from monitor.registry import Execution, Registry, Transition
from monitor.states import StateNames
from monitor.store import Changes, Store

log = structlog.get_logger("execwatch.ingest")

Sink = Callable[[Sequence[Transition]], None]
"""Receives every committed batch of transitions (exporters, the live stream). Must not block."""

_HEARTBEAT = EventType.HEARTBEAT


@dataclass(slots=True)
class IngestStats:
    """Counts of what the ingest path saw; the Prometheus exporter reads them at scrape."""

    received: Counter[str] = field(default_factory=Counter)
    """Events by `type` ("invalid" when the type itself was missing or wrong)."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejected events by reason."""
    duplicates: int = 0
    accepted: int = 0
    store_failures: int = 0
    sink_failures: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class IngestResult:
    """The answer to one POST /v1/events."""

    status: int
    body: dict[str, Any]


class StoreUnavailable(Exception):
    """The store failed to commit; the events are applied in memory but not durable."""


class Ingestor:
    """Owns the write path: registry.apply under one clock reading per request, then commit."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        names: StateNames,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.registry = registry
        self.store = store
        self.names = names
        self.sinks = list(sinks)
        self.stats = IngestStats()

    async def ingest(
        self, body: bytes, content_type: str, now: float, tenant: str | None = None
    ) -> IngestResult:
        """Apply every good event of `body` at daemon time `now`; reject the rest by index.

        Raises BodyError when the body is not JSON/NDJSON at all, StoreUnavailable when
        the durable commit failed.
        """
        decoded = decode_body(body, content_type)
        registry, names, stats = self.registry, self.names, self.stats
        apply = registry.apply
        accepted = heartbeats = invalid = duplicates = 0
        rejected: list[dict[str, Any]] = []
        transitions: list[Transition] = []
        for index, item in enumerate(decoded.items):
            event = None
            try:
                if isinstance(item, Rejection):
                    raise item
                event = parse_event(item, now, names, tenant)
                transition = apply(event, now)
                if transition is not None:
                    transitions.append(transition)
                accepted += 1
            except DuplicateEvent:
                duplicates += 1
            except Rejection as exc:
                stats.rejected[exc.reason] += 1
                rejected.append(
                    {
                        "index": index,
                        "status": exc.status,
                        "reason": exc.reason,
                        "error": exc.message,
                    }
                )
            if event is None:
                invalid += 1
            elif event.type is _HEARTBEAT:
                heartbeats += 1
        # Counted once per batch: a Counter update per event costs more than the rest of
        # the loop's bookkeeping together.
        states = len(decoded.items) - heartbeats - invalid
        stats.received.update(heartbeat=heartbeats, state=states, invalid=invalid)
        stats.accepted += accepted
        stats.duplicates += duplicates

        await self.commit(transitions, registry.evict(now))

        status = 202
        if decoded.single and rejected:
            status = rejected[0]["status"]
        return IngestResult(
            status,
            {
                "accepted": accepted,
                "duplicates": duplicates,
                "rejected": rejected,
                "directives": [],
            },
        )

    async def commit(
        self, transitions: Sequence[Transition], evicted: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Make `transitions` durable, then hand them to every sink."""
        if not transitions and not evicted:
            return
        touched: dict[tuple[str, str], Execution] = {}
        for transition in transitions:
            ex = self.registry.get(transition.tenant, transition.execution_id)
            if ex is not None:
                touched[ex.key] = ex
        try:
            await self.store.commit(Changes(transitions, list(touched.values()), evicted))
        except Exception as exc:
            self.stats.store_failures += 1
            log.exception("store_commit_failed", transitions=len(transitions))
            raise StoreUnavailable(str(exc)) from exc
        if transitions:
            self.fan_out(transitions)

    def fan_out(self, transitions: Sequence[Transition]) -> None:
        """Give `transitions` to every sink; a sink that raises is logged and skipped."""
        for sink in self.sinks:
            try:
                sink(transitions)
            except Exception:
                name = getattr(sink, "__qualname__", type(sink).__name__)
                self.stats.sink_failures[name] += 1
                log.exception("sink_failed", sink=name)
