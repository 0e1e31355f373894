"""The detectors: a deadline heap over the registry, tick(now) sweeps what fell due. Pure.

Ingest goes through Detectors.apply(), which applies the event to the registry and
keeps the detectors' bookkeeping (deadlines, breaker admission and outcomes, memory
observations). tick(now) pops only the deadlines that fell due: its cost follows
what is due, not how many executions are live. Entries are never updated in place:
a deadline that moved later is found out when popped (recomputed from the facts)
and pushed again; one that moved earlier gets a new entry, and the old one is
recognised as stale by the per-execution `clocks` bookkeeping.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from monitor.config import Settings
from monitor.detectors.breaker import Breaker, BreakerState, BreakerTransition
from monitor.detectors.clocks import CLOCKS, SCHEDULED_ON_CHANGE, TIMEOUTS
from monitor.detectors.memory import growth_rate, human_bytes, seconds_to_limit
from monitor.events import Event
from monitor.model import Execution, FindingChange, Key, Transition, limit_of
from monitor.registry import Registry
from monitor.states import LIVE, TERMINAL, ExecState

Record = Transition | FindingChange | BreakerTransition
"""Everything the detectors and the registry produce, in the order it happened."""

_FAILURES = frozenset({ExecState.FAILED, ExecState.TIMEOUT, ExecState.DEAD})
MAX_BREAKERS = 10_000
"""Breakers kept at most; idle ones are forgotten past it (agent names come from clients)."""
_CLOSED = BreakerState.CLOSED
_HALF_OPEN = BreakerState.HALF_OPEN
_CANCELLED = ExecState.CANCELLED
_PAUSED = ExecState.PAUSED
_DEAD = ExecState.DEAD
_TIMEOUT = ExecState.TIMEOUT


@dataclass(frozen=True, slots=True)
class Terminate:
    """Policy `terminate`: SIGTERM to `pid`, then SIGKILL after `grace_s` if it lives on."""

    tenant: str
    execution_id: str
    pid: int
    grace_s: float


@dataclass(slots=True)
class TickResult:
    """What one sweep found."""

    records: list[Record] = field(default_factory=list)
    actions: list[Terminate] = field(default_factory=list)
    failures: list[tuple[str, Exception]] = field(default_factory=list)
    """Detectors that raised, by clock: logged by the loop and skipped."""
    due: int = 0
    """Heap entries popped."""
    more: bool = False
    """The budget ran out with entries still due: tick again (with a fresh `now`)."""


class Detectors:
    """Deadlines, memory and circuit breakers over one registry."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self._heap: list[tuple[float, int, Key, str]] = []
        self._order = itertools.count()
        self.breakers: dict[tuple[str, str], Breaker] = {}
        self._breaker_heap: list[tuple[float, int, tuple[str, str]]] = []
        self.dirty_breakers: dict[tuple[str, str], Breaker] = {}
        """Breakers changed since the last commit: what the store must write."""
        self.forgotten_breakers: list[tuple[str, str]] = []
        """Breakers forgotten since the last commit: what the store must delete."""
        self.outbox: list[Record] = []
        """Breaker transitions made on the ingest path, drained with the registry's."""
        self.sighted_since = float("-inf")
        """Liveness clocks never start before this: the end of the daemon's own blindness."""
        self.not_permitted: Counter[tuple[str, str]] = Counter()
        """Executions refused by their breaker since the metrics last drained them."""
        self.failures: Counter[str] = Counter(dict.fromkeys(CLOCKS, 0))
        """Detectors that raised, by clock (every clock known from the start)."""
        self.last_tick_at: float | None = None
        self.loop_lag_s = 0.0
        """How late the detector loop last woke (measured by the server's loop)."""
        self.blind_spells = 0
        self._queued = 0
        """Heap entries that are some execution's current entry (the rest are stale)."""

    # ---- ingest path ---------------------------------------------------------------------

    def apply(self, event: Event, now: float) -> Transition | None:
        """registry.apply(), then the detectors' bookkeeping for what it changed. Its side
        records (findings cleared or raised, a breaker moving) wait in the outboxes, for
        `place` to put after the transition."""
        registry = self.registry
        transition = registry.apply(event, now)
        if transition is not None:
            ex = registry.by_key(transition.key)
            if ex is not None:
                self._observe(ex, transition, now)
        if event.rss_bytes is not None or event.detail:
            ex = registry.get(event.tenant, event.execution_id)
            if ex is not None:
                if event.detail:
                    self._schedule(ex)  # limits may have moved a deadline earlier
                if ex.rss_bytes is not None:
                    self._memory(ex, now)
        return transition

    def place(self, records: list[Record]) -> None:
        """Put the side records of one event or one deadline right after its transition
        (the registry's first: findings that ended with it; then the breaker's), so the
        stream shows each consequence next to its cause, not after the whole batch."""
        during, after = self.registry.outbox, self.outbox
        if during:
            records.extend(during)
            during.clear()
        if after:
            records.extend(after)
            after.clear()

    def observe(self, transition: Transition, now: float) -> None:
        """Breaker admission and outcomes, and the clocks, after a transition."""
        ex = self.registry.get(transition.tenant, transition.execution_id)
        if ex is not None:
            self._observe(ex, transition, now)

    def _observe(self, ex: Execution, transition: Transition, now: float) -> None:
        new, old = transition.new, transition.old
        if new in TERMINAL:
            self._unqueue(ex)
        if old is None and new not in TERMINAL:
            breaker = self.breakers.get((ex.tenant, ex.agent))
            if breaker is not None and breaker.state is not _CLOSED:
                self._tick_breaker(breaker, now)  # a move due right now must count already
                admitted = breaker.admit()
                self.dirty_breakers[(ex.tenant, ex.agent)] = breaker
                if admitted is None:
                    self.not_permitted[(ex.tenant, ex.agent)] += 1
                    self.registry.request_cancel(ex, "circuit_open")
                else:
                    ex.breaker_trial = admitted
        if old is _DEAD and ex.outcome_at is not None:
            # A revival: the death it counted as a failure was false.
            breaker = self.breakers.get((ex.tenant, ex.agent))
            if breaker is not None:
                breaker.retract(ex.outcome_at, ex.outcome_failed)
                self.dirty_breakers[(ex.tenant, ex.agent)] = breaker
            ex.outcome_at = None
        if new in TERMINAL and ex.cancel_reason != "circuit_open":  # refused: it never ran
            if new is _CANCELLED:
                if ex.breaker_trial:
                    breaker = self._breaker(ex, now)
                    breaker.release(ex.breaker_trial)
                    self.dirty_breakers[(ex.tenant, ex.agent)] = breaker
            elif ex.outcome_at is None:
                self._outcome(ex, new in _FAILURES, now)
        if new in LIVE:
            self._schedule(ex)

    def observe_rss(self, ex: Execution, rss: int, now: float) -> None:
        """A memory sample taken by the daemon itself (psutil on the execution's pid)."""
        ex.rss_bytes = rss
        ex.rss_sampled = True
        ex.add_rss_sample(now, rss)
        ex.version += 1
        self.registry.touched[ex.key] = ex
        self._memory(ex, now)

    # ---- the sweep -----------------------------------------------------------------------

    def tick(self, now: float, budget: int | None = None) -> TickResult:
        """One sweep: fire the deadlines that fell due by `now` (at most `budget` of them),
        move breakers on time. A caller with many due ticks again with a fresh `now`, so
        each detection's `detected_at` stays true when thousands fall due at once."""
        result = TickResult()
        heap, lookup = self._heap, self.registry.by_key
        while heap and heap[0][0] <= now:
            if budget is not None and result.due >= budget:
                result.more = True
                break
            due, _, key, clock = heapq.heappop(heap)
            result.due += 1
            ex = lookup(key)
            if ex is None or ex.clocks.get(clock) != due:
                continue  # evicted, or superseded by an earlier entry
            del ex.clocks[clock]
            self._queued -= 1
            try:
                self._fire(ex, clock, now, result)
            except Exception as exc:  # one broken detector must not stop the others
                self.failures[clock] += 1
                result.failures.append((clock, exc))
            if self.registry.outbox or self.outbox:
                self.place(result.records)
        breaker_heap = self._breaker_heap
        while breaker_heap and breaker_heap[0][0] <= now:
            _, _, bkey = heapq.heappop(breaker_heap)
            breaker = self.breakers.get(bkey)
            if breaker is not None:  # None: forgotten while idle
                self._tick_breaker(breaker, now)
        result.records.extend(self.drain())
        self.last_tick_at = now
        return result

    def next_due(self) -> float | None:
        """When the earliest queued deadline falls due (it may be stale: a look costs O(1))."""
        times = [h[0][0] for h in (self._heap, self._breaker_heap) if h]
        return min(times) if times else None

    def drain(self) -> list[Record]:
        """Take the side records waiting in the registry and here, oldest first."""
        records: list[Record] = [*self.registry.outbox, *self.outbox]
        self.registry.outbox.clear()
        self.outbox.clear()
        return records

    # ---- blindness -----------------------------------------------------------------------

    def regain_sight(self, now: float) -> None:
        """The daemon could not see until `now` (start-up, or its loop stalled): every
        execution gets a fresh heartbeat_timeout_s (and stall_timeout_s) from here."""
        self.sighted_since = now
        self.blind_spells += 1

    def schedule_all(self) -> None:
        """Queue the clocks of every execution (after a replay from the store)."""
        for ex in self.registry:
            if ex.state in LIVE:
                self._schedule(ex)

    # ---- internals -----------------------------------------------------------------------

    def _push(self, ex: Execution, clock: str, deadline: float) -> None:
        current = ex.clocks.get(clock)
        if current is None or deadline < current:
            if current is None:
                self._queued += 1
            ex.clocks[clock] = deadline
            heap = self._heap
            heapq.heappush(heap, (deadline, next(self._order), ex.key, clock))
            if len(heap) > 2 * self._queued + 1024:
                self._compact()

    def _unqueue(self, ex: Execution) -> None:
        """An execution ended: its queued deadlines are void (left in the heap as stale)."""
        if ex.clocks:
            self._queued -= len(ex.clocks)
            ex.clocks.clear()

    def _compact(self) -> None:
        """Drop stale entries once they outnumber the current ones: under churn with long
        limits (a day-long timeout_s), finished executions would otherwise pile up here."""
        lookup = self.registry.by_key
        live = []
        for entry in self._heap:
            ex = lookup(entry[2])
            if ex is not None and ex.clocks.get(entry[3]) == entry[0]:
                live.append(entry)
        heapq.heapify(live)
        self._heap[:] = live  # in place: tick() holds a reference to this list

    @property
    def queued(self) -> tuple[int, int]:
        """(current entries, heap size): how much of the heap is stale."""
        return self._queued, len(self._heap)

    def _schedule(self, ex: Execution) -> None:
        settings, sighted = self.settings, self.sighted_since
        for clock in SCHEDULED_ON_CHANGE:
            deadline = CLOCKS[clock](ex, settings, sighted)
            if deadline is not None:
                self._push(ex, clock, deadline)

    def _fire(self, ex: Execution, clock: str, now: float, result: TickResult) -> None:
        deadline = CLOCKS[clock](ex, self.settings, self.sighted_since)
        if deadline is None:
            return  # the clock stopped (paused, ended, limit removed)
        if deadline > now:
            self._push(ex, clock, deadline)  # it moved later (a heartbeat, progress)
            return
        registry = self.registry
        if clock in TIMEOUTS or clock == "heartbeat":
            target = _DEAD if clock == "heartbeat" else _TIMEOUT
            transition = registry.expire(ex, target, clock, deadline, now)
            result.records.append(transition)
            self._unqueue(ex)  # the rest of _observe for live -> terminal
            if ex.cancel_reason != "circuit_open" and ex.outcome_at is None:
                self._outcome(ex, True, now)
        elif clock == "stalled":
            limit = limit_of(ex, "stall_timeout_s", self.settings)
            # Stalled means alive but not advancing: an execution that has sent nothing
            # since its last progress is silent, which is the dead detector's business.
            if "stalled" not in ex.findings and ex.last_heartbeat_at > ex.last_progress_at:
                registry.raise_finding(
                    ex, "stalled", deadline, f"no progress, phase or state change for {limit:g}s "
                    "while it keeps reporting", now,
                )  # fmt: skip
            self._push(ex, "stalled", now + limit)  # look again: progress clears it
        elif clock == "memory_high":
            limit = limit_of(ex, "memory_limit_bytes", self.settings)
            registry.raise_finding(
                ex, "memory_high", deadline,
                f"RSS {human_bytes(ex.rss_bytes or 0)} over the soft limit "
                f"({human_bytes(self._soft_limit(ex, limit))}) for "
                f"{self.settings.limits_for(ex.agent).memory_hold_s:g}s", now,
            )  # fmt: skip
        elif clock == "memory_exceeded":
            self._memory_exceeded(ex, deadline, now, result)

    def _memory_exceeded(
        self, ex: Execution, deadline: float, now: float, result: TickResult
    ) -> None:
        agent = self.settings.limits_for(ex.agent)
        limit = limit_of(ex, "memory_limit_bytes", self.settings)
        detail = (
            f"RSS {human_bytes(ex.rss_bytes or 0)} over the limit ({human_bytes(limit)}) "
            f"for {agent.memory_hold_s:g}s"
        )
        policy = agent.memory_policy
        if policy == "observe":
            self.registry.raise_finding(ex, "memory_exceeded", deadline, detail, now)
            return
        # Signal only on RSS the daemon sampled itself from the pid: a reported number
        # must never be enough to kill a process. Otherwise terminate acts like fail.
        if policy == "terminate" and ex.pid is not None and ex.rss_sampled:
            claimed = sum(1 for other in self.registry.with_pid.values() if other.pid == ex.pid)
            if claimed == 1:  # a pid two executions claim is nobody's to signal
                result.actions.append(
                    Terminate(ex.tenant, ex.execution_id, ex.pid, agent.terminate_grace_s or 0.0)
                )
        ex.error = ex.error or {"type": "memory_exceeded", "message": detail}
        transition = self.registry.expire(ex, ExecState.FAILED, "memory_exceeded", deadline, now)
        result.records.append(transition)
        self._observe(ex, transition, now)

    def _soft_limit(self, ex: Execution, limit: float) -> float:
        return limit * (self.settings.limits_for(ex.agent).memory_soft_fraction or 1.0)

    def _memory(self, ex: Execution, now: float) -> None:
        """Re-judge memory after a new RSS observation."""
        rss = ex.rss_bytes
        limit = limit_of(ex, "memory_limit_bytes", self.settings)
        if rss is None or limit is None or ex.state not in LIVE or ex.state is _PAUSED:
            return  # paused: no clocks, and a hold restarts after the pause
        registry = self.registry
        if rss > limit:
            if ex.over_hard_since is None:
                ex.over_hard_since = now
                self._push(ex, "memory_exceeded", now + self._hold(ex))
        elif ex.over_hard_since is not None:
            ex.over_hard_since = None
            if ex.clocks.pop("memory_exceeded", None) is not None:
                self._queued -= 1
            registry.clear_finding(ex, "memory_exceeded", now)
        if rss > self._soft_limit(ex, limit):
            if ex.over_soft_since is None:
                ex.over_soft_since = now
                self._push(ex, "memory_high", now + self._hold(ex))
        elif ex.over_soft_since is not None:
            ex.over_soft_since = None
            if ex.clocks.pop("memory_high", None) is not None:
                self._queued -= 1
            registry.clear_finding(ex, "memory_high", now)
        horizon = self.settings.limits_for(ex.agent).memory_trend_horizon_s
        rate = growth_rate(ex.rss_samples)
        eta = seconds_to_limit(rss, limit, rate)
        if eta is not None and horizon is not None and eta <= horizon:
            registry.raise_finding(
                ex, "memory_trend", now,
                f"RSS grows {human_bytes(rate or 0)}/s and will cross the limit "
                f"({human_bytes(limit)}) in about {eta:.0f}s", now,
            )  # fmt: skip
        elif "memory_trend" in ex.findings:
            registry.clear_finding(ex, "memory_trend", now)

    def _hold(self, ex: Execution) -> float:
        return self.settings.limits_for(ex.agent).memory_hold_s or 0.0

    def _breaker(self, ex: Execution, now: float) -> Breaker:
        bkey = (ex.tenant, ex.agent)
        breaker = self.breakers.get(bkey)
        if breaker is None:
            if len(self.breakers) >= MAX_BREAKERS:
                self._forget_breakers(now)
            breaker = self.breakers[bkey] = Breaker(ex.tenant, ex.agent, self.settings.breaker)
        return breaker

    def _forget_breakers(self, now: float) -> None:
        """Bound the breakers (agent names come from clients) to 90% of the cap: forget
        closed ones holding no outcome first, then the oldest closed ones. An open or
        half-open breaker is never forgotten; an agent seen again starts afresh."""
        excess = len(self.breakers) - MAX_BREAKERS * 9 // 10
        closed = [k for k, b in self.breakers.items() if b.state is _CLOSED]
        idle = [k for k in closed if self.breakers[k].idle(now)]
        chosen = dict.fromkeys(idle[:excess])
        for bkey in closed:
            if len(chosen) >= excess:
                break
            chosen[bkey] = None
        for bkey in chosen:
            del self.breakers[bkey]
            self.dirty_breakers.pop(bkey, None)
            self.forgotten_breakers.append(bkey)

    def _outcome(self, ex: Execution, failed: bool, now: float) -> None:
        breaker = self._breaker(ex, now)
        self._tick_breaker(breaker, now)
        ex.outcome_at, ex.outcome_failed = now, failed
        self.dirty_breakers[(ex.tenant, ex.agent)] = breaker
        self._moved(breaker, breaker.record(failed, now, ex.breaker_trial))

    def _tick_breaker(self, breaker: Breaker, now: float) -> None:
        self._moved(breaker, breaker.tick(now))

    def _moved(self, breaker: Breaker, moved: BreakerTransition | None) -> None:
        if moved is None:
            return
        self.outbox.append(moved)
        self.dirty_breakers[(breaker.tenant, breaker.agent)] = breaker
        self._queue_breaker(breaker)

    def _queue_breaker(self, breaker: Breaker) -> None:
        due = breaker.due_at
        if due is not None:
            bkey = (breaker.tenant, breaker.agent)
            heapq.heappush(self._breaker_heap, (due, next(self._order), bkey))

    # ---- persistence ---------------------------------------------------------------------

    def take_breaker_changes(self) -> tuple[dict[tuple[str, str], Breaker], list[tuple[str, str]]]:
        """Hand over the breakers changed and forgotten since the last commit."""
        dirty, forgotten = self.dirty_breakers, self.forgotten_breakers
        self.dirty_breakers, self.forgotten_breakers = {}, []
        return dirty, forgotten

    def return_breaker_changes(
        self, dirty: dict[tuple[str, str], Breaker], forgotten: list[tuple[str, str]]
    ) -> None:
        """A commit failed: its breaker changes are owed to the next one."""
        for bkey, breaker in dirty.items():
            if self.breakers.get(bkey) is breaker:
                self.dirty_breakers.setdefault(bkey, breaker)
        self.forgotten_breakers[:0] = [bkey for bkey in forgotten if bkey not in self.breakers]

    def restore_breakers(
        self,
        snapshots: Iterable[dict[str, Any]],
        on_error: Callable[[dict[str, Any], Exception], None] | None = None,
    ) -> int:
        """Put back the breakers of a replay, with their moves on time queued; how many.
        With `on_error`, a snapshot that cannot be read is handed to it and skipped."""
        count = 0
        for snap in snapshots:
            try:
                breaker = Breaker.from_snapshot(snap, self.settings.breaker)
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(snap, exc)
                continue
            self.breakers[(breaker.tenant, breaker.agent)] = breaker
            self._queue_breaker(breaker)
            count += 1
        return count

    def drain_not_permitted(self) -> Counter[tuple[str, str]]:
        """Refusals per (tenant, agent) since the last drain (the metrics keep the totals)."""
        drained, self.not_permitted = self.not_permitted, Counter()
        return drained

    def breaker(self, tenant: str, agent: str) -> Breaker:
        """The breaker of (tenant, agent); a closed one if it has seen nothing yet."""
        return self.breakers.get((tenant, agent)) or Breaker(tenant, agent, self.settings.breaker)
