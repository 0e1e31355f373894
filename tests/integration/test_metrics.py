"""/metrics after a scripted scenario: exact values, bounded labels, README table, promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from exporters.exposition import Encoder
from exporters.prometheus import FrozenCollector
from monitor.server.keys import DETECTORS, METRICS, REGISTRY
from monitor.testing import FakeClock, heartbeat, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import Client, post
from tests.integration.test_detectors_api import tick

README = Path(__file__).resolve().parents[2] / "README.md"
CONFIG: dict[str, Any] = {
    "defaults": {"heartbeat_timeout_s": 10, "stall_timeout_s": 100},
    "breaker": {"minimum_calls": 2, "wait_in_open_s": 30},
}


async def scrape(client: Client, accept: str = "") -> str:
    response = await client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert 200 == response.status
    return await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def scenario(client: Client, clock: FakeClock) -> None:
    """Two agents, in two tenants; a completion, a failure pair, a death, a revival, a stall."""
    await post(client, [
        state_event("ok-1", "running", agent="triage", tenant="team-a", ts=clock() - 30),
        state_event("ok-1", "completed", tenant="team-a"),
        state_event("f-1", "running", agent="flaky", kind="tool"),
        state_event("f-1", "failed", error="boom"),
        state_event("f-2", "running", agent="flaky", kind="tool"),
        state_event("f-2", "failed", error="boom"),
        state_event("dies", "running", agent="triage", tenant="team-a"),
        state_event("lives", "running", agent="triage", progress=1),
        heartbeat("lives", progress=1),
        heartbeat("nobody"),
        state_event("f-3", "queued", agent="flaky", kind="tool"),
        state_event("stuck", "running", agent="slowpoke", stall_timeout_s=5,
                    heartbeat_timeout_s=100),
    ])  # fmt: skip
    clock.advance(1)
    await post(client, heartbeat("stuck"))  # alive, but no progress: stalled at +5 s
    await tick(client, clock, 10)  # "dies" and "lives" are dead
    await post(client, heartbeat("lives", progress=1))  # revived
    await post(client, [heartbeat("lives", event_id="e"), heartbeat("lives", event_id="e")])


async def test_a_scripted_scenario_gives_exact_values(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Every counter and gauge the scenario touches has exactly the value it must."""
    client = await make_client(CONFIG)
    await scenario(client, clock)
    found = samples(await scrape(client))
    assert 1 == value(found, "execwatch_build_info", version="0.1.0")
    assert 1 == value(found, "execwatch_executions", agent="triage", kind="agent", state="running")
    assert 1 == value(found, "execwatch_executions", agent="triage", kind="agent", state="dead")
    assert 0 == value(found, "execwatch_executions", agent="triage", kind="agent", state="paused")
    assert 1 == value(found, "execwatch_executions", agent="flaky", kind="tool", state="pending")
    assert 3 == value(found, "execwatch_executions_started_total", agent="triage", kind="agent")
    assert 3 == value(found, "execwatch_executions_started_total", agent="flaky", kind="tool")
    finished = "execwatch_executions_finished_total"
    assert 1 == value(found, finished, agent="triage", kind="agent", state="completed")
    assert 2 == value(found, finished, agent="triage", kind="agent", state="dead")
    assert 2 == value(found, finished, agent="flaky", kind="tool", state="failed")
    assert 0 == value(found, finished, agent="flaky", kind="tool", state="timeout")
    duration = "execwatch_execution_duration_seconds"
    assert 30 == value(found, f"{duration}_sum", agent="triage", kind="agent", state="completed")
    assert 1 == value(found, f"{duration}_count", agent="triage", kind="agent", state="completed")
    detections = "execwatch_detections_total"
    assert 2 == value(found, detections, agent="triage", detector="heartbeat", reason="heartbeat")
    assert 1 == value(found, detections, agent="flaky", detector="breaker", reason="circuit_open")
    assert 0 == value(found, detections, agent="triage", detector="stall", reason="stalled")
    assert 1 == value(found, detections, agent="slowpoke", detector="stall", reason="stalled")
    assert 1 == value(found, "execwatch_findings", agent="slowpoke", finding="stalled")
    assert 1 == value(found, "execwatch_revivals_total", agent="triage")
    assert 3 == value(found, "execwatch_heartbeats_total", agent="triage")
    assert 1 == value(found, "execwatch_circuit_breaker_state", agent="flaky", state="open")
    assert 0 == value(found, "execwatch_circuit_breaker_state", agent="flaky", state="closed")
    assert 1 == value(found, "execwatch_circuit_breaker_failure_rate", agent="flaky")
    assert 1 == value(found, "execwatch_circuit_breaker_not_permitted_calls_total", agent="flaky")
    assert 10 == value(found, "execwatch_events_received_total", type="state")
    assert 6 == value(found, "execwatch_events_received_total", type="heartbeat")
    assert 1 == value(found, "execwatch_events_rejected_total", reason="unknown_execution")
    assert 1 == value(found, "execwatch_events_duplicate_total")
    assert 2 == value(found, "execwatch_detection_lag_seconds_count", detector="heartbeat")
    assert clock() == value(found, "execwatch_detector_last_tick_timestamp_seconds")
    oldest = value(found, "execwatch_oldest_heartbeat_timestamp_seconds", agent="triage")
    assert clock() == oldest  # only "lives" is live for triage, and it just reported


async def test_no_execution_id_or_tenant_in_any_label(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Labels are bounded: ids and tenants go to traces and logs, never to series."""
    client = await make_client(CONFIG)
    await scenario(client, clock)
    forbidden = {"ok-1", "f-1", "f-2", "f-3", "dies", "lives", "nobody", "stuck", "team-a", "e"}
    for (name, labels), _ in samples(await scrape(client)).items():
        if name.startswith("execwatch_"):
            assert {"tenant", "execution_id"}.isdisjoint(dict(labels)), name
            assert forbidden.isdisjoint(dict(labels).values()), (name, labels)


SUMMABLE = (
    "execwatch_executions", "execwatch_executions_started_total",
    "execwatch_executions_finished_total", "execwatch_execution_duration_seconds_count",
    "execwatch_execution_duration_seconds_bucket", "execwatch_heartbeats_total",
    "execwatch_detections_total", "execwatch_findings", "execwatch_revivals_total",
    "execwatch_circuit_breaker_not_permitted_calls_total",
)  # fmt: skip
"""Per-agent families whose series add up across tenants."""


async def test_a_tenant_allowlist_splits_series_by_tenant_and_folds_the_rest(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """[metrics] tenants: per-agent series lead with `tenant`, named for listed tenants and
    `__other__` for the rest; summed over tenants they are the series without the list."""
    plain = await make_client(CONFIG)
    await scenario(plain, clock)
    split = await make_client({**CONFIG, "metrics": {"tenants": ["team-a"]}})
    await scenario(split, clock)
    without, with_tenants = samples(await scrape(plain)), samples(await scrape(split))

    assert 2 == value(with_tenants, "execwatch_executions_started_total",
                      tenant="team-a", agent="triage", kind="agent")  # fmt: skip
    assert 1 == value(with_tenants, "execwatch_executions_started_total",
                      tenant="__other__", agent="triage", kind="agent")  # fmt: skip
    assert 3 == value(
        with_tenants, "execwatch_heartbeats_total", tenant="__other__", agent="triage"
    )
    assert 0 == value(with_tenants, "execwatch_heartbeats_total", tenant="team-a", agent="triage")
    state = "execwatch_circuit_breaker_state"
    assert 1 == value(with_tenants, state, tenant="__other__", agent="flaky", state="open")

    summed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for (name, labels), number in with_tenants.items():
        if "agent" in dict(labels):
            assert dict(labels)["tenant"] in ("team-a", "__other__"), (name, labels)
        if name in SUMMABLE:
            rest = tuple((k, v) for k, v in labels if k != "tenant")
            summed[(name, rest)] = summed.get((name, rest), 0.0) + number
    assert {k: v for k, v in without.items() if k[0] in SUMMABLE} == summed


async def test_the_agent_label_is_capped_and_the_overflow_counted(
    make_client: ClientFactory,
) -> None:
    """Past max_agents, agents fold into __overflow__, and the fold is counted."""
    client = await make_client({"metrics": {"max_agents": 2}})
    await post(client, [state_event(f"r{i}", "running", agent=f"a{i}") for i in range(4)])
    found = samples(await scrape(client))
    running = {
        dict(labels)["agent"]: count
        for (name, labels), count in found.items()
        if name == "execwatch_executions" and dict(labels)["state"] == "running"
    }
    assert {"a0": 1, "a1": 1, "__overflow__": 2} == running
    assert 2 == value(found, "execwatch_metrics_label_overflow_total", label="agent")


async def test_openmetrics_carries_trace_id_exemplars(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Asked for OpenMetrics, the duration histogram links to the execution's trace."""
    client = await make_client()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await post(
        client,
        [
            state_event("r", "running", agent="a", traceparent=traceparent),
            state_event("r", "completed"),
        ],
    )
    text = await scrape(client, "application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    assert re.search(
        r"execwatch_execution_duration_seconds_bucket\{.*\} 1\.0 "
        r'# \{trace_id="4bf92f3577b34da6a3ce929d0e0e4736"\}',
        text,
    )


def readme_table() -> dict[str, tuple[str, str]]:
    """name -> (type, labels) from the README's metrics table."""
    section = README.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(execwatch_\w+)` \| (\w+) \| ([^|]*) \|", section, re.MULTILINE)
    return {name: (kind, labels.strip()) for name, kind, labels in rows}


async def test_the_readme_metrics_table_matches_a_live_scrape(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Every execwatch family in a scrape is in the README with its type and labels, and
    every row of the README is in the scrape."""
    client = await make_client(CONFIG)
    await scenario(client, clock)
    live: dict[str, tuple[str, str]] = {}
    for family in text_string_to_metric_families(await scrape(client)):
        if not family.name.startswith("execwatch_"):
            continue
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        name = family.name + ("_total" if family.type == "counter" else "")
        live[name] = (family.type, ", ".join(sorted(labels)) if family.samples else "?")
    table = {n: (k, ", ".join(sorted(x.strip(" `") for x in lab.split(",")))) for n, (k, lab) in
             readme_table().items()}  # fmt: skip
    for name, (kind, labels_text) in live.items():
        if labels_text == "?" and name in table:  # no sample yet to read the labels from
            live[name] = (kind, table[name][1])
    assert live == {n: (k, "" if lab == "—" else lab) for n, (k, lab) in table.items()}


async def test_promtool_finds_nothing_to_fix(
    make_client: ClientFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """`promtool check metrics` (Debian's prometheus, installed by `make test`) is clean."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: `make test` installs Debian's prometheus package")
        pytest.skip("promtool is not installed (make test installs it)")
    client = await make_client(CONFIG)
    await scenario(client, clock)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=await scrape(client), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (0, "") == (result.returncode, result.stdout + result.stderr)


async def test_the_fast_encoder_writes_what_prometheus_client_writes(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Byte for byte, in both formats, for every execwatch family of a scripted scenario,
    with label values that need escaping."""
    client = await make_client(CONFIG)
    await scenario(client, clock)
    await post(client, [
        state_event("odd", "running", agent='we"ird\\agent\nname', tenant="t",
                    traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        state_event("odd", "completed", tenant="t"),
    ])  # fmt: skip
    metrics = client.app[METRICS]
    families = metrics.collector.families()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FrozenCollector([f.to_prometheus() for f in families]))
    fast = Encoder()
    assert generate_latest(registry).decode() == fast.render(families, openmetrics=False)
    assert om_latest(registry).decode() == fast.render(families, openmetrics=True) + "# EOF\n"
    assert fast.render(families, False) == fast.render(families, False)  # from the cache too


async def test_counters_never_go_backwards_and_gauges_keep_their_zeros(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Evicted agents keep zero series; refusals survive a forgotten breaker; findings and
    breaker state exist at 0 for a known agent; a rejected heartbeat is not counted."""
    client = await make_client({"breaker": {"minimum_calls": 1}, "retention": {"finished_s": 1}})
    await post(
        client,
        [
            state_event("f", "failed", agent="a", kind="job"),
            state_event("r", "queued", agent="a", kind="job"),
        ],
    )  # refused: open
    await post(client, state_event("q", "running", agent="quiet"))
    await post(client, heartbeat("q", attributes={f"k{i}": i for i in range(65)}), 422)
    found = samples(await scrape(client))
    assert 1 == value(found, "execwatch_circuit_breaker_not_permitted_calls_total", agent="a")
    assert 0 == value(found, "execwatch_heartbeats_total", agent="quiet")
    assert 0 == value(found, "execwatch_findings", agent="quiet", finding="stalled")
    assert 1 == value(found, "execwatch_circuit_breaker_state", agent="quiet", state="closed")
    client.app[DETECTORS].breakers.clear()  # as if forgotten past the cap
    await post(client, state_event("r", "cancelled"))
    clock.advance(5)
    await post(client, state_event("z", "running", agent="z"))  # evicts all of agent a
    found = samples(await scrape(client))
    assert 1 == value(found, "execwatch_circuit_breaker_not_permitted_calls_total", agent="a")
    assert 0 == value(found, "execwatch_executions", agent="a", kind="job", state="pending")
    assert not any(key[1] == "a" for key in client.app[REGISTRY].counts)


async def test_an_open_breaker_wins_over_a_half_open_one_under_one_label(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Two tenants' breakers of one agent: the exported state is the worst, open."""
    client = await make_client({"breaker": {"minimum_calls": 1, "wait_in_open_s": 10}})
    await post(client, state_event("a1", "failed", agent="x", tenant="team-a"))
    await tick(client, clock, 11)  # team-a's breaker is half open
    await post(client, state_event("b1", "failed", agent="x", tenant="team-b"))  # open
    found = samples(await scrape(client))
    assert 1 == value(found, "execwatch_circuit_breaker_state", agent="x", state="open")
    assert 0 == value(found, "execwatch_circuit_breaker_state", agent="x", state="half_open")


async def test_openmetrics_output_parses_as_openmetrics(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """The OpenMetrics scrape is valid for prometheus_client's OpenMetrics parser."""
    client = await make_client(CONFIG)
    await scenario(client, clock)
    text = await scrape(client, "application/openmetrics-text; version=1.0.0")
    names = {family.name for family in om_parse(text)}
    assert {"execwatch_executions", "execwatch_heartbeats", "execwatch_detections"} <= names
