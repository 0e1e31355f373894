"""Properties of the core over arbitrary event sequences (hypothesis)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.config import build_settings
from monitor.detectors.engine import Detectors
from monitor.errors import DuplicateEvent, Rejection
from monitor.events import LIMIT_FIELDS, parse_event, to_wire
from monitor.model import LIVENESS
from monitor.registry import Registry
from monitor.server.ingest import Ingestor
from monitor.states import BUILTIN_ALIASES, FINAL, ExecState, StateNames
from monitor.store import Store
from monitor.store.memory import MemoryStore
from monitor.store.sqlite import SqliteStore

NAMES = StateNames()
CANONICAL = {s.value for s in ExecState}
SPELLINGS = sorted(CANONICAL | set(BUILTIN_ALIASES) | {a.upper() for a in BUILTIN_ALIASES})

ids = st.sampled_from(["r1", "r2", "r3"])
details = st.fixed_dictionaries(
    {},
    optional={
        "run_timeout_s": st.sampled_from([5.0, 60.0]),
        "attributes": st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
        "pid": st.integers(1, 5),
        "error": st.sampled_from(["boom", "bust"]),
    },
)
state_events = st.builds(
    lambda i, s, agent, seq, eid, phase, progress, detail: {
        "type": "state",
        "execution_id": i,
        "state": s,
        **({"agent": agent} if agent else {}),
        **({"seq": seq} if seq is not None else {}),
        **({"event_id": eid} if eid else {}),
        **({"phase": phase} if phase else {}),
        **({"progress": progress} if progress is not None else {}),
        **detail,
    },
    ids,
    st.sampled_from(SPELLINGS),
    st.sampled_from([None, "a"]),
    st.none() | st.integers(0, 5),
    st.none() | st.sampled_from(["e1", "e2", "e3"]),
    st.none() | st.sampled_from(["thinking", "tool"]),
    st.none() | st.integers(0, 3),
    details,
)
heartbeats = st.builds(
    lambda i, agent, seq, detail: {
        "type": "heartbeat",
        "execution_id": i,
        **({"agent": agent} if agent else {}),
        **({"seq": seq} if seq is not None else {}),
        **detail,
    },
    ids,
    st.sampled_from([None, "a"]),
    st.none() | st.integers(0, 5),
    details,
)
wire_events = st.one_of(state_events, heartbeats)
steps = st.lists(st.tuples(wire_events, st.floats(0, 100)), max_size=60)


def run(sequence: list[tuple[dict[str, Any], float]]) -> tuple[Registry, list[Any]]:
    registry = Registry(build_settings({}))
    now = 1000.0
    outcomes: list[Any] = []
    for wire, dt in sequence:
        now += dt
        try:
            outcomes.append(registry.apply(parse_event(wire, now, NAMES), now))
        except (Rejection, DuplicateEvent) as exc:
            outcomes.append(exc)
    return registry, outcomes


@settings(max_examples=300, deadline=None)
@given(steps)
def test_no_event_sequence_leaves_a_final_state(
    sequence: list[tuple[dict[str, Any], float]],
) -> None:
    """Once completed/failed/timeout/cancelled, an execution never changes again."""
    registry = Registry(build_settings({}))
    final: dict[str, ExecState] = {}
    now = 1000.0
    for wire, dt in sequence:
        now += dt
        event = parse_event(wire, now, NAMES)
        status = None
        try:
            registry.apply(event, now)
        except Rejection as exc:
            status = exc.status
        except DuplicateEvent:
            status = 200
        if event.execution_id in final:
            # Rejected as final_state (or stale_seq when seq says so first), or a duplicate.
            assert status in (409, 200)
        ex = registry.get("default", event.execution_id)
        if ex is not None and ex.state in FINAL:
            final.setdefault(ex.execution_id, ex.state)
            assert final[ex.execution_id] == ex.state


@settings(max_examples=300, deadline=None)
@given(steps)
def test_aliases_are_never_emitted(sequence: list[tuple[dict[str, Any], float]]) -> None:
    """Transitions and the API speak canonical states only, whatever spelling came in."""
    registry, outcomes = run(sequence)
    for outcome in outcomes:
        if outcome is not None and not isinstance(outcome, Exception):
            assert outcome.new.value in CANONICAL
            assert outcome.old is None or outcome.old.value in CANONICAL
    for ex in registry:
        view = ex.to_dict(registry.settings)
        assert view["state"] in CANONICAL
        assert all(h["to"] in CANONICAL for h in view["history"])
        assert all(h["from"] is None or h["from"] in CANONICAL for h in view["history"])


@settings(max_examples=200, deadline=None)
@given(steps)
def test_restoring_snapshots_gives_the_same_registry(
    sequence: list[tuple[dict[str, Any], float]],
) -> None:
    """What the store keeps is enough to rebuild the registry exactly."""
    registry, _ = run(sequence)
    fresh = Registry(registry.settings)
    for ex in registry:
        fresh.restore(ex.snapshot())
    assert [ex.to_dict(registry.settings) for ex in registry] == [
        ex.to_dict(fresh.settings) for ex in fresh
    ]
    assert registry.finished_count == fresh.finished_count


finite = st.floats(allow_nan=False, allow_infinity=False)
names = st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=20)
identifiers = st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True)
full_events = st.fixed_dictionaries(
    {"type": st.just("state"), "execution_id": identifiers, "state": st.sampled_from(SPELLINGS)},
    optional={
        "agent": names,
        "tenant": identifiers,
        "ts": st.floats(0, 4e9),
        "event_id": names,
        "seq": st.integers(0, 2**63 - 1),
        "phase": names,
        "kind": st.sampled_from(["agent", "job", "workflow", "tool"]),
        "parent_id": identifiers,
        **{name: st.floats(0.001, 1e6) for name in LIMIT_FIELDS},
        "memory_limit_bytes": st.integers(1, 2**40),
        "pid": st.integers(1, 2**22),
        "rss_bytes": st.integers(0, 2**40),
        "progress": finite | names,
        "error": names | st.dictionaries(names, names, max_size=3),
        "attributes": st.dictionaries(
            names,
            st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | names,
            max_size=5,
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(full_events)
def test_parse_and_serialise_round_trip(wire: dict[str, Any]) -> None:
    """to_wire(parse(x)) parses back to the same event, in canonical spelling."""
    event = parse_event(wire, 1000.0, NAMES)
    again = parse_event(to_wire(event), 1000.0, NAMES)
    assert event == again
    assert to_wire(event)["state"] in CANONICAL


BATCHES = st.lists(
    st.tuples(st.lists(wire_events, min_size=1, max_size=8), st.floats(0, 50)), max_size=12
)


@settings(max_examples=150, deadline=None)
@given(BATCHES)
def test_what_ingest_committed_replays_to_the_live_registry(
    batches: list[tuple[list[dict[str, Any]], float]],
) -> None:
    """The store holds exactly what was acknowledged: replaying it rebuilds the registry."""
    assert_replay_matches(batches, MemoryStore)


@settings(max_examples=40, deadline=None)
@given(BATCHES)
def test_the_sqlite_file_replays_to_the_live_registry(
    batches: list[tuple[list[dict[str, Any]], float]],
) -> None:
    """The same through the real SQLite store, with a fresh store opened on the file."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "execwatch.db")
        assert_replay_matches(batches, lambda: SqliteStore(path))


@settings(max_examples=40, deadline=None)
@given(BATCHES)
def test_with_checkpoints_the_sqlite_file_replays_liveness_too(
    batches: list[tuple[list[dict[str, Any]], float]],
) -> None:
    """A checkpoint after every batch: heartbeat times, progress, rss and seq come back."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "execwatch.db")
        assert_replay_matches(batches, lambda: SqliteStore(path), checkpoints=True)


@settings(max_examples=60, deadline=None)
@given(BATCHES)
def test_with_checkpoints_the_memory_store_replays_liveness_too(
    batches: list[tuple[list[dict[str, Any]], float]],
) -> None:
    assert_replay_matches(batches, MemoryStore, checkpoints=True)


def assert_replay_matches(
    batches: list[tuple[list[dict[str, Any]], float]],
    open_store: Callable[[], Store],
    checkpoints: bool = False,
) -> None:
    async def scenario() -> tuple[Detectors, Detectors]:
        live = Registry(build_settings({"breaker": {"minimum_calls": 2}}))
        store = open_store()
        ingestor = Ingestor(Detectors(live, live.settings), store, NAMES)
        now = 1000.0
        for batch, dt in batches:
            now += dt
            await ingestor.ingest(orjson.dumps(batch), "application/json", now)
            if checkpoints:
                await ingestor.commit(checkpoint=True)
        await store.close()
        replayed = Detectors(Registry(live.settings), live.settings)
        reopened = open_store() if isinstance(store, SqliteStore) else store
        replayed.registry.restore_all(await reopened.load())
        replayed.restore_breakers(await reopened.load_breakers())
        await reopened.close()
        return ingestor.detectors, replayed

    live, replayed = asyncio.run(scenario())

    # Liveness facts are checkpointed, not committed per event: without a checkpoint
    # after each batch, compare everything else.
    liveness = set() if checkpoints else set(LIVENESS)

    def view(registry: Registry) -> list[dict[str, Any]]:
        return [{k: v for k, v in ex.snapshot().items() if k not in liveness} for ex in registry]

    assert view(live.registry) == view(replayed.registry)

    def breakers(detectors: Detectors) -> dict[tuple[str, str], dict[str, Any]]:
        return {key: b.snapshot() for key, b in detectors.breakers.items()}

    # Breakers created but never changed (admission into a closed one) are not written.
    assert {k: v for k, v in breakers(live).items() if v["window"] or v["state"] != "closed"} == {
        k: v for k, v in breakers(replayed).items() if v["window"] or v["state"] != "closed"
    }
