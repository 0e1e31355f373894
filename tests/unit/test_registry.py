"""The registry: apply(event, now) -> Transition | None, with a fake clock and no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from monitor.config import build_settings
from monitor.errors import (
    DuplicateEvent,
    EventError,
    EvictedExecution,
    FinalState,
    InvalidTransition,
    StaleSeq,
    UnknownExecution,
)
from monitor.events import parse_event
from monitor.model import NO_ATTRIBUTES, NO_FINDINGS, NO_SAMPLES
from monitor.registry import Registry, Transition
from monitor.states import ExecState, StateNames
from monitor.testing import FakeClock, heartbeat, state_event

S = ExecState
NAMES = StateNames()


class World:
    """A registry driven by wire events at a fake time."""

    def __init__(self, **retention: Any) -> None:
        self.clock = FakeClock()
        self.registry = Registry(build_settings({"retention": retention}))

    def send(self, obj: dict[str, Any]) -> Transition | None:
        return self.registry.apply(parse_event(obj, self.clock(), NAMES), self.clock())

    def state(self, execution_id: str, tenant: str = "default") -> ExecState:
        ex = self.registry.get(tenant, execution_id)
        assert ex is not None
        return ex.state


@pytest.fixture
def world() -> World:
    return World()


def test_a_state_event_registers_an_execution(world: World) -> None:
    """The first event names the agent and yields a transition from nothing."""
    transition = world.send(state_event("run-1", "queued", agent="triage"))
    assert transition is not None
    assert (None, S.PENDING, "triage") == (transition.old, transition.new, transition.agent)
    assert S.PENDING == world.state("run-1")


def test_a_heartbeat_that_names_the_agent_registers_it_as_running(world: World) -> None:
    """A heartbeat can register: it proves the execution runs."""
    transition = world.send(heartbeat("run-1", agent="triage"))
    assert transition is not None
    assert S.RUNNING == transition.new


def test_an_unknown_execution_without_agent_is_404(world: World) -> None:
    """Nothing is registered without an agent; the error says how to register."""
    with pytest.raises(UnknownExecution) as caught:
        world.send(heartbeat("run-1"))
    assert 404 == caught.value.status
    assert "its first event must name 'agent'" in caught.value.message
    assert 0 == len(world.registry)


def test_heartbeats_update_liveness_without_a_transition(world: World) -> None:
    """A heartbeat moves the daemon-side clocks, not the state."""
    world.send(state_event("r", "running", agent="a"))
    world.clock.advance(5)
    assert world.send(heartbeat("r", rss_bytes=100, progress=1)) is None
    ex = world.registry.get("default", "r")
    assert ex is not None
    assert (world.clock(), 100, 1) == (ex.last_heartbeat_at, ex.rss_bytes, ex.progress)


def test_liveness_uses_the_daemon_clock_not_the_senders_ts(world: World) -> None:
    """A sender whose clock is an hour behind still counts as alive now."""
    world.send(state_event("r", "running", agent="a"))
    world.clock.advance(10)
    world.send(heartbeat("r", ts=world.clock() - 3600))
    ex = world.registry.get("default", "r")
    assert ex is not None
    assert world.clock() == ex.last_heartbeat_at


def test_history_times_come_from_ts(world: World) -> None:
    """Transitions are dated by the event's ts, for ordering and durations."""
    world.send(state_event("r", "running", agent="a", ts=1000.0))
    world.send(state_event("r", "completed", ts=1060.0))
    ex = world.registry.get("default", "r")
    assert ex is not None
    assert [1000.0, 1060.0] == [t.at for t in ex.history]


def test_the_same_state_again_is_a_noop_that_may_change_the_phase(world: World) -> None:
    """Rule 1: no transition, but a new phase is a record of its own."""
    world.send(state_event("r", "running", agent="a"))
    assert world.send(state_event("r", "running")) is None
    transition = world.send(state_event("r", "running", phase="tool_executing"))
    assert transition is not None
    assert (S.RUNNING, S.RUNNING, "tool_executing") == (
        transition.old,
        transition.new,
        transition.phase,
    )


def test_an_invalid_transition_changes_nothing(world: World) -> None:
    """Rule 7: a rejected event leaves no trace, not even its progress or limits."""
    world.send(state_event("r", "running", agent="a", progress=1))
    with pytest.raises(InvalidTransition):
        world.send(state_event("r", "starting", progress=2, run_timeout_s=9))
    ex = world.registry.get("default", "r")
    assert ex is not None
    assert (S.RUNNING, 1, {}) == (ex.state, ex.progress, ex.limits)


def test_nothing_follows_a_final_state(world: World) -> None:
    """Rule 6: state events and heartbeats after `completed` are 409 final_state."""
    world.send(state_event("r", "running", agent="a"))
    world.send(state_event("r", "done"))
    for event in (state_event("r", "running"), heartbeat("r"), state_event("r", "completed")):
        with pytest.raises(FinalState):
            world.send(event)


def test_a_dead_execution_is_revived_by_a_heartbeat(world: World) -> None:
    """Rule 5: proof of life brings it back to the state it died in, flagged as a revival."""
    world.send(state_event("r", "running", agent="a", phase="thinking"))
    world.send(state_event("r", "dead"))
    transition = world.send(heartbeat("r"))
    assert transition is not None
    assert (S.DEAD, S.RUNNING, True) == (transition.old, transition.new, transition.revived)
    assert 0 == world.registry.finished_count


def test_a_dead_execution_is_revived_by_a_state_event_but_not_into_pending(
    world: World,
) -> None:
    """Rule 5: any state but pending."""
    world.send(state_event("r", "starting", agent="a"))
    world.send(state_event("r", "dead"))
    with pytest.raises(InvalidTransition):
        world.send(state_event("r", "pending"))
    transition = world.send(state_event("r", "completed"))
    assert transition is not None
    assert transition.revived


def test_a_repeated_event_id_is_acknowledged_not_applied(world: World) -> None:
    """Idempotency: the second copy raises DuplicateEvent and changes nothing."""
    world.send(state_event("r", "running", agent="a", event_id="e1", progress=1))
    with pytest.raises(DuplicateEvent):
        world.send(state_event("r", "running", event_id="e1", progress=2))
    ex = world.registry.get("default", "r")
    assert ex is not None
    assert 1 == ex.progress


def test_event_ids_are_scoped_per_tenant(world: World) -> None:
    """Two tenants may use the same event_id."""
    world.send(state_event("r", "running", agent="a", event_id="e1", tenant="t1"))
    assert world.send(state_event("r", "running", agent="a", event_id="e1", tenant="t2"))


def test_a_rejected_event_id_may_be_retried(world: World) -> None:
    """Only applied events are remembered: a fixed retry with the same id goes through."""
    world.send(state_event("r", "running", agent="a"))
    with pytest.raises(InvalidTransition):
        world.send(state_event("r", "pending", event_id="e1"))
    assert world.send(state_event("r", "completed", event_id="e1"))


def test_event_id_memory_is_bounded() -> None:
    """After `event_ids` newer ids, the oldest is forgotten."""
    world = World(event_ids=3)
    world.send(state_event("r", "running", agent="a", event_id="e0"))
    for i in range(1, 4):
        world.send(heartbeat("r", event_id=f"e{i}"))
    world.send(heartbeat("r", event_id="e0"))  # forgotten, so applied again
    with pytest.raises(DuplicateEvent):
        world.send(heartbeat("r", event_id="e3"))


def test_a_lower_seq_is_stale(world: World) -> None:
    """An event older than the last applied seq is 409 stale_seq; an equal one is fine."""
    world.send(state_event("r", "running", agent="a", seq=5))
    world.send(heartbeat("r", seq=5))
    with pytest.raises(StaleSeq) as caught:
        world.send(state_event("r", "completed", seq=4))
    assert ("stale_seq", 409) == (caught.value.reason, caught.value.status)
    assert "seq 4 is stale; the last applied seq is 5" in caught.value.message


def test_an_event_naming_another_agent_is_rejected(world: World) -> None:
    """An execution belongs to one agent; a mismatch is a clear 422."""
    world.send(state_event("r", "running", agent="a"))
    with pytest.raises(EventError) as caught:
        world.send(heartbeat("r", agent="b"))
    assert ("agent", "agent_mismatch") == (caught.value.field, caught.value.reason)
    assert "execution 'r' has agent 'a'; the event names 'b'" == caught.value.message


def test_the_same_id_in_two_tenants_is_two_executions(world: World) -> None:
    """Execution ids are unique within a tenant only."""
    world.send(state_event("r", "running", agent="a", tenant="t1"))
    world.send(state_event("r", "completed", agent="a", tenant="t2"))
    assert (S.RUNNING, S.COMPLETED) == (world.state("r", "t1"), world.state("r", "t2"))


def test_history_is_bounded_oldest_first() -> None:
    """Only the newest `history` transitions are kept, oldest first."""
    world = World(history=3)
    world.send(state_event("r", "running", agent="a"))
    for phase in ("p1", "p2", "p3", "p4"):
        world.send(state_event("r", "running", phase=phase))
    ex = world.registry.get("default", "r")
    assert ex is not None
    assert ["p2", "p3", "p4"] == [t.phase for t in ex.history]


def test_attributes_merge_up_to_the_cap(world: World) -> None:
    """Attributes accumulate across events; past 64 keys the event is rejected, not trimmed."""
    world.send(state_event("r", "running", agent="a", attributes={f"a{i}": i for i in range(40)}))
    with pytest.raises(EventError) as caught:
        world.send(state_event("r", "running", attributes={f"b{i}": i for i in range(40)}))
    assert "would hold 80 attributes" in caught.value.message


def test_finished_executions_are_evicted_after_retention() -> None:
    """A finished execution stays for `finished_s`, then goes; live ones stay."""
    world = World(finished_s=60)
    world.send(state_event("done", "running", agent="a"))
    world.send(state_event("live", "running", agent="a"))
    world.send(state_event("done", "completed"))
    world.clock.advance(59)
    assert [] == world.registry.evict(world.clock())
    world.clock.advance(1)
    assert [("default", "done")] == world.registry.evict(world.clock())
    assert ["live"] == [ex.execution_id for ex in world.registry]


def test_finished_executions_are_capped_by_count() -> None:
    """Past `max_finished`, the oldest finished go first, whatever their age."""
    world = World(max_finished=2)
    for i in range(5):
        world.send(state_event(f"r{i}", "completed", agent="a"))
    assert [("default", "r0"), ("default", "r1"), ("default", "r2")] == world.registry.evict(
        world.clock()
    )
    assert 2 == world.registry.finished_count


def test_memory_stays_flat_under_endless_traffic() -> None:
    """Ten thousand short executions leave at most max_finished behind."""
    world = World(max_finished=100, event_ids=50)
    for i in range(10_000):
        world.send(state_event(f"r{i}", "running", agent="a", event_id=f"s{i}"))
        world.send(state_event(f"r{i}", "completed", event_id=f"c{i}"))
        world.registry.evict(world.clock())
    assert 100 == len(world.registry)
    assert 50 == len(world.registry._event_ids)


def test_a_revived_execution_is_not_evicted_by_its_old_death() -> None:
    """The eviction entry of a death is void once the execution is revived."""
    world = World(finished_s=10)
    world.send(state_event("r", "running", agent="a"))
    world.send(state_event("r", "dead"))
    world.clock.advance(5)
    world.send(heartbeat("r"))
    world.clock.advance(10)
    assert [] == world.registry.evict(world.clock())
    assert S.RUNNING == world.state("r")


def test_select_filters_and_pages_in_registration_order(world: World) -> None:
    """Filters combine; a page resumes after the serial it ended on."""
    for i in range(5):
        world.send(state_event(f"r{i}", "running", agent="a" if i % 2 else "b"))
    page, resume = world.registry.select(agent="b", limit=2)
    assert ["r0", "r2"] == [ex.execution_id for ex in page]
    assert resume is not None
    page, resume = world.registry.select(agent="b", limit=2, after=resume)
    assert (["r4"], None) == ([ex.execution_id for ex in page], resume)


def test_a_snapshot_restores_to_an_equal_execution(world: World) -> None:
    """snapshot() then restore() in a fresh registry gives the same API view."""
    world.send(
        state_event(
            "r",
            "running",
            agent="a",
            seq=2,
            run_timeout_s=5,
            progress=3,
            attributes={"k": "v"},
            error="x",
            phase="p",
        )
    )
    world.send(state_event("r", "dead"))
    ex = world.registry.get("default", "r")
    assert ex is not None
    fresh = Registry(world.registry.settings)
    restored = fresh.restore(ex.snapshot())
    assert ex.to_dict(world.registry.settings) == restored.to_dict(world.registry.settings)
    assert 1 == fresh.finished_count


def test_traced_tells_once_any_execution_carried_a_traceparent(world: World) -> None:
    """Sinks skip looking executions up for trace ids until one has a trace: applied or
    restored, a traceparent turns `traced` on (and nothing turns it off)."""
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    world.send(state_event("plain", "running", agent="a"))
    assert False is world.registry.traced
    world.send(state_event("r", "running", agent="a", traceparent=traceparent))
    assert True is world.registry.traced
    world.send(state_event("r", "completed"))
    assert True is world.registry.traced
    ex = world.registry.get("default", "r")
    plain = world.registry.get("default", "plain")
    assert ex is not None
    assert plain is not None
    fresh = Registry(world.registry.settings)
    fresh.restore(plain.snapshot())
    assert False is fresh.traced
    fresh.restore(ex.snapshot())
    assert True is fresh.traced


def test_every_transition_carries_its_executions_first_sight(world: World) -> None:
    """created_at on each record, registered, moved, phase-only or made by a detector, so
    a sink has a duration without a lookup; a restored history carries it too."""
    first = world.clock()
    made = [world.send(state_event("r", "starting", agent="a"))]
    world.clock.advance(2)
    made.append(world.send(state_event("r", "running")))
    made.append(world.send(state_event("r", "running", phase="tool")))
    ex = world.registry.get("default", "r")
    assert ex is not None
    made.append(world.registry.expire(ex, S.DEAD, "heartbeat", world.clock(), world.clock()))
    assert [first] * 4 == [t.created_at for t in made if t is not None]
    assert [len(Transition._fields)] * 4 == [len(t) for t in made if t is not None]
    assert 4 == len([t for t in made if t is not None])
    restored = Registry(world.registry.settings).restore(ex.snapshot())
    assert [first] * 4 == [t.created_at for t in restored.history]


def test_findings_attributes_and_samples_are_an_executions_own_once_it_has_any(
    world: World,
) -> None:
    """Executions share empty containers until they need their own; a finding, attributes
    and RSS samples survive a snapshot and a restore, and a cleared last finding hands
    its container back. (conftest checks the shared empties stay empty.)"""
    world.send(state_event("r", "running", agent="a", attributes={"k": "v"}, rss_bytes=10))
    world.send(state_event("plain", "running", agent="a"))
    ex, plain = world.registry.get("default", "r"), world.registry.get("default", "plain")
    assert ex is not None
    assert plain is not None
    world.registry.raise_finding(ex, "stalled", world.clock(), "no progress", world.clock())
    assert plain.attributes is NO_ATTRIBUTES
    assert plain.findings is NO_FINDINGS
    assert plain.rss_samples is NO_SAMPLES
    restored = Registry(world.registry.settings).restore(ex.snapshot())
    assert {"k": "v"} == restored.attributes
    assert ["stalled"] == list(restored.findings)
    assert [(world.clock(), 10)] == list(restored.rss_samples)
    world.registry.clear_finding(ex, "stalled", world.clock())
    assert ex.findings is NO_FINDINGS


def test_effective_limits_come_from_event_then_agent_then_defaults() -> None:
    """The API shows each limit from the most specific place that sets it."""
    settings = build_settings(
        {"defaults": {"heartbeat_timeout_s": 30}, "agents": {"a": {"run_timeout_s": 300}}}
    )
    registry = Registry(settings)
    event = parse_event(state_event("r", "running", agent="a", heartbeat_timeout_s=5), 0.0, NAMES)
    registry.apply(event, 0.0)
    ex = registry.get("default", "r")
    assert ex is not None
    assert {"heartbeat_timeout_s": 5.0, "run_timeout_s": 300.0} == ex.to_dict(settings)["limits"]


def test_an_evicted_execution_stays_final() -> None:
    """Rule 6 outlives retention: a late event for an evicted execution is 409, not new."""
    world = World(max_finished=1)
    world.send(state_event("old", "completed", agent="a"))
    world.send(state_event("new", "completed", agent="a"))
    assert [("default", "old")] == world.registry.evict(world.clock())
    for late in (state_event("old", "failed", agent="a"), heartbeat("old", agent="a")):
        with pytest.raises(EvictedExecution) as caught:
            world.send(late)
        assert (409, "final_state") == (caught.value.status, caught.value.reason)
    assert world.registry.get("default", "old") is None


def test_history_never_runs_backwards() -> None:
    """A transition dated before the current state is clamped to it: no negative durations."""
    world = World()
    world.send(state_event("r", "pending", agent="a", ts=1000.0))
    world.send(state_event("r", "running", ts=2000.0))
    world.send(state_event("r", "completed", ts=500.0))
    ex = world.registry.get("default", "r")
    assert ex is not None
    assert [1000.0, 2000.0, 2000.0] == [t.at for t in ex.history]


def test_a_phase_ends_with_its_state(world: World) -> None:
    """Phase is detail inside one state: a new state without a phase has none."""
    world.send(state_event("r", "recovering", agent="a"))
    world.send(state_event("r", "completed"))
    ex = world.registry.get("default", "r")
    assert ex is not None
    assert (S.COMPLETED, None) == (ex.state, ex.phase)


def test_a_heartbeat_revives_into_the_state_it_died_in(world: World) -> None:
    """Even after a phase-only event while dead, revival returns to the pre-death state."""
    world.send(state_event("r", "completing", agent="a"))
    world.send(state_event("r", "dead"))
    world.send(state_event("r", "dead", phase="x"))
    transition = world.send(heartbeat("r"))
    assert transition is not None
    assert (S.DEAD, S.COMPLETING) == (transition.old, transition.new)


def test_death_and_revival_cycles_keep_the_eviction_queue_bounded() -> None:
    """Stale eviction entries are compacted, so endless flapping cannot grow memory."""
    world = World(finished_s=86400)
    world.send(state_event("r", "running", agent="a"))
    for _ in range(10_000):
        world.send(state_event("r", "dead"))
        world.send(heartbeat("r"))
    assert 0 == world.registry.finished_count
    assert len(world.registry._finished) <= 2 * world.registry.finished_count + 65


def test_changes_are_owed_until_taken_and_given_back_on_failure(world: World) -> None:
    """Every acknowledged change is in the dirty set until a commit takes it."""
    world.send(state_event("r", "running", agent="a"))
    dirty, evicted = world.registry.take_changes()
    assert ([("default", "r")], []) == (list(dirty), evicted)
    assert world.send(heartbeat("r", progress=2)) is None
    assert {} == world.registry.dirty  # a liveness-only heartbeat owes no commit
    world.registry.return_changes(dirty, evicted)
    assert [("default", "r")] == list(world.registry.dirty)
