"""Persistence behind a small Protocol; the daemon awaits commit() before it acknowledges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from monitor.detectors.breaker import Breaker
from monitor.detectors.engine import Record
from monitor.model import Execution, Key

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


class Store(Protocol):
    """Where acknowledged state survives the daemon. commit() returns only once durable."""

    async def load(self) -> list[Snapshot]:
        """Every kept execution, in registration order, for Registry.restore()."""
        ...

    async def load_breakers(self) -> list[Snapshot]:
        """Every kept breaker, as Breaker.snapshot() wrote it."""
        ...

    async def commit(self, changes: Changes) -> None:
        """Persist `changes`; return only when they would survive a crash."""
        ...

    async def close(self) -> None:
        """Flush and release the store."""
        ...
