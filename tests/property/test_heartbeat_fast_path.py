"""The common heartbeat's fast path does exactly what the general path does (hypothesis).

`parse_beat` + `Registry.beat` skip building an Event for most of the traffic; whatever
they take must leave the registry, the detectors and the answer as `parse_event` +
`Detectors.apply` would, and whatever they decline must go on to the general path."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from hypothesis import event, given, settings
from hypothesis import strategies as st

from monitor.config import build_settings
from monitor.detectors.engine import Detectors
from monitor.errors import DuplicateEvent, ForbiddenField, OtherTenant, Rejection
from monitor.events import parse_beat, parse_event
from monitor.model import Execution
from monitor.registry import Registry
from monitor.server.ingest import Ingestor
from monitor.states import StateNames
from monitor.store.memory import MemoryStore

NAMES = StateNames()
# Mostly values the fast path must take, some it must leave to the general path.
ids = st.sampled_from(["r1", "r2", "r3"] * 5 + ["bad id", ""])
agents = st.sampled_from(["a"] * 8 + ["b", "", "x\ny", 7, ["a"]])
seqs = st.sampled_from([*range(7)] * 3 + [-1, 2**63, 1.5, "3", True])
progresses = st.sampled_from([*range(4)] * 4 + [0.5, float("nan"), "step", "s" * 300, True, [1]])
tenants = st.sampled_from(["default"] * 4 + ["t1", "bad tenant", 5])
extras = st.sampled_from(
    [{}] * 12
    + [{"ts": 1000.0}, {"phase": "p"}, {"rss_bytes": 5}, {"event_id": "e1"}, {"pid": 3}]
    + [{"x": 1}, {"agent": None}, {"progress": None}]
)
beats = st.builds(
    lambda i, optional, extra: {"type": "heartbeat", "execution_id": i, **optional, **extra},
    ids,
    st.fixed_dictionaries(
        {},
        optional={"agent": agents, "seq": seqs, "progress": progresses, "tenant": tenants},
    ),
    extras,
)
states = st.builds(
    lambda i, s, seq, tenant: {
        "type": "state", "execution_id": i, "state": s, "agent": "a", "seq": seq,
        "tenant": tenant,
    },
    ids,
    st.sampled_from(["pending", "running", "paused", "completed", "dead", "failed", "running"]),
    st.none() | st.integers(0, 5),
    st.sampled_from(["default", "t1"]),
)  # fmt: skip
CANCEL = {"cancel": True}
"""A step that asks every live execution named r1 to stop (a pending directive)."""
steps = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 1, 1, 2]).flatmap(
            lambda n: states if n == 0 else beats if n == 1 else st.just(CANCEL)
        ),
        st.floats(0, 30),  # under the heartbeat timeout: most executions stay alive
    ),
    max_size=40,
)
CONFIG = build_settings({"defaults": {"stall_timeout_s": 20.0, "heartbeat_timeout_s": 60.0}})
RUNNING = [
    {"type": "state", "execution_id": i, "state": "running", "agent": "a", "tenant": t}
    for i in ("r1", "r2", "r3")
    for t in ("default", "t1")
]


def general(detectors: Detectors, wire: Any, now: float, tenant: str | None) -> Any:
    """What the ingest loop does with an event that is not taken by the fast path."""
    try:
        event = parse_event(wire, now, NAMES, tenant)
        if tenant is not None:
            if event.tenant != tenant:
                raise OtherTenant(tenant, event.tenant)
            if event.pid is not None:
                raise ForbiddenField("pid", "no")
        return ("applied", detectors.apply(event, now))
    except DuplicateEvent:
        return ("duplicate",)
    except Rejection as exc:
        return ("rejected", exc.reason, exc.message)


def state_of(detectors: Detectors) -> Any:
    registry = detectors.registry
    executions = {
        ex.key: {name: getattr(ex, name) for name in Execution.__slots__} for ex in registry
    }
    return (
        executions,
        registry.heartbeats,
        list(registry.touched),
        list(registry.outbox),
        dict(registry.findings),
        dict(registry.stopping),
        list(registry.dirty),
        dict(registry.counts),
        list(registry.with_pid),
        registry.finished_count,
        {key: breaker.state for key, breaker in detectors.breakers.items()},
        detectors.queued,
        list(detectors.outbox),
    )


def cancel(detectors: Detectors) -> None:
    for ex in detectors.registry:
        if ex.execution_id == "r1":
            detectors.registry.request_cancel(ex, "cancel_requested")


@settings(max_examples=500, deadline=None)
@given(steps, st.sampled_from([None, "t1"]))
def test_the_fast_path_does_what_the_general_path_does(
    sequence: list[tuple[dict[str, Any], float]], tenant: str | None
) -> None:
    """Same outcome per event, same registry and detector state after every event."""
    fast, slow = Detectors(Registry(CONFIG), CONFIG), Detectors(Registry(CONFIG), CONFIG)
    now, taken = 1000.0, 0
    for wire, dt in [*((wire, 0.0) for wire in RUNNING), *sequence]:
        now += dt
        for detectors in (fast, slow):
            detectors.tick(now)  # the same deaths, stalls and timeouts on both sides
            if wire is CANCEL:
                cancel(detectors)
        if wire is CANCEL:
            continue
        beat = parse_beat(wire, tenant)
        if beat is not None and fast.registry.beat(beat, now):
            taken += 1
            outcome: Any = ("applied", None)
        else:
            outcome = general(fast, wire, now, tenant)
        assert general(slow, wire, now, tenant) == outcome, wire
        assert state_of(slow) == state_of(fast), wire
    event(f"fast path took {min(taken, 3)}{'+' if taken >= 3 else ''}")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.lists(st.one_of(beats, states), max_size=12), st.floats(0, 30)),
             max_size=12),
    st.sampled_from([None, "t1", "default"]),
)  # fmt: skip
def test_an_ingestor_answers_and_feeds_the_sinks_the_same_with_the_fast_path_off(
    batches: list[tuple[list[dict[str, Any]], float]], tenant: str | None
) -> None:
    """The whole ingest loop: answers, stats and the records every sink receives, in order,
    are the same whether the fast path takes the common heartbeats or not."""

    async def run(fast_beats: bool) -> Any:
        detectors = Detectors(Registry(CONFIG), CONFIG)
        records: list[Any] = []
        ingestor = Ingestor(detectors, MemoryStore(), NAMES, [records.extend])
        ingestor.fast_beats = fast_beats
        answers, now = [], 1000.0
        for batch, dt in [(RUNNING, 0.0), *batches]:
            now += dt
            await ingestor.sweep(lambda at=now: detectors.tick(at).records)
            if batches and batch is batches[0][0]:
                cancel(detectors)  # a directive pending for r1 from the first batch on
            result = await ingestor.ingest(orjson.dumps(batch), "application/json", now, tenant)
            answers.append((result.status, result.body))
        stats = ingestor.stats
        counters = (stats.received, stats.rejected, stats.accepted, stats.duplicates,
                    stats.ingest_lag_s)  # fmt: skip
        return answers, counters, records, state_of(detectors)

    assert asyncio.run(run(False)) == asyncio.run(run(True))


def test_plain_heartbeats_to_live_executions_take_the_fast_path() -> None:
    """The shapes the SDK and most senders use are taken; the rest are declined."""
    config = build_settings({})
    detectors = Detectors(Registry(config), config)
    register = {"type": "state", "execution_id": "r", "state": "running", "agent": "a"}
    detectors.apply(parse_event(register, 1000.0, NAMES), 1000.0)
    registry = detectors.registry
    for wire in (
        {"type": "heartbeat", "execution_id": "r"},
        {"type": "heartbeat", "execution_id": "r", "seq": 3, "progress": 2},
        {"type": "heartbeat", "execution_id": "r", "agent": "a", "tenant": "default"},
        {"type": "heartbeat", "execution_id": "r", "progress": None, "seq": None},
    ):
        beat = parse_beat(wire)
        assert beat is not None, wire
        assert registry.beat(beat, 1001.0), wire
    for wire in (
        {"type": "heartbeat", "execution_id": "new", "agent": "a"},  # registers
        {"type": "heartbeat", "execution_id": "r", "agent": "b"},  # another agent: 409
        {"type": "heartbeat", "execution_id": "r", "seq": 1},  # stale
    ):
        beat = parse_beat(wire)
        assert beat is not None, wire
        assert not registry.beat(beat, 1002.0), wire
    for wire in (
        {"type": "state", "execution_id": "r", "state": "running"},
        {"type": "heartbeat", "execution_id": "r", "ts": 1000.0},
        {"type": "heartbeat", "execution_id": "r", "rss_bytes": 10},
        {"type": "heartbeat", "execution_id": "r", "tenant": "t1"},  # bound to default below
        {"type": "heartbeat", "execution_id": "bad id"},
    ):
        assert parse_beat(wire, "default") is None, wire
