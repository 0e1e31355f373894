"""The detectors over HTTP (test client, fake clock, ticks driven by the test): directives,
cancel, findings, breakers and agents."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from monitor.server.keys import DETECTORS, INGESTOR
from monitor.store.memory import MemoryStore
from monitor.store.sqlite import SqliteStore
from monitor.testing import FakeClock, RecordingSink, heartbeat, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import Client, get, post


async def tick(client: Client, clock: FakeClock, seconds: float) -> None:
    """Advance the fake clock and run one sweep exactly as the daemon's loop does."""
    clock.advance(seconds)
    result = client.app[DETECTORS].tick(clock())
    await client.app[INGESTOR].commit(result.records)


async def test_a_timed_out_execution_is_told_to_cancel_on_its_next_event(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Timeout is final: the late event is 409, and the answer carries the directive."""
    client = await make_client()
    await post(client, state_event("r", "running", agent="a", run_timeout_s=5))
    await tick(client, clock, 6)
    answer = await post(client, heartbeat("r"), 409)
    assert [{"execution_id": "r", "action": "cancel", "reason": "run_timeout"}] == answer[
        "directives"
    ]
    execution = await get(client, "/v1/executions/r")
    last = execution["history"][-1]
    assert ("timeout", "run_timeout") == (execution["state"], last["reason"])
    assert clock() == last["detected_at"]  # lag = detected_at - at
    assert last["detected_at"] - last["at"] >= 0


async def test_cancel_requests_reach_the_execution_until_it_stops(
    make_client: ClientFactory,
) -> None:
    """POST .../cancel is 202; every later answer carries the directive until it ends."""
    client = await make_client()
    await post(client, state_event("r", "running", agent="a"))
    response = await client.post("/v1/executions/r/cancel")
    assert 202 == response.status
    assert {"execution_id": "r", "action": "cancel", "reason": "cancel_requested"} == (
        await response.json()
    )
    answer = await post(client, [heartbeat("r"), heartbeat("r")])
    assert [{"execution_id": "r", "action": "cancel", "reason": "cancel_requested"}] == answer[
        "directives"
    ]
    assert (await get(client, "/v1/executions/r"))["cancel_requested"]
    assert [] == (await post(client, state_event("r", "cancelled")))["directives"]
    assert 409 == (await client.post("/v1/executions/r/cancel")).status
    assert 404 == (await client.post("/v1/executions/nobody/cancel")).status


async def test_findings_are_listed_and_shown_on_their_execution(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """GET /v1/findings and the execution's own findings agree; progress clears them."""
    sink = RecordingSink()
    client = await make_client({"defaults": {"stall_timeout_s": 5}}, sinks=[sink])
    await post(client, state_event("r", "running", agent="a", progress=1))
    clock.advance(3)
    await post(client, heartbeat("r", progress=1))  # alive, not advancing
    await tick(client, clock, 2.5)
    listed = (await get(client, "/v1/findings"))["findings"]
    assert [("r", "a", "stalled")] == [(f["execution_id"], f["agent"], f["kind"]) for f in listed]
    assert ["stalled"] == [f["kind"] for f in (await get(client, "/v1/executions/r"))["findings"]]
    await post(client, heartbeat("r", progress=2))
    assert [] == (await get(client, "/v1/findings"))["findings"]
    assert all("revived" not in h for h in (await get(client, "/v1/executions/r"))["history"])
    assert [("stalled", True), ("stalled", False)] == [
        (r.finding, r.raised) for r in sink.records if hasattr(r, "finding")
    ]


async def test_a_breaker_refuses_new_executions_and_says_when_to_retry(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Open breaker: GET says allow false with retry_after_s; a new execution is told to cancel."""
    config: dict[str, Any] = {"breaker": {"minimum_calls": 2, "wait_in_open_s": 30}}
    client = await make_client(config)
    for i in range(2):
        await post(
            client,
            [
                state_event(f"r{i}", "running", agent="a"),
                state_event(f"r{i}", "failed", error="boom"),
            ],
        )
    breaker = await get(client, "/v1/breakers/a")
    assert ("open", False, 1.0, 30.0) == (
        breaker["state"],
        breaker["allow"],
        breaker["failure_rate"],
        breaker["retry_after_s"],
    )
    answer = await post(client, state_event("r9", "queued", agent="a"))
    assert [{"execution_id": "r9", "action": "cancel", "reason": "circuit_open"}] == answer[
        "directives"
    ]
    await tick(client, clock, 30)
    assert "half_open" == (await get(client, "/v1/breakers/a"))["state"]
    agents = (await get(client, "/v1/agents"))["agents"]
    assert [("a", "half_open")] == [(a["agent"], a["breaker"]["state"]) for a in agents]
    fresh = await get(client, "/v1/breakers/never-seen")
    assert ("closed", True) == (fresh["state"], fresh["allow"])


async def test_the_detector_loop_runs_in_the_app(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """With its loop on, the app detects on its own (the loop ticks on the app's clock)."""
    # blind_lag_s is large: the fake clock jumps, and a jump is otherwise blindness.
    client = await make_client(
        {"defaults": {"heartbeat_timeout_s": 1}, "detectors": {"blind_lag_s": 100}},
        run_detectors=True,
    )
    await post(client, state_event("r", "running", agent="a"))
    clock.advance(2)
    for _ in range(500):  # the loop wakes at least every 50 ms of real time
        if (await get(client, "/v1/executions/r"))["state"] == "dead":
            break
        await asyncio.sleep(0.01)
    assert "dead" == (await get(client, "/v1/executions/r"))["state"]
    assert 0 == sum(client.app[DETECTORS].failures.values())
    assert clock() == client.app[DETECTORS].last_tick_at


async def test_a_stalled_loop_gives_the_fleet_a_fresh_grace(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """When the daemon's own loop stalls, nobody is declared dead for it."""
    client = await make_client(
        {"defaults": {"heartbeat_timeout_s": 10}, "detectors": {"blind_lag_s": 0.3}},
        run_detectors=True,
    )
    await post(client, state_event("r", "running", agent="a"))
    await asyncio.sleep(0.1)
    detectors = client.app[DETECTORS]
    spells = detectors.blind_spells
    clock.advance(30)  # heartbeats "missed" while the loop could not run
    time.sleep(0.5)  # block the event loop itself, as a stuck handler would
    for _ in range(100):
        await asyncio.sleep(0.01)
        if detectors.blind_spells > spells:
            break
    assert spells + 1 == detectors.blind_spells
    assert detectors.loop_lag_s >= 0.3
    assert "running" == (await get(client, "/v1/executions/r"))["state"]
    assert clock() == detectors.sighted_since


async def test_a_restart_gives_recovered_executions_a_fresh_grace(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Replayed from the store after downtime: no one is dead until the grace runs out."""
    store = MemoryStore()
    client = await make_client({"defaults": {"heartbeat_timeout_s": 10}}, store=store)
    await post(client, state_event("r", "running", agent="a"))
    await client.close()
    clock.advance(60)  # the daemon was down for a minute
    restarted = await make_client({"defaults": {"heartbeat_timeout_s": 10}}, store=store)
    await tick(restarted, clock, 9.9)
    assert "running" == (await get(restarted, "/v1/executions/r"))["state"]
    await tick(restarted, clock, 0.2)
    assert "dead" == (await get(restarted, "/v1/executions/r"))["state"]


async def test_a_wall_clock_jump_is_blindness(make_client: ClientFactory, clock: FakeClock) -> None:
    """An NTP step or a suspended host is not a reason to declare the fleet dead."""
    client = await make_client(
        {"defaults": {"heartbeat_timeout_s": 10}, "detectors": {"blind_lag_s": 1}},
        run_detectors=True,
    )
    await post(client, state_event("r", "running", agent="a"))
    await asyncio.sleep(0.1)
    spells = client.app[DETECTORS].blind_spells
    clock.advance(60)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if client.app[DETECTORS].blind_spells > spells:
            break
    assert spells + 1 == client.app[DETECTORS].blind_spells
    assert "running" == (await get(client, "/v1/executions/r"))["state"]


async def test_an_open_breaker_stays_open_across_a_restart(
    make_client: ClientFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """A restart must not let a failing agent's traffic through: the breaker comes back
    open from the SQLite file, then moves on time to half_open and closes on trials."""
    config: dict[str, Any] = {
        "breaker": {"minimum_calls": 2, "wait_in_open_s": 30, "permitted_calls_in_half_open": 1}
    }
    client = await make_client(config, store=SqliteStore(tmp_path / "x.db"))
    for i in range(2):
        await post(client, [state_event(f"r{i}", "running", agent="a"),
                            state_event(f"r{i}", "failed", error="boom")])  # fmt: skip
    await client.close()

    clock.advance(10)
    restarted = await make_client(config, store=SqliteStore(tmp_path / "x.db"))
    breaker = await get(restarted, "/v1/breakers/a")
    assert ("open", 1.0, 20.0) == (
        breaker["state"], breaker["failure_rate"], breaker["retry_after_s"]
    )  # fmt: skip
    answer = await post(restarted, state_event("r9", "queued", agent="a"))
    assert ["circuit_open"] == [d["reason"] for d in answer["directives"]]
    await tick(restarted, clock, 20)
    assert "half_open" == (await get(restarted, "/v1/breakers/a"))["state"]
    await post(restarted, [state_event("t", "running", agent="a"),
                           state_event("t", "completed")])  # fmt: skip
    assert "closed" == (await get(restarted, "/v1/breakers/a"))["state"]
