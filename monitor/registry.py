"""The live executions: apply(event, now) validates, updates and returns a Transition record.

Pure: no asyncio, no I/O, the clock is a parameter. Everything downstream (the
store, exporters, the live stream, detectors) is fed from the Transition records
apply returns, never from scattered calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from monitor.config import Settings
from monitor.errors import DuplicateEvent, EventError, FinalState, StaleSeq, UnknownExecution
from monitor.events import LIMIT_FIELDS, MAX_ATTRIBUTES, Event, EventType, Kind, Scalar
from monitor.states import FINAL, TERMINAL, ExecState, check_transition

Key = tuple[str, str]
"""(tenant, execution_id): execution ids are unique within a tenant."""

# Enum member lookups cost ~75 ns each on Python 3.11, module constants ~7 ns: the ingest
# path reads these several times per event.
_STATE = EventType.STATE
_HEARTBEAT = EventType.HEARTBEAT
_DEAD = ExecState.DEAD
_REVIVE_TO = frozenset(
    {ExecState.STARTING, ExecState.RUNNING, ExecState.PAUSED, ExecState.COMPLETING}
)


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of an execution's state (or, with old == new, of its phase)."""

    tenant: str
    execution_id: str
    agent: str
    kind: Kind
    old: ExecState | None
    new: ExecState
    at: float
    """When it happened: the event's time, or for a detector the deadline it missed."""
    phase: str | None = None
    reason: str | None = None
    """Why a detector made it (`run_timeout`, `heartbeat`, ...); None when reported."""
    revived: bool = False
    """The execution was dead and showed proof of life (a false positive of the dead detector)."""

    @property
    def key(self) -> Key:
        return (self.tenant, self.execution_id)

    def to_dict(self) -> dict[str, Any]:
        """The history entry the API shows."""
        entry: dict[str, Any] = {
            "from": self.old,
            "to": self.new,
            "at": self.at,
            "reason": self.reason,
        }
        if self.phase is not None:
            entry["phase"] = self.phase
        return entry


class Execution:
    """One execution as the registry knows it. Mutated only by Registry."""

    __slots__ = (
        "agent",
        "attributes",
        "created_at",
        "error",
        "execution_id",
        "finished_at",
        "history",
        "kind",
        "last_heartbeat_at",
        "last_progress_at",
        "last_seq",
        "limits",
        "memory_limit_bytes",
        "parent_id",
        "phase",
        "pid",
        "progress",
        "rss_bytes",
        "serial",
        "state",
        "state_since",
        "tenant",
        "traceparent",
        "updated_at",
    )

    def __init__(
        self,
        tenant: str,
        execution_id: str,
        agent: str,
        kind: Kind,
        state: ExecState,
        at: float,
        now: float,
        serial: int,
        history: int,
    ) -> None:
        self.tenant = tenant
        self.execution_id = execution_id
        self.agent = agent
        self.kind = kind
        self.state = state
        self.phase: str | None = None
        self.parent_id: str | None = None
        self.created_at = at
        self.state_since = at
        self.updated_at = now
        self.last_heartbeat_at = now
        """Daemon clock at the last proof of life (heartbeat or event): liveness is judged on
        receipt, never on the sender's `ts`."""
        self.last_progress_at = now
        """Daemon clock at the last change of progress, phase or state (the stall clock)."""
        self.limits: dict[str, float] = {}
        self.memory_limit_bytes: int | None = None
        self.pid: int | None = None
        self.rss_bytes: int | None = None
        self.progress: float | int | str | None = None
        self.attributes: dict[str, Scalar] = {}
        self.error: Any = None
        self.traceparent: str | None = None
        self.last_seq: int | None = None
        self.finished_at: float | None = None
        self.serial = serial
        self.history: deque[Transition] = deque(maxlen=history)

    @property
    def key(self) -> Key:
        return (self.tenant, self.execution_id)

    def to_dict(self, settings: Settings) -> dict[str, Any]:
        """The execution as the API shows it, with its effective limits."""
        return {
            "execution_id": self.execution_id,
            "tenant": self.tenant,
            "agent": self.agent,
            "kind": self.kind,
            "state": self.state,
            "phase": self.phase,
            "parent_id": self.parent_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_heartbeat_at": self.last_heartbeat_at,
            "limits": effective_limits(self, settings),
            "rss_bytes": self.rss_bytes,
            "pid": self.pid,
            "progress": self.progress,
            "error": self.error,
            "attributes": self.attributes,
            "traceparent": self.traceparent,
            "findings": [],
            "history": [t.to_dict() for t in self.history],
        }

    def snapshot(self) -> dict[str, Any]:
        """Every fact about the execution as plain data, for the store; Registry.restore()
        reads it back."""
        return {
            "tenant": self.tenant,
            "execution_id": self.execution_id,
            "agent": self.agent,
            "kind": self.kind.value,
            "state": self.state.value,
            "phase": self.phase,
            "parent_id": self.parent_id,
            "created_at": self.created_at,
            "state_since": self.state_since,
            "updated_at": self.updated_at,
            "last_heartbeat_at": self.last_heartbeat_at,
            "last_progress_at": self.last_progress_at,
            "limits": dict(self.limits),
            "memory_limit_bytes": self.memory_limit_bytes,
            "pid": self.pid,
            "rss_bytes": self.rss_bytes,
            "progress": self.progress,
            "attributes": dict(self.attributes),
            "error": self.error,
            "traceparent": self.traceparent,
            "last_seq": self.last_seq,
            "finished_at": self.finished_at,
            "serial": self.serial,
            "history": [[t.old, t.new, t.at, t.phase, t.reason, t.revived] for t in self.history],
        }


def effective_limits(execution: Execution, settings: Settings) -> dict[str, float | int]:
    """The limits that apply: the execution's own, else its agent's, else [defaults]."""
    configured = settings.limits_for(execution.agent)
    limits: dict[str, float | int] = {}
    for name in LIMIT_FIELDS:
        value = execution.limits.get(name, getattr(configured, name))
        if value is not None:
            limits[name] = value
    memory = execution.memory_limit_bytes or configured.memory_limit_bytes
    if memory is not None:
        limits["memory_limit_bytes"] = memory
    return limits


class Registry:
    """The live executions of every tenant, keyed by (tenant, execution_id)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executions: dict[Key, Execution] = {}
        self._serial = 0
        retention = settings.retention
        self._history = retention.history
        self._finished_s = retention.finished_s
        self._max_finished = retention.max_finished
        self._finished: deque[tuple[float, int, Key]] = deque()
        self.finished_count = 0
        """Executions in a terminal state (dead included) awaiting eviction."""
        self._max_event_ids = retention.event_ids
        self._event_ids: set[tuple[str, str]] = set()
        self._event_order: deque[tuple[str, str]] = deque()

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

    # ---- writes --------------------------------------------------------------------------

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
        ex = self._executions.get((event.tenant, event.execution_id))
        if ex is None:
            transition: Transition | None = self._register(event, now)
        else:
            transition = self._update(ex, event, now)
        if event_key is not None and self._max_event_ids:
            self._remember(event_key)
        return transition

    def restore(self, snapshot: Mapping[str, Any]) -> Execution:
        """Put back an execution from Execution.snapshot(), as it was (the replay at start-up).

        Snapshots must come in their original registration order.
        """
        self._serial += 1
        ex = Execution(
            snapshot["tenant"],
            snapshot["execution_id"],
            snapshot["agent"],
            Kind(snapshot["kind"]),
            ExecState(snapshot["state"]),
            snapshot["created_at"],
            snapshot["updated_at"],
            self._serial,
            self._history,
        )
        for name in (
            "phase",
            "parent_id",
            "state_since",
            "last_heartbeat_at",
            "last_progress_at",
            "memory_limit_bytes",
            "pid",
            "rss_bytes",
            "progress",
            "error",
            "traceparent",
            "last_seq",
        ):
            setattr(ex, name, snapshot[name])
        ex.limits = dict(snapshot["limits"])
        ex.attributes = dict(snapshot["attributes"])
        for old, new, at, phase, reason, revived in snapshot["history"]:
            ex.history.append(
                Transition(
                    ex.tenant,
                    ex.execution_id,
                    ex.agent,
                    ex.kind,
                    None if old is None else ExecState(old),
                    ExecState(new),
                    at,
                    phase,
                    reason,
                    revived,
                )
            )
        self._executions[ex.key] = ex
        if snapshot["finished_at"] is not None:
            self._finish(ex, snapshot["finished_at"])
        return ex

    def evict(self, now: float) -> list[Key]:
        """Forget finished executions past their retention time or over the count cap;
        return the keys evicted (the store forgets them too)."""
        evicted: list[Key] = []
        finished = self._finished
        while finished and (
            self.finished_count > self._max_finished or finished[0][0] + self._finished_s <= now
        ):
            finished_at, serial, key = finished.popleft()
            ex = self._executions.get(key)
            # A stale entry: evicted already, re-registered, or revived (and maybe finished
            # again, with an entry of its own further on).
            if ex is None or ex.serial != serial or ex.finished_at != finished_at:
                continue
            del self._executions[key]
            self.finished_count -= 1
            evicted.append(key)
        return evicted

    # ---- internals -----------------------------------------------------------------------

    def _register(self, event: Event, now: float) -> Transition:
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
            event.tenant,
            event.execution_id,
            event.agent,
            event.kind or Kind.AGENT,
            state,
            event.at,
            now,
            self._serial,
            self._history,
        )
        self._executions[ex.key] = ex
        self._absorb(ex, event, now)
        ex.phase = event.phase
        transition = Transition(
            ex.tenant, ex.execution_id, ex.agent, ex.kind, None, state, event.at, ex.phase
        )
        ex.history.append(transition)
        if state in TERMINAL:
            self._finish(ex, now)
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
            target = ex.history[-1].old if ex.history else None
            target = target if target in _REVIVE_TO else ExecState.RUNNING
            changed = True
        else:
            target, changed = current, False
        if event.attributes:
            merged = len(ex.attributes.keys() | event.attributes.keys())
            if merged > MAX_ATTRIBUTES:
                self._too_many_attributes(event, merged)

        self._absorb(ex, event, now)
        phase_changed = event.phase is not None and event.phase != ex.phase
        if phase_changed:
            ex.phase = event.phase
            ex.last_progress_at = now
        if changed:
            assert target is not None
            return self._move(ex, target, event.at, now)
        if phase_changed:
            transition = Transition(
                ex.tenant,
                ex.execution_id,
                ex.agent,
                ex.kind,
                current,
                current,
                event.at,
                ex.phase,
            )
            ex.history.append(transition)
            return transition
        return None

    def _absorb(self, ex: Execution, event: Event, now: float) -> None:
        """Copy an accepted event's facts onto the execution."""
        ex.updated_at = now
        ex.last_heartbeat_at = now
        if event.seq is not None:
            ex.last_seq = event.seq
        if event.progress is not None and event.progress != ex.progress:
            ex.progress = event.progress
            ex.last_progress_at = now
        if event.rss_bytes is not None:
            ex.rss_bytes = event.rss_bytes
        if event.type is _HEARTBEAT:
            return
        if event.limits:
            ex.limits.update(event.limits)
        if event.memory_limit_bytes is not None:
            ex.memory_limit_bytes = event.memory_limit_bytes
        if event.pid is not None:
            ex.pid = event.pid
        if event.parent_id is not None:
            ex.parent_id = event.parent_id
        if event.error is not None:
            ex.error = event.error
        if event.attributes:
            ex.attributes.update(event.attributes)
        if event.traceparent is not None:
            ex.traceparent = event.traceparent

    def _move(
        self, ex: Execution, target: ExecState, at: float, now: float, reason: str | None = None
    ) -> Transition:
        old = ex.state
        transition = Transition(
            ex.tenant,
            ex.execution_id,
            ex.agent,
            ex.kind,
            old,
            target,
            at,
            ex.phase,
            reason,
            revived=old is ExecState.DEAD,
        )
        ex.state = target
        ex.state_since = at
        ex.last_progress_at = now
        ex.history.append(transition)
        if old in TERMINAL:  # only dead leaves a terminal state: a revival
            ex.finished_at = None
            self.finished_count -= 1
        if target in TERMINAL:
            self._finish(ex, now)
        return transition

    def _finish(self, ex: Execution, now: float) -> None:
        ex.finished_at = now
        self.finished_count += 1
        self._finished.append((now, ex.serial, ex.key))

    def _remember(self, event_key: tuple[str, str]) -> None:
        self._event_ids.add(event_key)
        self._event_order.append(event_key)
        if len(self._event_order) > self._max_event_ids:
            self._event_ids.discard(self._event_order.popleft())

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


def counts_by_agent(
    executions: Iterator[Execution] | list[Execution],
) -> Mapping[tuple[str, str], dict[str, int]]:
    """(tenant, agent) -> {state: count} over `executions`."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for ex in executions:
        per = counts.setdefault((ex.tenant, ex.agent), {})
        per[ex.state] = per.get(ex.state, 0) + 1
    return counts
