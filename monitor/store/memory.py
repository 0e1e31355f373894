"""Stores that keep nothing on disk: MemoryStore (the tests' store) and NullStore
(`database = ":memory:"`)."""

from __future__ import annotations

from monitor.model import Key
from monitor.store import Changes, Snapshot, merge_liveness


class MemoryStore:
    """Keeps the latest snapshot of every execution in memory; survives nothing."""

    def __init__(self) -> None:
        self.snapshots: dict[tuple[str, str], Snapshot] = {}
        self.breakers: dict[tuple[str, str], Snapshot] = {}
        self.span_contexts: dict[Key, tuple[str, str, bool]] = {}
        self.commits = 0
        self.closed = False

    async def load(self) -> list[Snapshot]:
        return sorted(self.snapshots.values(), key=lambda snap: int(snap["serial"]))

    async def load_breakers(self) -> list[Snapshot]:
        return list(self.breakers.values())

    async def load_span_contexts(self) -> list[tuple[Key, tuple[str, str, bool]]]:
        return [(key, ctx) for key, ctx in self.span_contexts.items() if key in self.snapshots]

    async def commit(self, changes: Changes) -> None:
        for key in changes.evicted:  # first, as SQLite does: an eviction, then a return
            self.snapshots.pop(key, None)
            self.span_contexts.pop(key, None)
        for ex in changes.executions:
            self.snapshots[ex.key] = ex.snapshot()
        self.span_contexts.update(
            (key, ctx) for key, ctx in changes.span_contexts if key in self.snapshots
        )
        for ex in changes.liveness:
            snap = self.snapshots.get(ex.key)
            if snap is not None:
                merge_liveness(snap, ex.liveness())
        for breaker in changes.breakers:
            self.breakers[(breaker.tenant, breaker.agent)] = breaker.snapshot()
        for bkey in changes.forgotten_breakers:
            self.breakers.pop(bkey, None)
        self.commits += 1

    async def close(self) -> None:
        self.closed = True


class NullStore:
    """Keeps nothing: `database = ":memory:"`, and the daemon until a durable store exists.

    Commits cost nothing, so detections and acknowledgements never wait on copies that
    no one will read."""

    async def load(self) -> list[Snapshot]:
        return []

    async def load_breakers(self) -> list[Snapshot]:
        return []

    async def load_span_contexts(self) -> list[tuple[Key, tuple[str, str, bool]]]:
        return []

    async def commit(self, changes: Changes) -> None:
        return None

    async def close(self) -> None:
        return None
