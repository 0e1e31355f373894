"""Persistence behind a small Protocol; the daemon awaits commit() before it acknowledges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from monitor.detectors.breaker import Breaker
from monitor.detectors.engine import Record
from monitor.model import LIVENESS, Execution, Key

Snapshot = dict[str, Any]
"""An execution as Execution.snapshot() writes it and Registry.restore() reads it."""


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed since the last commit."""

    records: Sequence[Record] = ()
    """Transitions and findings, in order: the history a store may keep."""
    executions: Sequence[Execution] = ()
    """Every execution changed, live objects: commit() must snapshot them before its first
    await, because the registry goes on changing them."""
    evicted: Sequence[Key] = ()
    breakers: Sequence[Breaker] = ()
    """Every breaker changed, live objects: snapshot them before the first await too."""
    forgotten_breakers: Sequence[tuple[str, str]] = ()
    """(tenant, agent) of the breakers forgotten: delete them."""
    span_contexts: Sequence[tuple[Key, tuple[str, str, bool]]] = ()
    """(trace_id, span_id, sampled) of executions' spans, as hex, started since the last
    commit: a restart continues their traces."""
    liveness: Sequence[Execution] = ()
    """A checkpoint: executions whose Execution.liveness() facts changed. These may be
    read after an await (a newer value is as good a checkpoint), in slices."""


def merge_liveness(snap: Snapshot, facts: list[Any]) -> None:
    """Lay a checkpoint's Execution.liveness() facts over a snapshot, unless the snapshot
    is as new or newer (its `version`, which counts the execution's changes)."""
    if facts[0] > snap.get("version", 0):
        snap.update(zip(LIVENESS, facts, strict=True))


class Store(Protocol):
    """Where acknowledged state survives the daemon. commit() returns only once durable."""

    async def load(self) -> list[Snapshot]:
        """Every kept execution, in registration order, for Registry.restore()."""
        ...

    async def load_breakers(self) -> list[Snapshot]:
        """Every kept breaker, as Breaker.snapshot() wrote it."""
        ...

    async def load_span_contexts(self) -> list[tuple[Key, tuple[str, str, bool]]]:
        """The span context of every kept execution that has one."""
        ...

    async def commit(self, changes: Changes) -> None:
        """Persist `changes`; return only when they would survive a crash."""
        ...

    async def close(self) -> None:
        """Flush and release the store."""
        ...
