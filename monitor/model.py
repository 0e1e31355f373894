"""The records the core produces (transitions, findings) and the Execution they describe."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from monitor.config import Settings
from monitor.events import LIMIT_FIELDS, Kind, Scalar
from monitor.states import ExecState

T = TypeVar("T")


class Recent(list[T]):
    """The last `maxlen` items, oldest first. Not a deque: an empty deque already holds a
    64-slot block (760 bytes), twice per execution, and most executions keep a handful of
    transitions and no RSS samples at all (measured: 3.2 KiB per live execution with two
    deques, against the 2 KiB target)."""

    __slots__ = ("maxlen",)

    def __init__(self, maxlen: int, items: Iterable[T] = ()) -> None:
        super().__init__()
        self.maxlen = maxlen
        self.extend(items)

    def append(self, item: T) -> None:
        list.append(self, item)  # not super(): it builds an object per call
        if len(self) > self.maxlen:
            del self[0]

    def extend(self, items: Iterable[T]) -> None:
        super().extend(items)
        excess = len(self) - self.maxlen
        if excess > 0:
            del self[:excess]


Key = tuple[str, str]
"""(tenant, execution_id): execution ids are unique within a tenant."""

# Most executions never get attributes, findings or RSS samples: they share these empties
# instead of holding three of their own (192 B each, a tenth of an execution: measured
# 2,114-2,159 B per live execution at 100k with them, against the 2 KiB target). Nothing
# may change them in place: a writer first gives the execution a container of its own
# (tests/conftest.py checks after every test that they are still empty).
NO_ATTRIBUTES: dict[str, Scalar] = {}
NO_FINDINGS: dict[str, FindingChange] = {}
NO_SAMPLES: tuple[tuple[float, int], ...] = ()
RSS_SAMPLES = 16
"""RSS samples kept per execution (the memory trend's window)."""


class Transition(NamedTuple):
    """One change of an execution's state (or, with old == new, of its phase).

    A NamedTuple like Event: immutable, and ~4x cheaper to build than a frozen dataclass,
    which a sweep that ends 10k executions at once feels (measured)."""

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
    detected_at: float | None = None
    """For a detector's transition, when it was detected: the lag is detected_at - at."""
    created_at: float | None = None
    """When the execution was first seen (its `created_at`): a sink takes a duration from
    here, without looking the execution up among 100k (measured: ~0.5 us, a cache miss)."""

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
        if self.detected_at is not None:
            entry["detected_at"] = self.detected_at  # detection lag = detected_at - at
        if self.revived:
            entry["revived"] = True
        return entry

    def to_list(self) -> list[Any]:
        return [
            self.old,
            self.new,
            self.at,
            self.phase,
            self.reason,
            self.revived,
            self.detected_at,
        ]


class FindingChange(NamedTuple):
    """A detector finding raised on (or cleared from) an execution."""

    tenant: str
    execution_id: str
    agent: str
    kind: Kind
    finding: str
    """`stalled`, `memory_high`, `memory_exceeded` or `memory_trend`."""
    raised: bool
    since: float
    """When the condition began (for a raise) or ended (for a clear)."""
    detail: str
    detected_at: float

    @property
    def key(self) -> Key:
        return (self.tenant, self.execution_id)

    def to_dict(self) -> dict[str, Any]:
        """The finding as the API shows it on its execution."""
        return {"kind": self.finding, "since": self.since, "detail": self.detail}


# Facts copied as they are between an Execution and its snapshot.
_PLAIN = (
    "tenant", "execution_id", "agent", "phase", "parent_id", "created_at", "state_since",
    "updated_at", "registered_at", "last_heartbeat_at", "last_progress_at", "running_at",
    "paused_at", "paused_s", "run_paused_s", "memory_limit_bytes", "pid", "rss_bytes",
    "progress", "error", "traceparent", "last_seq", "finished_at", "died_from",
    "cancel_reason", "breaker_trial", "over_soft_since", "over_hard_since", "rss_sampled",
    "outcome_at", "outcome_failed", "version",
)  # fmt: skip


LIVENESS = (
    "version", "updated_at", "last_heartbeat_at", "last_progress_at", "progress", "rss_bytes",
    "rss_sampled", "last_seq", "rss_samples",
)  # fmt: skip
"""The snapshot keys Execution.liveness() holds, in its order."""


class Execution:
    """One execution as the registry knows it. Mutated only by the registry and detectors.

    Times ending in `_at` are epoch seconds. `created_at`, `state_since` and the
    history use the sender's `ts`; everything that decides liveness or a deadline
    (`registered_at`, `last_heartbeat_at`, `running_at`, ...) is the daemon's clock.
    """

    __slots__ = (
        *_PLAIN,
        "attributes",
        "clocks",
        "finish_token",
        "findings",
        "history",
        "key",
        "kind",
        "limits",
        "rss_samples",
        "serial",
        "state",
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
        self.key: Key = (tenant, execution_id)
        """(tenant, execution_id), built once: it is read on every hot path."""
        self.agent = agent
        self.kind = kind
        self.state = state
        self.phase: str | None = None
        self.parent_id: str | None = None
        self.created_at = at
        self.state_since = at
        self.updated_at = now
        self.registered_at = now
        self.last_heartbeat_at = now
        """Daemon clock at the last proof of life (heartbeat or event)."""
        self.last_progress_at = now
        """Daemon clock at the last change of progress, phase or state (the stall clock)."""
        self.running_at: float | None = None
        """Daemon clock when it first reached running (or beyond): the run clock's start."""
        self.paused_at: float | None = None
        self.paused_s = 0.0
        """Seconds spent paused so far: paused executions have no clocks running."""
        self.run_paused_s = 0.0
        """paused_s when the run clock started."""
        self.limits: dict[str, float] = {}
        self.memory_limit_bytes: int | None = None
        self.pid: int | None = None
        self.rss_bytes: int | None = None
        self.rss_samples: Sequence[tuple[float, int]] = NO_SAMPLES
        """The last RSS_SAMPLES (time, rss), oldest first: see add_rss_sample."""
        self.rss_sampled = False
        """The last RSS came from the daemon's own sample of `pid`, not from an event."""
        self.over_soft_since: float | None = None
        self.over_hard_since: float | None = None
        self.progress: float | int | str | None = None
        self.attributes: dict[str, Scalar] = NO_ATTRIBUTES
        self.error: Any = None
        self.traceparent: str | None = None
        self.last_seq: int | None = None
        self.finished_at: float | None = None
        self.finish_token = 0
        """Which retention entry is current (entries of an earlier finish go stale)."""
        self.died_from: ExecState | None = None
        """The state it was in when declared dead; a heartbeat revives it into that state."""
        self.cancel_reason: str | None = None
        """Why it was asked to stop (`cancel_requested`, `circuit_open`), until it ends."""
        self.breaker_trial = 0
        """The half-open period (breaker generation) that admitted it as a trial, else 0."""
        self.outcome_at: float | None = None
        """When its terminal outcome was counted by its breaker (taken back on revival)."""
        self.outcome_failed = False
        self.version = 0
        """Counts its changes: of a snapshot and a checkpoint, the higher version is newer
        (times cannot tell two changes in the same instant apart)."""
        self.findings: dict[str, FindingChange] = NO_FINDINGS
        self.clocks: dict[str, float] = {}
        """Detector bookkeeping: the earliest deadline queued per clock."""
        self.serial = serial
        self.history: Recent[Transition] = Recent(history)

    def add_rss_sample(self, at: float, rss: int) -> None:
        samples = self.rss_samples
        if not isinstance(samples, Recent):  # the shared empty: its own list from now on
            samples = self.rss_samples = Recent(RSS_SAMPLES)
        samples.append((at, rss))

    def to_dict(self, settings: Settings) -> dict[str, Any]:
        """The execution as the API shows it, with its effective limits and active findings."""
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
            "cancel_requested": self.cancel_reason is not None,
            "findings": [f.to_dict() for f in self.findings.values()],
            "history": [t.to_dict() for t in self.history],
        }

    def liveness(self) -> list[Any]:
        """The facts every heartbeat changes, in LIVENESS order (rss_samples last): what a
        checkpoint writes between the full snapshots that state changes write."""
        return [
            self.version, self.updated_at, self.last_heartbeat_at, self.last_progress_at,
            self.progress, self.rss_bytes, self.rss_sampled, self.last_seq,
            [list(s) for s in self.rss_samples],
        ]  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        """Every fact as plain data, for the store; Registry.restore() reads it back."""
        snap = {name: getattr(self, name) for name in _PLAIN}
        snap["kind"] = self.kind.value
        snap["state"] = self.state.value
        snap["serial"] = self.serial
        snap["limits"] = dict(self.limits)
        snap["attributes"] = dict(self.attributes)
        snap["rss_samples"] = [list(s) for s in self.rss_samples]
        snap["findings"] = [
            [f.finding, f.since, f.detail, f.detected_at] for f in self.findings.values()
        ]
        snap["history"] = [t.to_list() for t in self.history]
        return snap

    @classmethod
    def from_snapshot(cls, snap: dict[str, Any], serial: int, history: int) -> Execution:
        """The execution a snapshot describes, under a new serial."""
        ex = cls(
            snap["tenant"],
            snap["execution_id"],
            snap["agent"],
            Kind(snap["kind"]),
            ExecState(snap["state"]),
            snap["created_at"],
            snap["registered_at"],
            serial,
            history,
        )
        for name in _PLAIN:
            setattr(ex, name, snap[name] if name != "version" else snap.get(name, 0))
        if ex.died_from is not None:
            ex.died_from = ExecState(ex.died_from)
        ex.limits = dict(snap["limits"])
        if snap["attributes"]:
            ex.attributes = dict(snap["attributes"])
        if snap["rss_samples"]:
            ex.rss_samples = Recent(RSS_SAMPLES, ((t, rss) for t, rss in snap["rss_samples"]))
        if snap["findings"]:
            ex.findings = {}
        for name, since, detail, detected_at in snap["findings"]:
            ex.findings[name] = FindingChange(
                ex.tenant,
                ex.execution_id,
                ex.agent,
                ex.kind,
                name,
                True,
                since,
                detail,
                detected_at,
            )
        for old, new, at, phase, reason, revived, detected_at in snap["history"]:
            ex.history.append(
                Transition(
                    ex.tenant, ex.execution_id, ex.agent, ex.kind,
                    None if old is None else ExecState(old), ExecState(new), at, phase,
                    reason, revived, detected_at, ex.created_at,
                )
            )  # fmt: skip
        return ex


def limit_of(execution: Execution, name: str, settings: Settings) -> Any:
    """One effective limit: the execution's own, else its agent's, else [defaults]."""
    own = execution.limits.get(name)
    if own is not None:
        return own
    if name == "memory_limit_bytes" and execution.memory_limit_bytes is not None:
        return execution.memory_limit_bytes
    return getattr(settings.limits_for(execution.agent), name)


def effective_limits(execution: Execution, settings: Settings) -> dict[str, float | int]:
    """The limits that apply to `execution`, as the API shows them."""
    limits: dict[str, float | int] = {}
    for name in (*LIMIT_FIELDS, "memory_limit_bytes"):
        value = limit_of(execution, name, settings)
        if value is not None:
            limits[name] = value
    return limits
