"""Prometheus: one collector over the live state and the counted records, per app.

Gauges are read from the registry and detectors at scrape time. Counters and
histograms count true events, either from the records every batch produces (the
sink) or from the plain counters the ingest path keeps. Everything renders through
prometheus_client from one CollectorRegistry per app. Labels are bounded: `agent`
is capped (the rest fold into `__overflow__`, counted), no execution id is ever a
label, and `tenant` is one only when `[metrics] tenants` names an allowlist (every other
tenant folds into `__other__`).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import Exemplar, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from exporters.exposition import Encoder, Family
from exporters.logs import dropped_lines
from monitor import __version__
from monitor.detectors.breaker import BreakerState, BreakerTransition
from monitor.detectors.engine import Detectors, Record
from monitor.model import Execution, FindingChange, Key, Transition
from monitor.states import LIVE, TERMINAL, ExecState
from monitor.stats import IngestStats

log = structlog.get_logger("execwatch.metrics")

OVERFLOW = "__overflow__"
OTHER_TENANT = "__other__"
STATES = [s.value for s in ExecState if s in LIVE or s is ExecState.DEAD]
"""The states `execwatch_executions` reports: the live ones, and dead."""
FINISHED = [s.value for s in ExecState if s in TERMINAL]
BREAKER_STATES = [s.value for s in BreakerState]
SEVERITY = {"closed": 0, "half_open": 1, "open": 2}
"""Which breaker state wins when several breakers share an agent label."""
DETECTOR = {
    "start_timeout": "timeout",
    "run_timeout": "timeout",
    "total_timeout": "timeout",
    "heartbeat": "heartbeat",
    "stalled": "stall",
    "memory_high": "memory",
    "memory_exceeded": "memory",
    "memory_trend": "memory",
    "circuit_open": "breaker",
}
"""Every detection reason and the detector that makes it."""
FINDINGS = ["stalled", "memory_high", "memory_exceeded", "memory_trend"]
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
"""Executions run seconds to hours."""
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Detection lag: the target is 0.1 s at p99, the promise 0.5 s."""
PerAgent = dict[tuple[str, str], int]
"""Counts per (tenant, agent), as the registry and detectors hand them over."""
MAX_OVERFLOWED = 100_000
"""Distinct overflowed agent names remembered for the overflow count (then it saturates)."""
MAX_GROUPS_CACHED = 4096
"""(tenant, agent) pairs whose Group is remembered; past it the memory starts over."""


Group = tuple[str, ...]
"""The leading label values of a per-agent series: (agent,), or (tenant, agent) when a
tenant allowlist is configured."""


class AgentLabels:
    """Maps (tenant, agent) to the leading label values of per-agent series.

    The first `cap` agent names seen keep their name, later ones fold into `__overflow__`.
    With `tenants` (an allowlist), series lead with a `tenant` label: one of those names,
    or `__other__`; without, tenants are not told apart.
    """

    def __init__(self, cap: int, tenants: Sequence[str] = ()) -> None:
        self.cap = cap
        self.tenants = frozenset(tenants)
        self.names: list[str] = ["tenant", "agent"] if tenants else ["agent"]
        """The label names the values of __call__ go with."""
        self._known: set[str] = set()
        self._overflowed: set[str] = set()
        self.groups: dict[tuple[str, str], Group] = {}
        """(tenant, agent) -> the Group __call__ gave it. A pair's Group never changes (a
        kept name stays kept, the cap only fills), so a hot loop may read this first:
        `groups.get(pair) or labels(*pair)` skips two Python calls per record."""

    def __call__(self, tenant: str, agent: str) -> Group:
        group = self.groups.get((tenant, agent))
        if group is None:
            group = self._group(tenant, agent)
            if len(self.groups) >= MAX_GROUPS_CACHED:
                self.groups.clear()  # agent and tenant names come from clients
            self.groups[(tenant, agent)] = group
        return group

    def _group(self, tenant: str, agent: str) -> Group:
        label = self.agent(agent)
        if not self.tenants:
            return (label,)
        return (tenant if tenant in self.tenants else OTHER_TENANT, label)

    def agent(self, agent: str) -> str:
        if agent in self._known:
            return agent
        if len(self._known) < self.cap:
            self._known.add(agent)
            return agent
        if len(self._overflowed) < MAX_OVERFLOWED:
            self._overflowed.add(agent)
        return OVERFLOW

    @property
    def overflowed(self) -> int:
        """Distinct agent names folded into `__overflow__` so far."""
        return len(self._overflowed)


class Histogram:
    """Bucket counts, sum and the latest exemplar per bucket, for one label set."""

    __slots__ = ("bounds", "counts", "exemplars", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.exemplars: list[Exemplar | None] = [None] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        index = bisect.bisect_left(self.bounds, value)
        self.counts[index] += 1
        self.total += value
        if exemplar:
            self.exemplars[index] = Exemplar(exemplar, value, time.time())

    def buckets(self) -> list[tuple[str, float, Exemplar | None]]:
        """(le, cumulative count, exemplar) per bucket, +Inf last."""
        cumulative = 0
        out: list[tuple[str, float, Exemplar | None]] = []
        for bound, count, exemplar in zip(
            [*map(_float, self.bounds), "+Inf"], self.counts, self.exemplars, strict=True
        ):
            cumulative += count
            out.append((bound, float(cumulative), exemplar))
        return out


def _float(value: float) -> str:
    return repr(float(value))


class MetricsSink:
    """Counts the true events in every batch of records (a sink of the ingest path)."""

    name = "prometheus"

    def __init__(
        self,
        labels: AgentLabels,
        lookup: Callable[[Key], Execution | None],
        trace_id: Callable[[Key, Execution], str | None],
        drain: Callable[[], tuple[PerAgent, PerAgent]] = lambda: ({}, {}),
        traced: Callable[[], bool] = lambda: True,
    ) -> None:
        """`lookup` finds an execution and `trace_id` gives its trace worth an exemplar, or
        None; `traced` says whether any execution may have a trace at all (when not, no
        execution is looked up)."""
        self.labels = labels
        self._traced = traced
        self._drain = drain
        self._lookup = lookup
        self._trace_id = trace_id
        # Keys lead with the Group of AgentLabels: (agent, ...) or (tenant, agent, ...).
        self.started: dict[Group, int] = {}
        """(*group, kind)."""
        self.finished: dict[Group, int] = {}
        """(*group, kind, state)."""
        self.detections: dict[Group, int] = {}
        """(*group, detector, reason)."""
        self.revivals: dict[Group, int] = {}
        self.heartbeats: dict[Group, int] = {}
        """Totals per group, drained from the registry (bounded by the label caps)."""
        self.not_permitted: dict[Group, int] = {}
        self.durations: dict[Group, Histogram] = {}
        """(*group, kind, state)."""
        self.lags: dict[str, Histogram] = {
            d: Histogram(LAG_BUCKETS) for d in set(DETECTOR.values())
        }
        self._kept: list[Sequence[Record]] = []
        """Batches handed to defer(), oldest first, not counted yet."""

    def absorb(self, heartbeats: PerAgent, refused: PerAgent) -> None:
        """Fold counts drained from the registry and detectors into the per-label totals."""
        labels = self.labels
        for (tenant, agent), count in heartbeats.items():
            group = labels(tenant, agent)
            self.heartbeats[group] = self.heartbeats.get(group, 0) + count
        for (tenant, agent), count in refused.items():
            group = labels(tenant, agent)
            self.not_permitted[group] = self.not_permitted.get(group, 0) + count

    def known_agents(self) -> set[Group]:
        """Groups whose series exist (from their first execution on)."""
        return {key[:-1] for key in self.started}

    def defer(self, records: Sequence[Record]) -> None:
        """Keep `records` to count at settle(): a sweep's slices reach the logs and the
        stream without waiting for the metrics (~1.7 us a death at 100k live), which
        nobody reads before a scrape, and a scrape settles first. While some execution
        may carry a trace, count at once: an exemplar needs its execution, which
        retention may evict before the sweep is over."""
        if self._traced():
            self(records)
            return
        self.absorb(*self._drain())  # heartbeats first, as when counted at once
        self._kept.append(records)

    def settle(self) -> None:
        """Count the batches kept by defer(), oldest first. A batch that fails to count is
        dropped, the others are counted all the same, then the first failure is raised."""
        kept, self._kept = self._kept, []
        failure: Exception | None = None
        for records in kept:
            try:
                self._count(records)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def __call__(self, records: Sequence[Record]) -> None:
        if self._kept:  # what came first is counted first
            self._kept.append(records)
            self.settle()
            return
        self._count(records)

    def _count(self, records: Sequence[Record]) -> None:
        self.absorb(*self._drain())  # keeps the registry's per-agent counts small
        labels = self.labels
        groups = labels.groups
        traced = self._traced()
        for record in records:
            if type(record) is Transition:
                self._transition(record, traced)
            elif type(record) is FindingChange:
                if record.raised:
                    pair = (record.tenant, record.agent)
                    group = groups.get(pair) or labels(*pair)
                    self._detected(group, record.finding, record.detected_at - record.since)
            elif type(record) is BreakerTransition and record.new is BreakerState.OPEN:
                pair = (record.tenant, record.agent)
                group = groups.get(pair) or labels(*pair)
                self._detected(group, "circuit_open", record.detected_at - record.at)

    def _transition(self, t: Transition, traced: bool) -> None:
        # A sweep that ends 10k executions at once feeds this 10k times before its next
        # slice reads the clock, so it is written flat: one unpacking instead of a dozen
        # NamedTuple attribute reads, the Group from the labels' memory, the duration from
        # the record, and the execution looked up only when it may carry a trace.
        tenant, execution_id, agent, kind, old, new, at, _, reason, revived, detected_at, \
            created_at = t  # fmt: skip
        pair = (tenant, agent)
        group = self.labels.groups.get(pair) or self.labels(*pair)  # a StrEnum kind is its label
        if old is None:
            self._known(group, kind)
            self.started[(*group, kind)] += 1
        if new in TERMINAL and (old is None or old in LIVE or revived):
            key = (*group, kind, new)
            finished = self.finished
            if key not in finished:  # only _known adds keys to finished
                self._known(group, kind)
            finished[key] += 1
            exemplar = None
            if traced:
                execution = (tenant, execution_id)
                ex = self._lookup(execution)
                if ex is not None:
                    created_at = ex.created_at if created_at is None else created_at
                    trace_id = self._trace_id(execution, ex)
                    exemplar = {"trace_id": trace_id} if trace_id else None
            if created_at is not None:
                histogram = self.durations.get(key)
                if histogram is None:
                    histogram = self.durations[key] = Histogram(DURATION_BUCKETS)
                took = at - created_at
                histogram.observe(took if took > 0 else 0.0, exemplar)
        if revived:
            self.revivals[group] = self.revivals.get(group, 0) + 1
        if reason is not None and detected_at is not None:
            self._detected(group, reason, detected_at - at)

    def _known(self, group: Group, kind: str) -> None:
        """Known series start at 0: a group's counters exist from its first execution."""
        if (*group, kind) in self.started:
            return
        self.started[(*group, kind)] = 0
        for state in FINISHED:
            self.finished[(*group, kind, state)] = 0
        for reason, detector in DETECTOR.items():
            self.detections.setdefault((*group, detector, reason), 0)
        self.revivals.setdefault(group, 0)
        self.heartbeats.setdefault(group, 0)
        self.not_permitted.setdefault(group, 0)

    def _detected(self, group: Group, reason: str, lag: float) -> None:
        detector = DETECTOR.get(reason, reason)
        key = (*group, detector, reason)
        self.detections[key] = self.detections.get(key, 0) + 1
        self.lags[detector].observe(lag if lag > 0 else 0.0)


def _gauge(name: str, help_text: str, value: float) -> Family:
    family = Family(name, "gauge", help_text)
    family.add((), value)
    return family


def _counter(name: str, help_text: str, label_names: list[str], values: dict[Any, int]) -> Family:
    family = Family(name, "counter", help_text, label_names)
    for key, value in sorted(values.items()):  # tuples: a group's values lead the key
        family.add(key if isinstance(key, tuple) else (key,), value)
    return family


class ExecwatchCollector(Collector):
    """Builds every execwatch family from a fresh look at the state: never stale series."""

    def __init__(
        self,
        detectors: Detectors,
        stats: IngestStats,
        sink: MetricsSink,
        clock: Callable[[], float],
    ) -> None:
        self.detectors = detectors
        self.registry = detectors.registry
        self.stats = stats
        self.sink = sink
        self.clock = clock
        self.collect_duration_s = 0.0

    def describe(self) -> Iterable[Metric]:
        return []  # no collect() at registration

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's view of the same families (tests, other registries). Like
        families(), on the event loop only: it counts what the metrics sink kept."""
        for family in self.families():
            yield family.to_prometheus()

    def families(self) -> list[Family]:
        """Every execwatch family, read now (on the event loop: the state is not locked)."""
        started = time.perf_counter()
        try:
            self.sink.settle()  # a batch that failed is dropped: count it, serve the rest
        except Exception:
            self.stats.sink_failures[self.sink.name] += 1
            log.exception("sink_failed", sink=self.sink.name)
        self.sink.absorb(*self.sink._drain())
        families = [*self._state(), *self._events(), *self._detector_health()]
        self.collect_duration_s = time.perf_counter() - started
        families.append(
            _gauge(
                "execwatch_collect_duration_seconds",
                "Seconds the last scrape took to read the state (the render is not included).",
                self.collect_duration_s,
            )
        )
        return families

    def _state(self) -> Iterator[Family]:
        labels, registry = self.sink.labels, self.registry
        build = Family("execwatch_build_info", "gauge", "The running version.", ["version"])
        build.add((__version__,), 1)
        yield build

        lead = labels.names
        by_group: dict[Group, dict[str, int]] = {key: {} for key in self.sink.started}
        for (tenant, agent, kind, state), count in registry.counts.items():
            per = by_group.setdefault((*labels(tenant, agent), kind), {})
            per[state] = per.get(state, 0) + count
        executions = Family(
            "execwatch_executions", "gauge",
            "Executions held now, by agent, kind and state (live states and dead; 0s included).",
            [*lead, "kind", "state"],
        )  # fmt: skip
        for key, per_state in sorted(by_group.items()):
            for name in STATES:
                executions.add((*key, name), per_state.get(name, 0))
        yield executions

        known = self.sink.known_agents()
        findings: dict[Group, int] = {
            (*group, finding): 0 for group in known for finding in FINDINGS
        }
        for change in registry.findings.values():
            key = (*labels(change.tenant, change.agent), change.finding)
            findings[key] = findings.get(key, 0) + 1
        family = Family(
            "execwatch_findings", "gauge", "Active detector findings, by agent and finding.",
            [*lead, "finding"],
        )  # fmt: skip
        for key, count in sorted(findings.items()):
            family.add(key, count)
        yield family

        oldest: dict[tuple[str, str], float] = {}
        get = oldest.get
        for ex in registry:  # the one walk over the fleet; kept to attribute reads
            if ex.finished_at is None:
                pair, at = (ex.tenant, ex.agent), ex.last_heartbeat_at
                seen = get(pair)
                if seen is None or at < seen:
                    oldest[pair] = at
        per_group: dict[Group, float] = {}
        for (tenant, agent), at in oldest.items():
            group = labels(tenant, agent)
            if group not in per_group or at < per_group[group]:
                per_group[group] = at
        family = Family(
            "execwatch_oldest_heartbeat_timestamp_seconds", "gauge",
            "Unix time of the oldest last heartbeat among an agent's live executions.",
            lead,
        )  # fmt: skip
        for group, at in sorted(per_group.items()):
            family.add(group, at)
        yield family

        yield from self._breakers()

    def _breakers(self) -> Iterator[Family]:
        labels, now = self.sink.labels, self.clock()
        lead = labels.names
        state = Family(
            "execwatch_circuit_breaker_state", "gauge",
            "1 for each breaker's current state, 0 for the others.", [*lead, "state"],
        )  # fmt: skip
        rate = Family(
            "execwatch_circuit_breaker_failure_rate", "gauge",
            "Failure rate (0-1) over each breaker's sliding window.", lead,
        )  # fmt: skip
        folded: dict[Group, tuple[str, float]] = dict.fromkeys(
            self.sink.known_agents(), ("closed", 0.0)
        )
        for breaker in self.detectors.breakers.values():
            group = labels(breaker.tenant, breaker.agent)
            current = (breaker.state.value, breaker.rate(now))
            kept = folded.get(group)
            # Several breakers under one label (tenants, overflow): show the worst, open first.
            if kept is None or SEVERITY[current[0]] > SEVERITY[kept[0]]:
                folded[group] = current
        for group, (now_in, failure_rate) in sorted(folded.items()):
            for name in BREAKER_STATES:
                state.add((*group, name), 1.0 if name == now_in else 0.0)
            rate.add(group, failure_rate)
        yield state
        yield rate
        refused = dict(self.sink.not_permitted)
        for group in folded:
            refused.setdefault(group, 0)
        yield _counter(
            "execwatch_circuit_breaker_not_permitted_calls",
            "Executions registered while their agent's breaker refused them.", lead, refused,
        )  # fmt: skip

    def _events(self) -> Iterator[Family]:
        sink, stats, labels = self.sink, self.stats, self.sink.labels
        lead = labels.names
        yield _counter(
            "execwatch_executions_started", "Executions registered.", [*lead, "kind"],
            sink.started,
        )  # fmt: skip
        yield _counter(
            "execwatch_executions_finished",
            "Executions that reached a terminal state (dead included).",
            [*lead, "kind", "state"], sink.finished,
        )  # fmt: skip
        duration = Family(
            "execwatch_execution_duration_seconds", "histogram",
            "Seconds from an execution's first event to its terminal state.",
            [*lead, "kind", "state"],
        )  # fmt: skip
        for key, histogram in sorted(sink.durations.items()):
            duration.add_histogram(key, histogram.buckets(), histogram.total)
        yield duration
        yield _counter("execwatch_heartbeats", "Heartbeats applied.", lead, sink.heartbeats)
        yield _counter(
            "execwatch_detections",
            "Detections, by agent, detector and reason (timeouts, deaths, findings, breakers).",
            [*lead, "detector", "reason"], sink.detections,
        )  # fmt: skip
        yield _counter(
            "execwatch_revivals", "Dead executions that showed proof of life (false deaths).",
            lead, sink.revivals,
        )  # fmt: skip
        received = {t: stats.received.get(t, 0) for t in ("state", "heartbeat", "invalid")}
        yield _counter("execwatch_events_received", "Events received.", ["type"], received)
        yield _counter(
            "execwatch_events_rejected", "Events (or bodies) rejected, by reason.", ["reason"],
            dict(stats.rejected),
        )  # fmt: skip
        yield _counter(
            "execwatch_events_duplicate", "Events acknowledged as duplicates of an event_id.",
            [], {(): stats.duplicates},
        )  # fmt: skip
        lag = Family(
            "execwatch_detection_lag_seconds", "histogram",
            "Seconds from a deadline to its detection.", ["detector"],
        )  # fmt: skip
        for detector, histogram in sorted(sink.lags.items()):
            lag.add_histogram((detector,), histogram.buckets(), histogram.total)
        yield lag
        yield _gauge(
            "execwatch_ingest_lag_seconds",
            "Receipt time minus ts of the newest event that carried one, in the last batch.",
            stats.ingest_lag_s,
        )
        yield _counter(
            "execwatch_sink_failures", "Exceptions raised by an exporter fed by the ingest path.",
            ["sink"], dict(stats.sink_failures),
        )  # fmt: skip
        yield _counter(
            "execwatch_exporter_failures", "Exports a backend refused or could not take.",
            ["exporter"], dict(stats.exporter_failures),
        )  # fmt: skip
        yield _counter(
            "execwatch_spans_finished", "Spans handed to the span processor for export.",
            [], {(): stats.spans_finished},
        )  # fmt: skip
        yield _counter(
            "execwatch_spans_exported",
            "Spans a tracing backend accepted (the gap to finished is queued, dropped or failed).",
            [], {(): stats.spans_exported},
        )  # fmt: skip
        yield _counter(
            "execwatch_store_commit_failures", "Commits the store failed (answered 503).",
            [], {(): stats.store_failures},
        )  # fmt: skip
        yield _counter(
            "execwatch_auth_failures",
            "Requests refused: no token or a bad one (401), another tenant's data (403).",
            ["reason"], dict(stats.auth_failures),
        )  # fmt: skip
        stream = stats.stream
        yield _gauge(
            "execwatch_stream_consumers", "GET /v1/stream connections open now.", stream.consumers
        )
        yield _counter(
            "execwatch_stream_events", "Events published to the live stream (and its ring).",
            [], {(): stream.published},
        )  # fmt: skip
        yield _counter(
            "execwatch_stream_consumers_dropped",
            "Stream consumers let go because their socket stopped taking data.",
            [], {(): stream.dropped},
        )  # fmt: skip
        yield _counter(
            "execwatch_stream_resets",
            "Stream reconnects told to re-list (too far behind, or after a restart).",
            [], {(): stream.resets},
        )  # fmt: skip
        yield _counter(
            "execwatch_requests_shed",
            "Requests answered 503 with Retry-After before any work, because of overload.",
            ["reason"], dict(stats.shed),
        )  # fmt: skip
        yield _gauge(
            "execwatch_ingest_in_flight",
            "POST /v1/events requests being applied or committed right now.",
            stats.in_flight,
        )
        yield _counter(
            "execwatch_log_lines_dropped",
            "Log lines dropped because stdout was stuck or gone (the daemon never waits on it).",
            [], {(): dropped_lines()},
        )  # fmt: skip
        yield _counter(
            "execwatch_metrics_label_overflow",
            "Distinct values folded into __overflow__ because a label hit its cap.",
            ["label"], {"agent": labels.overflowed},
        )  # fmt: skip

    def _detector_health(self) -> Iterator[Family]:
        detectors = self.detectors
        yield _gauge(
            "execwatch_detector_last_tick_timestamp_seconds",
            "Unix time of the detector loop's last sweep (its watchdog).",
            detectors.last_tick_at or 0.0,
        )
        yield _gauge(
            "execwatch_detector_loop_lag_seconds",
            "How late the detector loop last woke up.",
            detectors.loop_lag_s,
        )
        yield _counter(
            "execwatch_detector_blind_spells",
            "Times the daemon regained sight (start-up, a stalled loop, a clock jump).",
            [], {(): detectors.blind_spells},
        )  # fmt: skip
        yield _counter(
            "execwatch_detector_failures", "Detectors that raised, by clock.", ["detector"],
            dict(detectors.failures),
        )  # fmt: skip


class FrozenCollector(Collector):
    """Families already built: rendering them can happen off the event loop."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class Metrics:
    """What /metrics serves: execwatch's families (fast encoder) and the standard process
    and Python collectors (prometheus_client), from registries of its own."""

    def __init__(self, collector: ExecwatchCollector) -> None:
        self.collector = collector
        self.encoder = Encoder()
        self.library = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.library)
        PlatformCollector(registry=self.library)
        GCCollector(registry=self.library)

    async def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for `accept` (OpenMetrics when asked, so exemplars show). The state
        is read on the event loop; the text is written in a worker thread."""
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        ours = self.collector.families()
        frozen = CollectorRegistry(auto_describe=False)
        frozen.register(FrozenCollector(list(self.library.collect())))

        def write() -> bytes:
            library = encoder(frozen)  # ends with "# EOF" in OpenMetrics: ours go first
            return self.encoder.render(ours, openmetrics).encode() + library

        return await asyncio.to_thread(write), content_type
