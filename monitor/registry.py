"""The live executions: apply(event, now) validates, updates and returns a Transition record.

Pure: no asyncio, no I/O, the clock is a parameter. Everything downstream (the
store, exporters, the live stream, detectors) is fed from the records it
produces: apply() returns the Transition an event caused; side records (a
finding cleared by progress or by the end of the execution) wait in `outbox`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from monitor.config import Settings
from monitor.errors import (
    DuplicateEvent,
    EventError,
    EvictedExecution,
    FinalState,
    StaleSeq,
    UnknownExecution,
)
from monitor.events import MAX_ATTRIBUTES, Beat, Event, EventType, Kind
from monitor.model import NO_ATTRIBUTES, NO_FINDINGS, Execution, FindingChange, Key, Transition
from monitor.states import FINAL, TERMINAL, ExecState, check_transition

# Enum member lookups cost ~75 ns each on Python 3.11, module constants ~7 ns: the ingest
# path reads these several times per event.
_STATE = EventType.STATE
_HEARTBEAT = EventType.HEARTBEAT
_DEAD = ExecState.DEAD
_NOT_BEATING = FINAL | {_DEAD}
"""States a heartbeat cannot simply refresh: it is refused, or it revives."""
_PAUSED = ExecState.PAUSED
_REVIVE_TO = frozenset(
    {ExecState.STARTING, ExecState.RUNNING, ExecState.PAUSED, ExecState.COMPLETING}
)
_RUN_CLOCK = frozenset({ExecState.RUNNING, ExecState.COMPLETING})
_new_tuple: Callable[[type[Transition], tuple[Any, ...]], Transition] = tuple.__new__

Record = Transition | FindingChange


class Registry:
    """The executions of every tenant, keyed by (tenant, execution_id)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executions: dict[Key, Execution] = {}
        self.by_key: Callable[[Key], Execution | None] = self._executions.get
        """The execution at a key, or None: the dict's own get, since sweeps and sinks call
        it several times per record (a method around it cost ~0.3 us a call)."""
        self._serial = 0
        retention = settings.retention
        self._history = retention.history
        self._finished_s = retention.finished_s
        self._max_finished = retention.max_finished
        self._finished: deque[tuple[float, int, Key]] = deque()
        """(finished_at, finish_token, key), oldest first."""
        self._finish_tokens = 0
        self.finished_count = 0
        """Executions in a terminal state (dead included) awaiting eviction."""
        self._max_event_ids = retention.event_ids
        self._event_ids: set[tuple[str, str]] = set()
        self._event_order: deque[tuple[str, str]] = deque()
        self._tombstones: set[Key] = set()
        self._tomb_order: deque[Key] = deque()
        self.dirty: dict[Key, Execution] = {}
        """Executions changed since the last commit: what the store must write before an ack."""
        self.evicted: list[Key] = []
        self.touched: dict[Key, Execution] = {}
        """Executions whose liveness facts changed since the last checkpoint."""
        """Keys evicted since the last commit: what the store must forget."""
        self.outbox: list[Record] = []
        """Side records not returned by apply(); drained by whoever commits."""
        self.findings: dict[tuple[Key, str], FindingChange] = {}
        """Every active finding, by (execution key, finding)."""
        self.with_pid: dict[Key, Execution] = {}
        """Unfinished executions that reported a pid: the ones the daemon samples itself."""
        self.counts: dict[tuple[str, str, Kind, ExecState], int] = {}
        """Executions held, by (tenant, agent, kind, state): kept as they change, read at
        scrape."""
        self.heartbeats: dict[tuple[str, str], int] = {}
        """Heartbeats applied per (tenant, agent) since the metrics last drained them."""
        self.stopping: dict[Key, str] = {}
        """Executions that should stop, with the reason their next answer's directive gives."""
        self.traced = False
        """Some execution has carried a caller's `traceparent` since start-up. Until one
        does, a sink knows without looking an execution up that it has no trace to link."""

    # ---- reads ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._executions)

    def __iter__(self) -> Iterator[Execution]:
        return iter(self._executions.values())

    def get(self, tenant: str, execution_id: str) -> Execution | None:
        return self._executions.get((tenant, execution_id))

    def select(
        self,
        *,
        tenant: str | None = None,
        state: ExecState | None = None,
        agent: str | None = None,
        kind: Kind | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> tuple[list[Execution], int | None]:
        """Executions matching every given filter, oldest registration first, from after the
        serial `after`; returns the page and the serial to resume after (None at the end)."""
        page: list[Execution] = []
        for ex in self._executions.values():
            if (
                ex.serial <= after
                or (tenant is not None and ex.tenant != tenant)
                or (state is not None and ex.state != state)
                or (agent is not None and ex.agent != agent)
                or (kind is not None and ex.kind != kind)
            ):
                continue
            if len(page) == limit:
                return page, page[-1].serial
            page.append(ex)
        return page, None

    # ---- the ingest path -----------------------------------------------------------------

    def apply(self, event: Event, now: float) -> Transition | None:
        """Apply one event at daemon time `now`; return the Transition it caused, if any.

        Raises a Rejection (and changes nothing) when the event may not be applied,
        DuplicateEvent when its event_id was applied before.
        """
        event_key = None
        if event.event_id is not None:
            event_key = (event.tenant, event.event_id)
            if event_key in self._event_ids:
                raise DuplicateEvent(event.event_id)
        key = (event.tenant, event.execution_id)
        ex = self._executions.get(key)
        if ex is None:
            transition: Transition | None = self._register(key, event, now)
        else:
            transition = self._update(ex, event, now)
        if event_key is not None and self._max_event_ids:
            self._remember(event_key)
        return transition

    def _register(self, key: Key, event: Event, now: float) -> Transition:
        if key in self._tombstones:
            raise EvictedExecution(event.execution_id, event.tenant)
        if event.agent is None:
            raise UnknownExecution(
                event.execution_id,
                event.tenant,
                "its first event must name 'agent' (a state event, or a heartbeat that names "
                "'agent', registers it)",
            )
        if event.type is _STATE:
            state = event.state
            assert state is not None  # parse_event guarantees it
        else:
            state = ExecState.RUNNING
        if event.attributes is not None and len(event.attributes) > MAX_ATTRIBUTES:
            self._too_many_attributes(event, len(event.attributes))
        self._serial += 1
        ex = Execution(
            event.tenant, event.execution_id, event.agent, event.kind or Kind.AGENT, state,
            event.at, now, self._serial, self._history,
        )  # fmt: skip
        self._executions[key] = ex
        self._count(ex, state, 1)
        if event.type is _HEARTBEAT:
            pair = (ex.tenant, ex.agent)
            self.heartbeats[pair] = self.heartbeats.get(pair, 0) + 1
        self._absorb(ex, event.seq, event.progress, event.rss_bytes, now)
        self._absorb_detail(ex, event, now)
        ex.phase = event.phase
        if state in _RUN_CLOCK:
            ex.running_at = now
        elif state is _PAUSED:
            ex.paused_at = now
        transition = Transition(
            ex.tenant, ex.execution_id, ex.agent, ex.kind, None, state, event.at, ex.phase,
            created_at=ex.created_at,
        )  # fmt: skip
        ex.history.append(transition)
        if state in TERMINAL:
            self._finish(ex, now)
        self._changed(ex)
        return transition

    def _update(self, ex: Execution, event: Event, now: float) -> Transition | None:
        # Validate everything before changing anything: a rejected event leaves no trace.
        if event.seq is not None and ex.last_seq is not None and event.seq < ex.last_seq:
            raise StaleSeq(ex.execution_id, event.seq, ex.last_seq)
        if (event.agent is not None and event.agent != ex.agent) or (
            event.kind is not None and event.kind != ex.kind
        ):
            self._mismatch(ex, event)
        current = ex.state
        if event.type is _STATE:
            target = event.state
            assert target is not None
            changed = check_transition(ex.execution_id, current, target)
        elif current in FINAL:
            raise FinalState(ex.execution_id, current, "heartbeat")
        elif current is _DEAD:
            died_from = ex.died_from
            target = died_from if died_from in _REVIVE_TO else ExecState.RUNNING
            changed = True
        else:
            target, changed = current, False
        if event.attributes:
            merged = len(ex.attributes.keys() | event.attributes.keys())
            if merged > MAX_ATTRIBUTES:
                self._too_many_attributes(event, merged)

        self._absorb(ex, event.seq, event.progress, event.rss_bytes, now)
        if event.type is _HEARTBEAT:  # counted once it is sure to be applied
            pair = (ex.tenant, ex.agent)
            self.heartbeats[pair] = self.heartbeats.get(pair, 0) + 1
        if event.detail:
            self._absorb_detail(ex, event, now)
            self._changed(ex)
        # Liveness facts alone (heartbeat times, seq, progress, rss) are checkpointed,
        # not committed per event: they change on every heartbeat.
        if changed:
            assert target is not None
            ex.phase = event.phase  # a phase is detail inside one state: it ends with it
            # History runs forward even when a sender's clock does not.
            return self._move(ex, target, max(event.at, ex.state_since), now)
        if event.phase is not None and event.phase != ex.phase:
            ex.phase = event.phase
            self._progressed(ex, now)
            transition = Transition(
                ex.tenant, ex.execution_id, ex.agent, ex.kind, current, current,
                max(event.at, ex.state_since), ex.phase, created_at=ex.created_at,
            )  # fmt: skip
            ex.history.append(transition)
            self._changed(ex)
            return transition
        return None

    def beat(self, beat: Beat, now: float) -> bool:
        """Apply the common heartbeat (see `parse_beat`) if it names a live execution, and
        say whether it did. False, with nothing changed, when it needs the general path
        (`apply`): an unknown, dead or finished execution, a stale seq, another agent.

        What `apply` does for such a heartbeat, without building an Event: it is most of
        the traffic, and this is a third of the cost."""
        key, agent, seq, progress = beat
        ex = self._executions.get(key)
        if (
            ex is None
            or ex.state in _NOT_BEATING
            or (seq is not None and ex.last_seq is not None and seq < ex.last_seq)
            or (agent is not None and agent != ex.agent)
        ):
            return False
        self._absorb(ex, seq, progress, None, now)
        pair = (ex.tenant, ex.agent)
        self.heartbeats[pair] = self.heartbeats.get(pair, 0) + 1
        return True

    def _absorb(
        self,
        ex: Execution,
        seq: int | None,
        progress: float | int | str | None,
        rss_bytes: int | None,
        now: float,
    ) -> None:
        """Copy an accepted event's liveness facts onto the execution."""
        ex.updated_at = now
        ex.last_heartbeat_at = now
        ex.version += 1
        self.touched[ex.key] = ex
        if seq is not None:
            ex.last_seq = seq
        if progress is not None and progress != ex.progress:
            ex.progress = progress
            self._progressed(ex, now)
        if rss_bytes is not None:
            ex.rss_bytes = rss_bytes
            ex.rss_sampled = False
            ex.add_rss_sample(now, rss_bytes)

    def _absorb_detail(self, ex: Execution, event: Event, now: float) -> None:
        """Copy the rest: limits, identity and context fields (rarer, and worth a commit)."""
        if event.limits:
            ex.limits.update(event.limits)
        if event.memory_limit_bytes is not None:
            ex.memory_limit_bytes = event.memory_limit_bytes
        if event.pid is not None and event.pid != ex.pid:
            ex.pid = event.pid
            if ex.finished_at is None:
                self.with_pid[ex.key] = ex
        if event.parent_id is not None:
            ex.parent_id = event.parent_id
        if event.error is not None:
            ex.error = event.error
        if event.attributes:
            if ex.attributes is NO_ATTRIBUTES:
                ex.attributes = {}
            ex.attributes.update(event.attributes)
        if event.traceparent is not None:
            ex.traceparent = event.traceparent
            self.traced = True

    def _progressed(self, ex: Execution, now: float) -> None:
        ex.last_progress_at = now
        if "stalled" in ex.findings:
            self.clear_finding(ex, "stalled", now)

    # ---- detector entry points -----------------------------------------------------------

    def expire(
        self, ex: Execution, target: ExecState, reason: str, at: float, now: float
    ) -> Transition:
        """A detector ends `ex` (timeout, dead, failed), back-dated to the deadline `at`
        (never before its current state began: history runs forward)."""
        transition = self._move(ex, target, max(at, ex.state_since), now, reason, now)
        self.stopping[ex.key] = reason
        return transition

    def raise_finding(
        self, ex: Execution, finding: str, since: float, detail: str, now: float
    ) -> FindingChange | None:
        """Mark `finding` active on `ex`; None if it already was."""
        if finding in ex.findings:
            return None
        change = FindingChange(
            ex.tenant, ex.execution_id, ex.agent, ex.kind, finding, True, since, detail, now
        )
        if ex.findings is NO_FINDINGS:
            ex.findings = {}
        ex.findings[finding] = change
        self.findings[(ex.key, finding)] = change
        self._changed(ex)
        self.outbox.append(change)
        return change

    def clear_finding(self, ex: Execution, finding: str, now: float) -> FindingChange | None:
        """Clear `finding` from `ex`; None if it was not active."""
        raised = ex.findings.pop(finding, None)  # never in NO_FINDINGS: a no-op there
        if raised is None:
            return None
        if not ex.findings:
            ex.findings = NO_FINDINGS  # give its own empty back
        del self.findings[(ex.key, finding)]
        change = FindingChange(
            ex.tenant, ex.execution_id, ex.agent, ex.kind, finding, False, now, raised.detail, now
        )
        self._changed(ex)
        self.outbox.append(change)
        return change

    def request_cancel(self, ex: Execution, reason: str) -> None:
        """Ask `ex` to stop: every later answer about it carries a cancel directive."""
        if ex.cancel_reason == "circuit_open":
            return  # refused by its breaker already; it never counts as an outcome
        ex.cancel_reason = reason
        if ex.state not in FINAL:
            self.stopping[ex.key] = reason
        self._changed(ex)

    # ---- transitions, retention ----------------------------------------------------------

    def _move(
        self,
        ex: Execution,
        target: ExecState,
        at: float,
        now: float,
        reason: str | None = None,
        detected_at: float | None = None,
    ) -> Transition:
        old = ex.state
        revived = old is _DEAD
        # tuple.__new__ directly: NamedTuple's own __new__ is a Python function around it,
        # half the cost of a Transition (measured), and a sweep makes one per death.
        transition: Transition = _new_tuple(Transition, (
            ex.tenant, ex.execution_id, ex.agent, ex.kind, old, target, at, ex.phase, reason,
            revived, detected_at, ex.created_at,
        ))  # fmt: skip
        ex.state = target
        ex.state_since = at
        ex.history.append(transition)
        self._count(ex, old, -1)
        self._count(ex, target, 1)
        key = ex.key
        if old is _PAUSED and ex.paused_at is not None:
            ex.paused_s += now - ex.paused_at
            ex.paused_at = None
        if revived:
            self._unfinish(ex)
        if target in TERMINAL:
            if target is _DEAD:
                ex.died_from = old
            elif reason is None and ex.cancel_reason is not None:
                self.stopping.pop(key, None)  # it stopped as asked
            if ex.findings:
                for finding in list(ex.findings):
                    self.clear_finding(ex, finding, now)
            self._finish(ex, now)
        else:
            self._progressed(ex, now)
            if target is _PAUSED:
                ex.paused_at = now
                ex.over_soft_since = ex.over_hard_since = None  # memory holds restart after
            elif target in _RUN_CLOCK and ex.running_at is None:
                ex.running_at = now
                ex.run_paused_s = ex.paused_s
        self._changed(ex)
        return transition

    def _count(self, ex: Execution, state: ExecState, delta: int) -> None:
        bucket = (ex.tenant, ex.agent, ex.kind, state)
        count = self.counts.get(bucket, 0) + delta
        if count:
            self.counts[bucket] = count
        else:
            del self.counts[bucket]  # agent names come from clients: keep only what is held

    def drain_heartbeats(self) -> dict[tuple[str, str], int]:
        """Heartbeats applied per (tenant, agent) since the last drain (the metrics keep the totals,
        per capped label, so this stays small however many agent names come and go)."""
        drained, self.heartbeats = self.heartbeats, {}
        return drained

    def _unfinish(self, ex: Execution) -> None:
        """A dead execution showed proof of life: it is no longer finished."""
        if ex.pid is not None:
            self.with_pid[ex.key] = ex
        ex.finished_at = None
        ex.died_from = None
        self.finished_count -= 1
        if ex.cancel_reason is None:
            self.stopping.pop(ex.key, None)
        else:
            self.stopping[ex.key] = ex.cancel_reason

    def _finish(self, ex: Execution, now: float) -> None:
        self.with_pid.pop(ex.key, None)
        ex.finished_at = now
        self._finish_tokens += 1
        ex.finish_token = self._finish_tokens
        self.finished_count += 1
        self._finished.append((now, ex.finish_token, ex.key))
        # Entries go stale when an execution is revived; drop them before they pile up.
        if len(self._finished) > 2 * self.finished_count + 64:
            self._finished = deque(e for e in self._finished if self._is_current(e))

    def _is_current(self, entry: tuple[float, int, Key]) -> bool:
        _, token, key = entry
        ex = self._executions.get(key)
        return ex is not None and ex.finished_at is not None and ex.finish_token == token

    def evict(self, now: float) -> list[Key]:
        """Forget finished executions past their retention time or over the count cap;
        return the keys evicted. Later events for them are refused (409 final_state)."""
        evicted: list[Key] = []
        finished = self._finished
        while finished and (
            self.finished_count > self._max_finished or finished[0][0] + self._finished_s <= now
        ):
            entry = finished.popleft()
            if not self._is_current(entry):
                continue
            key = entry[2]
            ex = self._executions.pop(key)
            self._count(ex, ex.state, -1)
            for finding in ex.findings:
                self.findings.pop((key, finding), None)
            self.stopping.pop(key, None)
            self.dirty.pop(key, None)
            self.finished_count -= 1
            self._bury(key)
            evicted.append(key)
        self.evicted.extend(evicted)
        return evicted

    def _bury(self, key: Key) -> None:
        self._tombstones.add(key)
        self._tomb_order.append(key)
        if len(self._tomb_order) > self.settings.retention.tombstones:
            self._tombstones.discard(self._tomb_order.popleft())

    def _remember(self, event_key: tuple[str, str]) -> None:
        self._event_ids.add(event_key)
        self._event_order.append(event_key)
        if len(self._event_order) > self._max_event_ids:
            self._event_ids.discard(self._event_order.popleft())

    # ---- persistence ---------------------------------------------------------------------

    def take_changes(self) -> tuple[dict[Key, Execution], list[Key]]:
        """Hand over what changed since the last commit (and start a new change set)."""
        dirty, evicted = self.dirty, self.evicted
        self.dirty, self.evicted = {}, []
        return dirty, evicted

    def _changed(self, ex: Execution) -> None:
        """`ex` changed beyond its liveness facts: its whole snapshot is owed to the store."""
        ex.version += 1
        self.dirty[ex.key] = ex

    def take_touched(self) -> list[Execution]:
        """Hand over the executions a checkpoint must write (live, not written whole)."""
        touched, self.touched = self.touched, {}
        executions, dirty = self._executions, self.dirty
        return [ex for key, ex in touched.items() if key not in dirty and executions.get(key) is ex]

    def return_changes(self, dirty: Mapping[Key, Execution], evicted: list[Key]) -> None:
        """A commit failed: its changes are owed to the next one."""
        for key, ex in dirty.items():
            if self._executions.get(key) is ex:
                self.dirty.setdefault(key, ex)
        # An evicted key registered again since (its tombstone aged out) must not be
        # deleted by the retry.
        self.evicted[:0] = [key for key in evicted if key not in self._executions]

    def restore_all(
        self,
        snapshots: Iterable[dict[str, Any]],
        on_error: Callable[[dict[str, Any], Exception], None] | None = None,
    ) -> int:
        """Restore every snapshot (in registration order); return how many. With
        `on_error`, a snapshot that cannot be read is handed to it and skipped."""
        count = 0
        for snapshot in snapshots:
            if on_error is None:
                self.restore(snapshot)
            else:
                try:
                    self.restore(snapshot)
                except Exception as exc:
                    key = (str(snapshot.get("tenant")), str(snapshot.get("execution_id")))
                    self._executions.pop(key, None)  # nothing half restored stays
                    on_error(snapshot, exc)
                    continue
            count += 1
        # Retention walks finishes oldest first; registration order is not finish order.
        self._finished = deque(sorted(self._finished))
        return count

    def restore(self, snapshot: dict[str, Any]) -> Execution:
        """Put back an execution from Execution.snapshot(), as it was (the replay at start-up).

        Snapshots must come in their original registration order. The execution keeps
        its serial, so listing order and paging cursors survive a restart.
        """
        serial = snapshot.get("serial")
        if not isinstance(serial, int) or serial <= self._serial:
            serial = self._serial + 1
        self._serial = serial
        ex = Execution.from_snapshot(snapshot, serial, self._history)
        self._executions[ex.key] = ex
        if ex.traceparent is not None:
            self.traced = True
        self._count(ex, ex.state, 1)
        for finding, change in ex.findings.items():
            self.findings[(ex.key, finding)] = change
        if ex.finished_at is not None:
            self._finish(ex, ex.finished_at)
        elif ex.pid is not None:
            self.with_pid[ex.key] = ex
        last = ex.history[-1] if ex.history else None
        if ex.state in TERMINAL and last is not None and last.reason is not None:
            self.stopping[ex.key] = last.reason
        elif ex.cancel_reason is not None and ex.state not in TERMINAL:
            self.stopping[ex.key] = ex.cancel_reason
        return ex

    # ---- errors --------------------------------------------------------------------------

    @staticmethod
    def _mismatch(ex: Execution, event: Event) -> None:
        for field, mine, theirs in (
            ("agent", ex.agent, event.agent),
            ("kind", ex.kind, event.kind),
        ):
            if theirs is not None and theirs != mine:
                raise EventError(
                    field,
                    f"execution {ex.execution_id!r} has {field} '{mine}'; "
                    f"the event names '{theirs}'",
                    f"{field}_mismatch",
                )

    @staticmethod
    def _too_many_attributes(event: Event, count: int) -> None:
        raise EventError(
            "attributes",
            f"execution {event.execution_id!r} would hold {count} attributes; "
            f"at most {MAX_ATTRIBUTES} are kept",
        )


def counts_by_agent(executions: Iterator[Execution] | list[Execution]) -> dict[Key, dict[str, int]]:
    """(tenant, agent) -> {state: count} over `executions`."""
    counts: dict[Key, dict[str, int]] = {}
    for ex in executions:
        per = counts.setdefault((ex.tenant, ex.agent), {})
        per[ex.state] = per.get(ex.state, 0) + 1
    return counts
