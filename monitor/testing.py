"""Fakes shipped with the product for tests: a fake clock, event factories, recording
sinks, a store whose commits wait on a gate."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from monitor.model import Transition
from monitor.registry import Record
from monitor.store import Changes
from monitor.store.memory import MemoryStore

EPOCH = 1_763_740_000.0
"""A fixed, realistic start time (2025-11-21) for fake clocks."""


class FakeClock:
    """A clock that moves only when told; pass it wherever a `clock` is taken."""

    def __init__(self, start: float = EPOCH) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` and return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock never goes back; got advance({seconds})")
        self.now += seconds
        return self.now


def state_event(execution_id: str, state: str, **fields: Any) -> dict[str, Any]:
    """A wire `state` event; the first one of an execution needs `agent=`."""
    return {"type": "state", "execution_id": execution_id, "state": state, **fields}


def heartbeat(execution_id: str, **fields: Any) -> dict[str, Any]:
    """A wire heartbeat; with `agent=` it registers an unknown execution as running."""
    return {"type": "heartbeat", "execution_id": execution_id, **fields}


class RecordingSink:
    """A sink that keeps every batch of records it is given."""

    def __init__(self) -> None:
        self.batches: list[list[Record]] = []

    def __call__(self, records: Sequence[Record]) -> None:
        self.batches.append(list(records))

    @property
    def records(self) -> list[Record]:
        return [r for batch in self.batches for r in batch]

    @property
    def transitions(self) -> list[Transition]:
        return [r for r in self.records if isinstance(r, Transition)]


class FailingSink:
    """A sink that always raises, to prove one failing exporter never stops ingestion."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, records: Sequence[Record]) -> None:
        self.calls += 1
        raise RuntimeError("this sink always fails")


class GatedStore(MemoryStore):
    """A MemoryStore whose commits wait until `open()`: a slow disk, on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0

    def open(self) -> None:
        self.gate.set()

    async def commit(self, changes: Changes) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        await super().commit(changes)
