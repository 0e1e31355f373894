"""The ingest path: decode, validate, apply, commit durably, then fan out to the sinks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog

from exporters.traces import TraceIds
from monitor.detectors.breaker import Breaker
from monitor.detectors.engine import Detectors, Record
from monitor.errors import DuplicateEvent, ForbiddenField, OtherTenant, Rejection
from monitor.events import EventType, decode_body, parse_beat, parse_event
from monitor.model import Execution, Key
from monitor.server.stream import Broadcaster
from monitor.states import StateNames
from monitor.stats import IngestStats
from monitor.store import Changes, Store

log = structlog.get_logger("execwatch.ingest")

Sink = Callable[[Sequence[Record]], None]
"""Receives every batch of records (exporters, the live stream). Must not block."""


@runtime_checkable
class Deferrable(Protocol):
    """A sink nobody reads the moment a record arrives (metrics, read at scrape): during a
    detector sweep it is handed each slice's records to keep, and counts them once the
    sweep is over, so the sinks that announce (logs, the stream) see every slice sooner.
    It must count what it keeps before anything reads it, and before newer records."""

    def __call__(self, records: Sequence[Record]) -> None: ...

    def defer(self, records: Sequence[Record]) -> None: ...

    def settle(self) -> None: ...


_HEARTBEAT = EventType.HEARTBEAT
PID_NEEDS_ALL_TENANTS = (
    "the daemon samples that process's memory and may signal it, and a one-tenant token "
    'must not reach another tenant\'s processes; send pids with a "*" token'
)
MAX_REJECTIONS_SHOWN = 100
"""An answer lists at most this many rejections; `rejected_omitted` counts the rest."""
YIELD_EVERY = 500
"""Events applied between two yields to the event loop, so one big batch cannot starve
the heartbeats of everyone else."""


@dataclass(slots=True)
class IngestResult:
    """The answer to one POST /v1/events."""

    status: int
    body: dict[str, Any]


def sink_name(sink: Sink) -> str:
    """A sink's name for metrics and logs: its class, or its function's name."""
    name = getattr(sink, "name", None)
    if isinstance(name, str):
        return name
    return getattr(sink, "__qualname__", type(sink).__name__)


@dataclass(slots=True)
class _Taken:
    """What one commit took: the changes to write, and what to give back if it fails."""

    records: Sequence[Record]
    seq: int = 0
    changes: Changes | None = None
    dirty: dict[Key, Execution] = field(default_factory=dict)
    breakers: dict[tuple[str, str], Breaker] = field(default_factory=dict)


class StoreUnavailable(Exception):
    """The store failed to commit; the changes stay owed to the next commit."""


class BatchTooLarge(Rejection):
    """More events in one body than `max_batch_events`."""

    status = 413
    reason = "batch_too_large"


class Ingestor:
    """Owns the write path: registry.apply under one clock reading per request, then commit."""

    def __init__(
        self,
        detectors: Detectors,
        store: Store,
        names: StateNames,
        sinks: Sequence[Sink] = (),
        max_batch_events: int = 10000,
    ) -> None:
        self.detectors = detectors
        self.registry = detectors.registry
        self.store = store
        self.names = names
        self.max_batch_events = max_batch_events
        self.stats = IngestStats()
        self.sinks: list[Sink] = []
        self._deferrable: set[int] = set()
        """id() of the sinks that are Deferrable."""
        self.set_sinks(sinks)
        self.write_lock = asyncio.Lock()
        """Held while a request applies its events and takes its changes, and by every
        other committer while it takes: a request is one commit, never split."""
        self.traces: TraceIds | None = None
        """Set when spans are exported: their contexts are committed with the rest."""
        self.publish: Broadcaster | None = None
        """The live stream: fed only what is committed (the other sinks mirror memory)."""
        self.unpublished: list[Record] = []
        """Records of failed commits, published with the next commit that succeeds (at
        most the stream's ring_size: beyond, the stream is told of a gap)."""
        self.lost_unpublished = False
        self.fast_beats = True
        """Take the common heartbeat by `parse_beat` and `Registry.beat`; off, every event
        takes the general path, which is what the fast path is tested against."""
        self._takes = 0
        self._owed_from = 0
        """Takes numbered from here on carry the changes a failed commit gave back."""

    def set_sinks(self, sinks: Sequence[Sink]) -> None:
        """Feed records to `sinks`, in order; their failure counts start at 0."""
        self.sinks = list(sinks)
        self._deferrable = {id(sink) for sink in self.sinks if isinstance(sink, Deferrable)}
        for sink in self.sinks:
            self.stats.sink_failures.setdefault(sink_name(sink), 0)

    def set_publish(self, publish: Broadcaster) -> None:
        """Feed `publish` (the live stream) each commit's records once it succeeded."""
        self.publish = publish
        self.stats.sink_failures.setdefault(sink_name(publish), 0)

    async def ingest(
        self, body: bytes, content_type: str, now: float, tenant: str | None = None
    ) -> IngestResult:
        """Apply every good event of `body` at daemon time `now`; reject the rest by index.

        `tenant` is the tenant the caller's token is bound to: events default to it, and
        one that names another is rejected 403. None: events may name any tenant.

        Raises BodyError when the body is not JSON/NDJSON at all, BatchTooLarge over
        `max_batch_events`, StoreUnavailable when the durable commit failed.
        """
        decoded = decode_body(body, content_type)
        items = decoded.items
        if len(items) > self.max_batch_events:
            raise BatchTooLarge(
                f"the body holds {len(items)} events; at most {self.max_batch_events} "
                "(max_batch_events) are taken in one request: split the batch"
            )
        registry, names, stats = self.registry, self.names, self.stats
        apply, apply_beat, stopping = self.detectors.apply, registry.beat, registry.stopping
        fast = self.fast_beats
        # Side records (a finding cleared, a breaker moved) go out right where they
        # happened, between the transitions of the events that caused them.
        during, after, place = registry.outbox, self.detectors.outbox, self.detectors.place
        accepted = heartbeats = invalid = duplicates = 0
        rejected: list[dict[str, Any]] = []
        named: dict[Key, None] = {}
        records: list[Record] = []
        newest_ts = None
        # The lock makes the request one commit: a tick or another request committing
        # while this one yields between slices cannot take half of its changes.
        async with self.write_lock:
            for index, item in enumerate(items):
                if not index % YIELD_EVERY and index:
                    await asyncio.sleep(0)
                beat = parse_beat(item, tenant) if fast else None
                if beat is not None and apply_beat(beat, now):
                    # The common heartbeat, to a live execution: what apply() would do.
                    heartbeats += 1
                    accepted += 1
                    if during or after:
                        place(records)  # its progress ended a `stalled` finding
                    if stopping and beat[0] in stopping:
                        named[beat[0]] = None
                    continue
                try:
                    event = parse_event(item, now, names, tenant)  # raises an NDJSON line's
                    if tenant is not None:
                        if event.tenant != tenant:
                            raise OtherTenant(tenant, event.tenant)  # never applied or named
                        if event.pid is not None:
                            raise ForbiddenField("pid", PID_NEEDS_ALL_TENANTS)
                except Rejection as exc:
                    invalid += 1
                    self._reject(rejected, index, exc)
                    continue
                if event.type is _HEARTBEAT:
                    heartbeats += 1
                if event.at != now and (newest_ts is None or event.at > newest_ts):
                    newest_ts = event.at
                try:
                    transition = apply(event, now)
                except DuplicateEvent:
                    duplicates += 1
                except Rejection as exc:
                    self._reject(rejected, index, exc)
                else:
                    accepted += 1
                    if transition is not None:
                        records.append(transition)
                    if during or after:
                        place(records)
                if stopping:
                    key = (event.tenant, event.execution_id)
                    if key in stopping:
                        named[key] = None
            # Counted once per batch: a Counter update per event costs more than the rest of
            # the loop's bookkeeping together (and Counter.update() more than three adds).
            received = stats.received
            received["heartbeat"] += heartbeats
            received["state"] += len(items) - heartbeats - invalid
            received["invalid"] += invalid
            stats.accepted += accepted
            stats.duplicates += duplicates
            if newest_ts is not None:
                stats.ingest_lag_s = max(0.0, now - newest_ts)
            registry.evict(now)
            taken = self._take(records, False)
        await self._write(taken)

        answer: dict[str, Any] = {
            "accepted": accepted,
            "duplicates": duplicates,
            "rejected": rejected,
            "directives": [
                {"execution_id": key[1], "action": "cancel", "reason": stopping[key]}
                for key in named
                if key in stopping
            ]
            if named
            else [],
        }
        omitted = len(items) - accepted - duplicates - len(rejected)
        if omitted:
            answer["rejected_omitted"] = omitted
        status = rejected[0]["status"] if decoded.single and rejected else 202
        return IngestResult(status, answer)

    async def sweep(self, step: Callable[[], Sequence[Record]]) -> None:
        """Run `step` (a slice of a detector sweep) under the write lock and commit what it
        made: a sweep never lands in the middle of a request that is between two of its
        slices, so the stream shows its records in the order they happened. Deferrable
        sinks keep the records until `settle()`, which the sweep's caller owes."""
        async with self.write_lock:
            taken = self._take(step(), False)
        await self._write(taken, defer=True)

    def settle(self) -> None:
        """Have the Deferrable sinks count what they kept (the end of a sweep)."""
        for sink in self.sinks:
            if id(sink) in self._deferrable:
                try:
                    sink.settle()  # type: ignore[attr-defined]
                except Exception:
                    self._sink_failed(sink)

    async def commit(self, records: Sequence[Record] = (), *, checkpoint: bool = False) -> None:
        """Make every owed change durable, then hand `records` and the registry's side
        records to every sink. Nothing is acknowledged before this returns.

        With `checkpoint`, also write the liveness facts (heartbeat times, progress, rss,
        seq) that heartbeats changed since the last checkpoint."""
        async with self.write_lock:
            taken = self._take(records, checkpoint)
        await self._write(taken)

    def _reject(self, rejected: list[dict[str, Any]], index: int, exc: Rejection) -> None:
        """Count a rejected event, and list it while the answer has room."""
        self.stats.rejected[exc.reason] += 1
        if len(rejected) < MAX_REJECTIONS_SHOWN:
            rejected.append(
                {"index": index, "status": exc.status, "reason": exc.reason, "error": exc.message}
            )

    def _take(self, records: Sequence[Record], checkpoint: bool) -> _Taken:
        """Take every owed change out of the registry, detectors and traces. Callers hold
        `write_lock`, so no request is ever taken half applied."""
        registry, detectors = self.registry, self.detectors
        seq = self._takes
        self._takes += 1
        side = detectors.drain()
        if side:
            records = [*records, *side]
        touched = registry.take_touched() if checkpoint else []
        spans = self.traces.take_unsaved() if self.traces is not None else []
        if not (
            spans
            or registry.dirty
            or registry.evicted
            or detectors.dirty_breakers
            or detectors.forgotten_breakers
            or touched
        ):
            return _Taken(records, seq)
        dirty, evicted = registry.take_changes()
        breakers, forgotten = detectors.take_breaker_changes()
        changes = Changes(
            records, list(dirty.values()), evicted, list(breakers.values()), forgotten, spans,
            touched,
        )  # fmt: skip
        return _Taken(records, seq, changes, dirty, breakers)

    async def _write(self, taken: _Taken, defer: bool = False) -> None:
        changes, committed = taken.changes, False
        try:
            if changes is not None:
                try:
                    await self.store.commit(changes)
                except Exception as exc:
                    self._give_back(taken)
                    self.stats.store_failures += 1
                    log.exception("store_commit_failed", executions=len(changes.executions))
                    raise StoreUnavailable(str(exc)) from exc
            committed = True
        finally:
            # The sinks mirror the registry, which changed whether or not the store kept up.
            if taken.records:
                self.fan_out(taken.records, defer)
            # The stream promises what is committed: a failed commit's records wait.
            if self.publish is not None and (taken.records or self.unpublished):
                carries_owed = taken.changes is not None and taken.seq >= self._owed_from
                if committed and (not self.unpublished or carries_owed):
                    owed, self.unpublished = self.unpublished, []
                    if self.lost_unpublished:
                        self.lost_unpublished = False
                        self.publish.gap()
                    self._publish([*owed, *taken.records] if owed else taken.records)
                else:
                    if not committed:
                        self._owed_from = self._takes  # the next take carries what was given back
                    self.unpublished += taken.records
                    excess = len(self.unpublished) - self.publish.settings.ring_size
                    if excess > 0:
                        del self.unpublished[:excess]
                        self.lost_unpublished = True

    def _publish(self, records: Sequence[Record]) -> None:
        assert self.publish is not None
        try:
            self.publish(records)
        except Exception:
            name = sink_name(self.publish)
            self.stats.sink_failures[name] += 1
            log.exception("sink_failed", sink=name)

    def _give_back(self, taken: _Taken) -> None:
        """A commit failed: everything it took is owed to the next one."""
        changes = taken.changes
        assert changes is not None
        registry = self.registry
        registry.return_changes(taken.dirty, list(changes.evicted))
        self.detectors.return_breaker_changes(taken.breakers, list(changes.forgotten_breakers))
        for ex in changes.liveness:
            registry.touched.setdefault(ex.key, ex)
        if self.traces is not None:
            self.traces.return_unsaved(list(changes.span_contexts))

    def fan_out(self, records: Sequence[Record], defer: bool = False) -> None:
        """Give `records` to every sink (with `defer`, to keep, if it is Deferrable); a
        sink that raises is logged and skipped."""
        deferrable = self._deferrable if defer else ()
        for sink in self.sinks:
            try:
                if id(sink) in deferrable:
                    sink.defer(records)  # type: ignore[attr-defined]
                else:
                    sink(records)
            except Exception:
                self._sink_failed(sink)

    def _sink_failed(self, sink: Sink) -> None:
        name = sink_name(sink)
        self.stats.sink_failures[name] += 1
        log.exception("sink_failed", sink=name)
