"""Detectors on a fake clock: each fires at its deadline and not before, back-dated, and
clears, pauses and revives as DESIGN.md says. tick() is called directly; nothing sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from monitor.config import build_settings
from monitor.detectors.breaker import BreakerTransition
from monitor.detectors.engine import Detectors, TickResult
from monitor.events import parse_event
from monitor.model import Execution, FindingChange, Transition
from monitor.registry import Registry
from monitor.states import ExecState, StateNames
from monitor.testing import FakeClock, heartbeat, state_event

S = ExecState
NAMES = StateNames()


class World:
    """A registry and its detectors, driven by wire events on a fake clock."""

    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock()
        self.settings = build_settings(config)
        self.registry = Registry(self.settings)
        self.detectors = Detectors(self.registry, self.settings)

    def send(self, obj: dict[str, Any]) -> Transition | None:
        return self.detectors.apply(parse_event(obj, self.clock(), NAMES), self.clock())

    def at(self, seconds: float) -> TickResult:
        """Advance by `seconds` and tick."""
        self.clock.advance(seconds)
        return self.detectors.tick(self.clock())

    def ex(self, execution_id: str = "r") -> Execution:
        found = self.registry.get("default", execution_id)
        assert found is not None
        return found


def transitions(result: TickResult) -> list[tuple[str, ExecState | None, ExecState, str | None]]:
    return [
        (r.execution_id, r.old, r.new, r.reason)
        for r in result.records
        if isinstance(r, Transition)
    ]


def findings(result: TickResult) -> list[tuple[str, str, bool]]:
    return [
        (r.execution_id, r.finding, r.raised)
        for r in result.records
        if isinstance(r, FindingChange)
    ]


# ---- heartbeat (dead) ----------------------------------------------------------------------


def test_dead_fires_at_the_heartbeat_deadline_and_not_before() -> None:
    """heartbeat_timeout_s after the last heartbeat, the execution is dead, back-dated."""
    world = World(defaults={"heartbeat_timeout_s": 10})
    world.send(state_event("r", "running", agent="a"))
    world.at(5)
    world.send(heartbeat("r"))
    start = world.clock()
    assert [] == transitions(world.at(9.9))
    result = world.at(0.35)
    assert [("r", S.RUNNING, S.DEAD, "heartbeat")] == transitions(result)
    dead = result.records[0]
    assert isinstance(dead, Transition)
    assert start + 10 == dead.at  # back-dated to the deadline
    assert dead.detected_at is not None
    assert pytest.approx(0.25) == dead.detected_at - dead.at  # the detection lag
    assert "heartbeat" == world.registry.stopping[("default", "r")]


def test_a_pending_execution_has_no_heartbeat_clock() -> None:
    """Queued work does not heartbeat: only start_timeout_s watches it."""
    world = World(defaults={"heartbeat_timeout_s": 1})
    world.send(state_event("r", "queued", agent="a"))
    assert [] == transitions(world.at(100))
    assert S.PENDING == world.ex().state


def test_a_dead_execution_revives_on_proof_of_life() -> None:
    """A heartbeat after death is a revival: back to running, counted, directive withdrawn."""
    world = World(defaults={"heartbeat_timeout_s": 1})
    world.send(state_event("r", "running", agent="a"))
    world.at(2)
    transition = world.send(heartbeat("r"))
    assert transition is not None
    assert (S.DEAD, S.RUNNING, True) == (transition.old, transition.new, transition.revived)
    assert ("default", "r") not in world.registry.stopping
    assert [("r", S.RUNNING, S.DEAD, "heartbeat")] == transitions(world.at(1.5))


# ---- the timeout taxonomy ------------------------------------------------------------------


def test_start_timeout_fires_when_running_is_never_reached() -> None:
    """First event -> running, else timeout with reason start_timeout."""
    world = World(defaults={"start_timeout_s": 5})
    world.send(state_event("late", "queued", agent="a"))
    world.send(state_event("ok", "queued", agent="a"))
    world.at(3)
    world.send(state_event("ok", "running"))
    assert [] == transitions(world.at(1.9))
    assert [("late", S.PENDING, S.TIMEOUT, "start_timeout")] == transitions(world.at(0.2))


def test_run_timeout_counts_from_entering_running_without_paused_time() -> None:
    """run_timeout_s starts at running; time spent paused does not count."""
    world = World(defaults={"heartbeat_timeout_s": 1000})
    world.send(state_event("r", "queued", agent="a", run_timeout_s=10))
    world.at(50)  # queue time is not run time
    world.send(state_event("r", "running"))
    world.at(4)
    world.send(state_event("r", "paused"))
    world.at(100)  # paused: no clocks
    world.send(state_event("r", "running"))
    assert [] == transitions(world.at(5.9))
    result = world.at(0.2)
    assert [("r", S.RUNNING, S.TIMEOUT, "run_timeout")] == transitions(result)


def test_total_timeout_counts_from_the_first_event() -> None:
    """timeout_s is the whole deadline, queue time included."""
    world = World(defaults={"heartbeat_timeout_s": 1000})
    world.send(state_event("r", "queued", agent="a", timeout_s=10))
    world.at(6)
    world.send(state_event("r", "running"))
    assert [] == transitions(world.at(3.9))
    assert [("r", S.RUNNING, S.TIMEOUT, "total_timeout")] == transitions(world.at(0.2))


def test_paused_executions_have_no_clocks() -> None:
    """Nothing fires while paused, however long; clocks resume afterwards."""
    world = World(defaults={"heartbeat_timeout_s": 1, "stall_timeout_s": 1, "timeout_s": 5})
    world.send(state_event("r", "running", agent="a"))
    world.send(state_event("r", "suspended"))
    assert [] == transitions(world.at(1000)) + findings(world.at(1000))
    world.send(state_event("r", "running"))
    assert [("r", S.RUNNING, S.DEAD, "heartbeat")] == transitions(world.at(1.1))


def test_limits_resolve_execution_then_agent_then_defaults() -> None:
    """Per execution, else [agents.NAME], else [defaults]."""
    world = World(defaults={"heartbeat_timeout_s": 30}, agents={"fast": {"heartbeat_timeout_s": 2}})
    world.send(state_event("own", "running", agent="fast", heartbeat_timeout_s=1))
    world.send(state_event("agent", "running", agent="fast"))
    world.send(state_event("default", "running", agent="slow"))
    assert ["own"] == [t[0] for t in transitions(world.at(1.5))]
    assert ["agent"] == [t[0] for t in transitions(world.at(1))]
    assert ["default"] == [t[0] for t in transitions(world.at(28))]


def test_a_lowered_limit_moves_the_deadline_earlier() -> None:
    """A later event that shortens a limit is obeyed at once, not at the old deadline."""
    world = World(defaults={"heartbeat_timeout_s": 1000})
    world.send(state_event("r", "running", agent="a", run_timeout_s=100))
    world.send(state_event("r", "running", run_timeout_s=5))
    assert [("r", S.RUNNING, S.TIMEOUT, "run_timeout")] == transitions(world.at(5.1))


def test_the_earliest_clock_wins() -> None:
    """When two clocks expire in one sweep, the earlier deadline decides the state."""
    world = World(defaults={"heartbeat_timeout_s": 10, "run_timeout_s": 8})
    world.send(state_event("r", "running", agent="a"))
    assert [("r", S.RUNNING, S.TIMEOUT, "run_timeout")] == transitions(world.at(20))


# ---- stall ---------------------------------------------------------------------------------


def test_stalled_is_raised_while_heartbeats_come_and_cleared_by_progress() -> None:
    """Alive but not advancing: a finding (not a state), cleared by progress, raised again."""
    world = World(defaults={"heartbeat_timeout_s": 5, "stall_timeout_s": 10})
    world.send(state_event("r", "running", agent="a", progress=1))
    for _ in range(4):
        world.at(2.4)
        world.send(heartbeat("r", progress=1))
    raised = world.at(0.5)  # 10.1 s without change
    assert [("r", "stalled", True)] == findings(raised)
    change = raised.records[0]
    assert isinstance(change, FindingChange)
    assert world.ex().registered_at + 10 == change.since
    assert S.RUNNING == world.ex().state
    world.send(heartbeat("r", progress=2))
    assert [("r", "stalled", False)] == [
        (f.execution_id, f.finding, f.raised)
        for f in world.detectors.drain()
        if isinstance(f, FindingChange)
    ]
    for _ in range(4):
        world.at(2.4)
        world.send(heartbeat("r", phase="tool"))  # a phase change is progress too
    assert [] == findings(world.at(0.5))


# ---- blindness -----------------------------------------------------------------------------


def test_after_blindness_every_execution_gets_a_fresh_heartbeat_grace() -> None:
    """The daemon's own outage must not kill the fleet; detection resumes after the grace."""
    world = World(defaults={"heartbeat_timeout_s": 10})
    world.send(state_event("r", "running", agent="a"))
    world.clock.advance(60)  # the daemon was down (or its loop stalled) for a minute
    world.detectors.regain_sight(world.clock())
    assert [] == transitions(world.detectors.tick(world.clock()))
    assert [] == transitions(world.at(9.9))
    result = world.at(0.2)
    assert [("r", S.RUNNING, S.DEAD, "heartbeat")] == transitions(result)


# ---- the sweep -----------------------------------------------------------------------------


def test_a_sweep_pops_only_what_fell_due() -> None:
    """Thousands of live executions, one due: the tick looks at one entry."""
    world = World(defaults={"heartbeat_timeout_s": 100})
    for i in range(2000):
        world.send(state_event(f"r{i}", "running", agent="a"))
    world.send(state_event("soon", "running", agent="a", heartbeat_timeout_s=1))
    result = world.at(2)
    assert (1, [("soon", S.RUNNING, S.DEAD, "heartbeat")]) == (result.due, transitions(result))
    assert 0 == world.at(1).due


def test_a_detector_that_raises_is_skipped_and_the_rest_still_fire() -> None:
    """One broken clock (corrupt data) is counted; the sweep goes on."""
    world = World(defaults={"heartbeat_timeout_s": 5})
    world.send(state_event("broken", "running", agent="a", stall_timeout_s=1))
    world.send(state_event("fine", "running", agent="a"))
    world.ex("broken").limits["stall_timeout_s"] = "soon"  # type: ignore[assignment]
    result = world.at(6)
    assert ["stalled"] == [name for name, _ in result.failures]
    assert 1 == world.detectors.failures["stalled"]
    assert {"broken", "fine"} == {t[0] for t in transitions(result)}


# ---- memory --------------------------------------------------------------------------------

MIB = 1024 * 1024


def memory_world(policy: str) -> World:
    return World(
        defaults={"heartbeat_timeout_s": 1000, "memory_hold_s": 2, "memory_soft_fraction": 0.5,
                  "memory_trend_horizon_s": 60},
        agents={"a": {"memory_limit_bytes": 100 * MIB, "memory_policy": policy}},
    )  # fmt: skip


def test_memory_findings_need_the_hold_time_and_clear_when_rss_drops() -> None:
    """Over soft for memory_hold_s: memory_high; over hard: memory_exceeded (observe)."""
    world = memory_world("observe")
    world.send(state_event("r", "running", agent="a", rss_bytes=10 * MIB))
    world.send(heartbeat("r", rss_bytes=60 * MIB))
    assert [] == findings(world.at(1.9))
    assert [("r", "memory_high", True)] == findings(world.at(0.2))
    world.send(heartbeat("r", rss_bytes=120 * MIB))
    assert [] == findings(world.at(1.9))
    assert [("r", "memory_exceeded", True)] == findings(world.at(0.2))
    assert S.RUNNING == world.ex().state  # observe only reports
    world.send(heartbeat("r", rss_bytes=20 * MIB))
    assert [("r", "memory_exceeded", False), ("r", "memory_high", False)] == [
        (f.execution_id, f.finding, f.raised)
        for f in world.detectors.drain()
        if isinstance(f, FindingChange)
    ]


def test_a_brief_spike_is_not_a_finding() -> None:
    """Dropping below the limit within the hold time resets it."""
    world = memory_world("observe")
    world.send(state_event("r", "running", agent="a", rss_bytes=120 * MIB))
    world.at(1)
    world.send(heartbeat("r", rss_bytes=10 * MIB))
    assert [] == findings(world.at(5))


def test_policy_fail_ends_the_execution() -> None:
    """memory_policy = fail: state failed, reason memory_exceeded, and a cancel directive."""
    world = memory_world("fail")
    world.send(state_event("r", "running", agent="a", rss_bytes=120 * MIB))
    assert [("r", S.RUNNING, S.FAILED, "memory_exceeded")] == transitions(world.at(2.1))
    assert "memory_exceeded" == world.registry.stopping[("default", "r")]


def test_policy_terminate_signals_only_on_rss_the_daemon_sampled() -> None:
    """A reported RSS ends the execution like `fail` but signals nothing; the daemon's own
    sample of the pid is what may lead to a Terminate action, for that pid only."""
    world = memory_world("terminate")
    world.send(state_event("told", "running", agent="a", pid=4242, rss_bytes=120 * MIB))
    world.send(state_event("seen", "running", agent="a", pid=4343))
    world.detectors.observe_rss(world.ex("seen"), 120 * MIB, world.clock())
    result = world.at(2.1)
    assert [(4343, 10.0)] == [(a.pid, a.grace_s) for a in result.actions]
    assert {
        ("told", S.RUNNING, S.FAILED, "memory_exceeded"),
        ("seen", S.RUNNING, S.FAILED, "memory_exceeded"),
    } == set(transitions(result))


def test_policy_terminate_without_a_pid_acts_like_fail() -> None:
    """No pid to signal: the execution still fails and is told to stop."""
    world = memory_world("terminate")
    world.send(state_event("r", "running", agent="a", rss_bytes=120 * MIB))
    assert [("r", S.RUNNING, S.FAILED, "memory_exceeded")] == transitions(world.at(2.1))
    assert "memory_exceeded" == world.registry.stopping[("default", "r")]


def test_a_pid_two_executions_claim_is_never_signalled() -> None:
    """Ambiguous ownership: fail, but no Terminate action."""
    world = memory_world("terminate")
    world.send(state_event("r1", "running", agent="a", pid=4242))
    world.send(state_event("r2", "running", agent="a", pid=4242))
    world.detectors.observe_rss(world.ex("r1"), 120 * MIB, world.clock())
    result = world.at(2.1)
    assert [] == result.actions
    assert [("r1", S.RUNNING, S.FAILED, "memory_exceeded")] == transitions(result)


def test_time_paused_does_not_count_toward_a_memory_hold() -> None:
    """Over the limit, paused for long, resumed: the hold starts again after the pause."""
    world = memory_world("observe")
    world.send(state_event("r", "running", agent="a", rss_bytes=120 * MIB))
    world.at(1)
    world.send(state_event("r", "paused"))
    assert [] == findings(world.at(100))
    world.send(state_event("r", "running", rss_bytes=120 * MIB))
    assert [] == findings(world.at(1.9))
    assert {("r", "memory_exceeded", True), ("r", "memory_high", True)} == set(
        findings(world.at(0.2))
    )


def test_a_growth_trend_is_reported_before_the_limit() -> None:
    """RSS growing toward the limit within the horizon: memory_trend, early."""
    world = memory_world("observe")
    world.send(state_event("r", "running", agent="a", rss_bytes=10 * MIB))
    for step in range(1, 6):
        world.clock.advance(1)
        world.send(heartbeat("r", rss_bytes=(10 + step) * MIB))  # +1 MiB/s: ~85 s to go
    assert [] == [f for f in world.detectors.drain() if isinstance(f, FindingChange)]
    for step in range(6, 11):
        world.clock.advance(1)
        world.send(heartbeat("r", rss_bytes=(10 + step * 5) * MIB))
    raised = [f for f in world.detectors.drain() if isinstance(f, FindingChange)]
    assert "memory_trend" in [f.finding for f in raised if f.raised]


# ---- circuit breaker -----------------------------------------------------------------------


def breaker_world() -> World:
    return World(
        defaults={"heartbeat_timeout_s": 1000},
        breaker={"failure_rate_threshold": 0.5, "minimum_calls": 4, "window_size": 10,
                 "wait_in_open_s": 30, "permitted_calls_in_half_open": 2},
    )  # fmt: skip


def breaker_moves(records: list[Any]) -> list[tuple[str, str]]:
    return [(r.old, r.new) for r in records if isinstance(r, BreakerTransition)]


def finish(world: World, execution_id: str, state: str) -> None:
    world.send(state_event(execution_id, "running", agent="a"))
    world.send(state_event(execution_id, state))


def test_the_breaker_opens_at_the_threshold_after_minimum_calls() -> None:
    """closed -> open once minimum_calls outcomes fail at >= failure_rate_threshold."""
    world = breaker_world()
    finish(world, "r0", "completed")
    finish(world, "r1", "failed")
    finish(world, "r2", "cancelled")  # ignored
    finish(world, "r3", "failed")
    assert [] == breaker_moves(world.detectors.drain())
    finish(world, "r4", "completed")  # 4 calls, 2 failed: 0.5
    assert [("closed", "open")] == breaker_moves(world.detectors.drain())
    breaker = world.detectors.breaker("default", "a")
    assert (False, 30.0) == (breaker.allows(), breaker.retry_after_s(world.clock()))


def test_the_breaker_half_opens_on_time_closes_on_good_trials() -> None:
    """open -> half_open at wait_in_open_s by tick (back-dated), then closed by trials."""
    world = breaker_world()
    for i in range(4):
        finish(world, f"r{i}", "failed")
    world.detectors.drain()
    opened_at = world.clock()
    result = world.at(30.5)
    assert [("open", "half_open")] == breaker_moves(result.records)
    moved = next(r for r in result.records if isinstance(r, BreakerTransition))
    assert opened_at + 30 == moved.at
    world.send(state_event("t1", "running", agent="a"))
    world.send(state_event("t2", "running", agent="a"))
    world.send(state_event("refused", "running", agent="a"))
    assert "circuit_open" == world.registry.stopping[("default", "refused")]
    assert 1 == world.detectors.not_permitted[("default", "a")]
    world.send(state_event("t1", "completed"))
    world.send(state_event("t2", "completed"))
    assert [("half_open", "closed")] == breaker_moves(world.detectors.drain())


def test_failed_trials_reopen_the_breaker() -> None:
    """half_open -> open when the trials fail as often as the threshold."""
    world = breaker_world()
    for i in range(4):
        finish(world, f"r{i}", "timeout")
    world.at(31)
    world.detectors.drain()
    finish(world, "t1", "failed")
    finish(world, "t2", "completed")
    assert [("half_open", "open")] == breaker_moves(world.detectors.drain())


def test_a_dead_or_timed_out_execution_counts_as_a_failure() -> None:
    """Detector outcomes feed the breaker like reported ones."""
    world = breaker_world()
    for i in range(4):
        world.send(state_event(f"r{i}", "running", agent="a", heartbeat_timeout_s=1))
    result = world.at(2)
    assert [("closed", "open")] == breaker_moves(result.records)


def test_a_time_window_forgets_old_outcomes() -> None:
    """window_s: outcomes older than the window no longer count."""
    world = World(breaker={"minimum_calls": 3, "window_s": 60, "failure_rate_threshold": 0.5})
    finish(world, "r0", "failed")
    finish(world, "r1", "failed")
    world.at(61)
    finish(world, "r2", "failed")
    assert [] == breaker_moves(world.detectors.drain())
    assert 1 == world.detectors.breaker("default", "a").to_dict(world.clock())["calls"]


# ---- cancel --------------------------------------------------------------------------------


def test_a_cancel_request_stands_until_the_execution_stops() -> None:
    """The directive is owed until the execution reports a terminal state."""
    world = World()
    world.send(state_event("r", "running", agent="a"))
    world.registry.request_cancel(world.ex(), "cancel_requested")
    world.send(heartbeat("r"))
    assert "cancel_requested" == world.registry.stopping[("default", "r")]
    world.send(state_event("r", "cancelled"))
    assert ("default", "r") not in world.registry.stopping


def test_a_restored_execution_keeps_its_memory_hold() -> None:
    """Over the limit when the daemon stopped: the hold still ends in a finding after replay."""
    world = memory_world("observe")
    world.send(state_event("r", "running", agent="a", rss_bytes=120 * MIB))
    world.clock.advance(1)
    restored = Registry(world.settings)
    restored.restore_all([world.ex().snapshot()])
    detectors = Detectors(restored, world.settings)
    detectors.regain_sight(world.clock())
    detectors.schedule_all()
    world.clock.advance(1.1)
    result = detectors.tick(world.clock())
    assert {("r", "memory_exceeded", True), ("r", "memory_high", True)} == set(findings(result))


def test_the_heap_stays_bounded_under_churn_with_long_limits() -> None:
    """Executions that finish long before their day-long deadlines do not pile up."""
    world = World(defaults={"heartbeat_timeout_s": 86400, "timeout_s": 86400})
    for i in range(20_000):
        world.send(state_event(f"r{i}", "running", agent="a"))
        world.send(state_event(f"r{i}", "completed"))
    current, size = world.detectors.queued
    assert 0 == current
    assert size <= 2 * current + 1024 + 2


def test_only_unfinished_executions_with_a_pid_are_sampled() -> None:
    """The sampler's index holds what it should sample, nothing more."""
    world = World()
    world.send(state_event("a", "running", agent="x", pid=10))
    world.send(state_event("b", "running", agent="x"))
    world.send(state_event("c", "running", agent="x", pid=11))
    world.send(state_event("c", "completed"))
    assert [("default", "a")] == list(world.registry.with_pid)


def test_a_silent_execution_is_not_stalled_but_dead() -> None:
    """Stalled means alive without progress; sending nothing at all is for the dead detector."""
    world = World(defaults={"heartbeat_timeout_s": 30, "stall_timeout_s": 5})
    world.send(state_event("r", "running", agent="a"))
    assert [] == findings(world.at(20))
    assert [("r", S.RUNNING, S.DEAD, "heartbeat")] == transitions(world.at(10.1))


def test_a_timeout_after_a_revival_is_dated_after_it() -> None:
    """Back-dating never puts a transition before the state it leaves began."""
    world = World(defaults={"heartbeat_timeout_s": 1, "timeout_s": 5})
    world.send(state_event("r", "running", agent="a"))
    world.at(2)  # dead at 1
    world.clock.advance(20)
    world.send(heartbeat("r"))  # revived at 22, long past the total deadline of 5
    world.at(0.1)
    history = [t.at for t in world.ex().history]
    assert history == sorted(history)
    assert S.TIMEOUT == world.ex().state


def test_a_revival_takes_back_the_failure_the_death_counted() -> None:
    """Dead, revived, then failed is one failure, not two."""
    world = World(breaker={"minimum_calls": 2, "failure_rate_threshold": 0.5},
                  defaults={"heartbeat_timeout_s": 1})  # fmt: skip
    world.send(state_event("r", "running", agent="a"))
    world.at(1.5)
    world.send(heartbeat("r"))
    world.send(state_event("r", "failed"))
    breaker = world.detectors.breaker("default", "a")
    assert ("closed", 1) == (breaker.state, len(breaker.window))


def test_a_cancelled_trial_gives_its_slot_back() -> None:
    """A trial that ends cancelled says nothing; another execution may take its place."""
    world = breaker_world()
    for i in range(4):
        finish(world, f"r{i}", "failed")
    world.at(31)
    world.send(state_event("t1", "running", agent="a"))
    world.send(state_event("t2", "running", agent="a"))
    assert not world.detectors.breaker("default", "a").allows()
    world.send(state_event("t1", "cancelled"))
    assert world.detectors.breaker("default", "a").allows()


def test_a_half_open_breaker_that_waits_too_long_reopens() -> None:
    """Trials that never end cannot hold the breaker half open: it re-opens on time."""
    world = World(
        breaker={"minimum_calls": 1, "wait_in_open_s": 10, "permitted_calls_in_half_open": 1,
                 "max_wait_in_half_open_s": 60},
    )  # fmt: skip
    finish(world, "r0", "failed")
    world.at(10.5)
    world.send(state_event("stuck", "queued", agent="a"))  # a trial that hangs in pending
    world.detectors.drain()
    result = world.at(60)
    assert [("half_open", "open")] == breaker_moves(result.records)


def test_a_late_trial_does_not_judge_a_later_half_open_period() -> None:
    """A trial belongs to the half-open period that admitted it."""
    world = World(
        breaker={"minimum_calls": 1, "wait_in_open_s": 10, "permitted_calls_in_half_open": 1,
                 "max_wait_in_half_open_s": 5},
        defaults={"heartbeat_timeout_s": 1000},
    )  # fmt: skip
    finish(world, "r0", "failed")
    world.at(10.5)  # half open (period 1)
    world.send(state_event("old-trial", "running", agent="a"))
    world.at(5)  # the period ran out of time: open again
    world.at(10.5)  # half open (period 2)
    world.detectors.drain()
    world.send(state_event("old-trial", "completed"))
    assert [] == breaker_moves(world.detectors.drain())
    assert "half_open" == world.detectors.breaker("default", "a").state


def test_idle_breakers_are_forgotten_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client-chosen agent names cannot grow the breakers without bound."""
    from monitor.detectors import engine

    monkeypatch.setattr(engine, "MAX_BREAKERS", 100)
    world = World(breaker={"window_s": 1})
    for i in range(300):
        finish(world, f"r{i}", "completed")
        world.send(state_event(f"x{i}", "running", agent=f"agent-{i}"))
        world.send(state_event(f"x{i}", "completed"))
        world.clock.advance(2)  # the time window empties
    assert len(world.detectors.breakers) <= 100
