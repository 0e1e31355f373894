"""Canonical execution states, the transition table and the alias table: data plus one function."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from monitor.errors import FinalState, InvalidTransition


class ExecState(StrEnum):
    """The ten canonical states; the values are the wire, label and log strings."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETING = "completing"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    DEAD = "dead"


S = ExecState

LIVE: frozenset[ExecState] = frozenset({S.PENDING, S.STARTING, S.RUNNING, S.PAUSED, S.COMPLETING})
"""Non-terminal states: the execution is still expected to report."""

FINAL: frozenset[ExecState] = frozenset({S.COMPLETED, S.FAILED, S.TIMEOUT, S.CANCELLED})
"""Terminal states nothing may follow (rule 6)."""

TERMINAL: frozenset[ExecState] = FINAL | {S.DEAD}
"""Terminal states; `dead` is terminal unless the execution proves it is alive (rule 5)."""

_FORWARD = (S.PENDING, S.STARTING, S.RUNNING, S.COMPLETING)


def _build_table() -> Mapping[ExecState, frozenset[ExecState]]:
    table: dict[ExecState, frozenset[ExecState]] = {}
    for i, state in enumerate(_FORWARD):
        # Rule 2: forward, skipping allowed; rule 3: pause; rule 4: any terminal.
        table[state] = frozenset(_FORWARD[i + 1 :]) | {S.PAUSED} | TERMINAL
    # Rule 3: paused is left to starting, running or completing (or ends, rule 4).
    table[S.PAUSED] = frozenset({S.STARTING, S.RUNNING, S.COMPLETING}) | TERMINAL
    # Rule 5: proof of life revives a dead execution into anything but pending.
    table[S.DEAD] = frozenset(ExecState) - {S.PENDING, S.DEAD}
    # Rule 6: final states are final.
    for state in FINAL:
        table[state] = frozenset()
    return MappingProxyType(table)


ALLOWED: Mapping[ExecState, frozenset[ExecState]] = _build_table()
"""Rules 2-6 as a table: state -> the states it may move to (a same-state event is rule 1)."""


def allowed_targets(state: ExecState) -> tuple[ExecState, ...]:
    """The states `state` may move to, in canonical order (for error messages)."""
    targets = ALLOWED[state]
    return tuple(s for s in ExecState if s in targets)


def check_transition(execution_id: str, current: ExecState, target: ExecState) -> bool:
    """Validate `current -> target`: True for a change, False for a no-op; raise if forbidden.

    Rule 1 makes the same state again a no-op, except after a final state,
    where rule 6 rejects every later event.
    """
    if target in ALLOWED[current]:
        return True
    if current in FINAL:
        raise FinalState(execution_id, current, target)
    if target == current:
        return False
    raise InvalidTransition(execution_id, current, target, allowed_targets(current))


# Alias -> (canonical state, implied phase). Case-insensitive: keys are lower case.
BUILTIN_ALIASES: Mapping[str, tuple[ExecState, str | None]] = MappingProxyType(
    {
        "queued": (S.PENDING, None),
        "scheduled": (S.PENDING, None),
        "initializing": (S.STARTING, None),
        "init": (S.STARTING, None),
        "in_progress": (S.RUNNING, None),
        "active": (S.RUNNING, None),
        "recovering": (S.RUNNING, "recovering"),
        "yielded": (S.PAUSED, None),
        "suspended": (S.PAUSED, None),
        "success": (S.COMPLETED, None),
        "succeeded": (S.COMPLETED, None),
        "ok": (S.COMPLETED, None),
        "done": (S.COMPLETED, None),
        "complete": (S.COMPLETED, None),
        "finished": (S.COMPLETED, None),
        "error": (S.FAILED, None),
        "errored": (S.FAILED, None),
        "timed_out": (S.TIMEOUT, None),
        "timedout": (S.TIMEOUT, None),
        "aborted": (S.CANCELLED, None),
        "canceled": (S.CANCELLED, None),
    }
)


class StateNames:
    """Resolves an incoming state spelling (canonical or alias, any case) to a canonical state."""

    __slots__ = ("_table",)

    def __init__(self, extra: Mapping[str, ExecState] | None = None) -> None:
        table: dict[str, tuple[ExecState, str | None]] = {s.value: (s, None) for s in ExecState}
        table.update(BUILTIN_ALIASES)
        for name, state in (extra or {}).items():
            table[name.lower()] = (ExecState(state), None)
        # Exact-case hits skip the lower() call on the hot path.
        for name, value in list(table.items()):
            table.setdefault(name.upper(), value)
        self._table = table

    def resolve(self, name: str) -> tuple[ExecState, str | None] | None:
        """The canonical state and implied phase for `name`, or None if it is unknown."""
        hit = self._table.get(name)
        if hit is None:
            hit = self._table.get(name.lower())
        return hit
