"""The named deadlines of an execution, derived from its facts and `now`: pure functions.

A deadline is never stored as truth: the scheduler's heap only says when to look
again, and each clock is recomputed from the facts when it falls due (healthchecks'
habit). Paused executions have no clocks running; time spent paused does not count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from monitor.config import Settings
from monitor.model import Execution, limit_of
from monitor.states import ExecState

S = ExecState
_STARTED = frozenset({S.STARTING, S.RUNNING, S.COMPLETING})
"""States in which an execution is expected to heartbeat (pending is waiting in a queue)."""
_NOT_YET_RUNNING = frozenset({S.PENDING, S.STARTING})
_TICKING = frozenset({S.PENDING, S.STARTING, S.RUNNING, S.COMPLETING})

Deadline = Callable[[Execution, Settings, float], float | None]
"""(execution, settings, sighted_since) -> when the clock expires, or None if it is not running.

`sighted_since` is when the daemon last regained sight (start-up, or the end of a
stall of its own loop): liveness clocks never start before it.
"""


def start_deadline(ex: Execution, settings: Settings, sighted_since: float) -> float | None:
    """First event -> reaching running ("never started"), paused time excluded."""
    if ex.state not in _NOT_YET_RUNNING:
        return None
    limit: float | None = limit_of(ex, "start_timeout_s", settings)
    return None if limit is None else ex.registered_at + ex.paused_s + limit


def run_deadline(ex: Execution, settings: Settings, sighted_since: float) -> float | None:
    """Entering running -> terminal, paused time excluded."""
    if ex.state not in _TICKING or ex.running_at is None:
        return None
    limit: float | None = limit_of(ex, "run_timeout_s", settings)
    if limit is None:
        return None
    return ex.running_at + (ex.paused_s - ex.run_paused_s) + limit


def total_deadline(ex: Execution, settings: Settings, sighted_since: float) -> float | None:
    """First event -> terminal, paused time excluded."""
    if ex.state not in _TICKING:
        return None
    limit: float | None = limit_of(ex, "timeout_s", settings)
    return None if limit is None else ex.registered_at + ex.paused_s + limit


def heartbeat_deadline(ex: Execution, settings: Settings, sighted_since: float) -> float | None:
    """Last heartbeat or event -> the next one, once started; never before sight returned."""
    if ex.state not in _STARTED:
        return None
    limit: float | None = limit_of(ex, "heartbeat_timeout_s", settings)
    if limit is None:
        return None
    return max(ex.last_heartbeat_at, sighted_since) + limit


def stall_deadline(ex: Execution, settings: Settings, sighted_since: float) -> float | None:
    """Last change of progress, phase or state -> the next one, while started."""
    if ex.state not in _STARTED:
        return None
    limit: float | None = limit_of(ex, "stall_timeout_s", settings)
    if limit is None:
        return None
    return max(ex.last_progress_at, sighted_since) + limit


def memory_high_deadline(ex: Execution, settings: Settings, sighted_since: float) -> float | None:
    """Over the soft limit for memory_hold_s (until the finding is raised)."""
    if ex.over_soft_since is None or ex.state not in _TICKING or "memory_high" in ex.findings:
        return None
    hold: float = settings.limits_for(ex.agent).memory_hold_s or 0.0
    return ex.over_soft_since + hold


def memory_exceeded_deadline(
    ex: Execution, settings: Settings, sighted_since: float
) -> float | None:
    """Over the hard limit for memory_hold_s (until the finding is raised)."""
    if ex.over_hard_since is None or ex.state not in _TICKING or "memory_exceeded" in ex.findings:
        return None
    hold: float = settings.limits_for(ex.agent).memory_hold_s or 0.0
    return ex.over_hard_since + hold


CLOCKS: Mapping[str, Deadline] = {
    "start_timeout": start_deadline,
    "run_timeout": run_deadline,
    "total_timeout": total_deadline,
    "heartbeat": heartbeat_deadline,
    "stalled": stall_deadline,
    "memory_high": memory_high_deadline,
    "memory_exceeded": memory_exceeded_deadline,
}
"""Every clock by the reason its expiry carries."""

TIMEOUTS = frozenset({"start_timeout", "run_timeout", "total_timeout"})
"""Clocks whose expiry ends the execution in `timeout`."""

SCHEDULED_ON_CHANGE = tuple(CLOCKS)
"""Clocks (re)scheduled whenever an execution's state or limits change, or it is restored."""
