"""A detector sweep in slices: the announcing sinks see each slice as it is decided, the
metrics count the sweep once it is over, and a scrape in between misses nothing."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

import pytest

from exporters.prometheus import LAG_BUCKETS, AgentLabels, MetricsSink
from monitor.detectors.engine import Record
from monitor.events import Kind
from monitor.model import Transition
from monitor.server.keys import DETECTORS, INGESTOR, METRICS
from monitor.server.scheduler import TICK_BUDGET, ProcessWatch, _tick
from monitor.states import ExecState
from monitor.testing import FakeClock, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import Client, post
from tests.integration.test_metrics import samples, scrape, value

DEATHS = 2 * TICK_BUDGET + 500
"""Three slices."""


def metrics_sink(client: Client) -> MetricsSink:
    sink = client.app[METRICS].collector.sink
    assert isinstance(sink, MetricsSink)
    return sink


def dead_counted(client: Client) -> int:
    return metrics_sink(client).finished.get(("a", "agent", "dead"), 0)


async def register(client: Client, count: int, **fields: Any) -> None:
    for start in range(0, count, 1000):
        await post(client, [
            state_event(f"r{i}", "running", agent="a", heartbeat_timeout_s=5, **fields)
            for i in range(start, min(count, start + 1000))
        ])  # fmt: skip


async def sweep(client: Client, clock: FakeClock) -> None:
    """One sweep exactly as the daemon's loop runs it: in slices, then settled."""
    app = client.app
    await _tick(app[DETECTORS], app[INGESTOR], ProcessWatch(), clock(), clock)


async def test_the_metrics_count_a_sweep_after_every_slice_is_announced(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Each slice reaches the other sinks before the metrics have counted any of it; once
    the sweep is over, the metrics have counted all of it, durations and lags included."""
    counted_when_seen: list[tuple[int, int]] = []
    client: Client

    def announce(records: Sequence[Record]) -> None:
        deaths = sum(1 for r in records if type(r) is Transition and r.reason == "heartbeat")
        counted_when_seen.append((deaths, dead_counted(client)))

    client = await make_client(sinks=[announce])
    await register(client, DEATHS)
    counted_when_seen.clear()
    clock.advance(6)
    await sweep(client, clock)
    assert [(TICK_BUDGET, 0), (TICK_BUDGET, 0), (DEATHS - 2 * TICK_BUDGET, 0)] == [
        seen for seen in counted_when_seen if seen[0]
    ]
    found = samples(await scrape(client))
    assert DEATHS == dead_counted(client)
    assert DEATHS == value(found, "execwatch_executions_finished_total", agent="a",
                           kind="agent", state="dead")  # fmt: skip
    duration = "execwatch_execution_duration_seconds"
    assert DEATHS == value(found, f"{duration}_count", agent="a", kind="agent", state="dead")
    assert DEATHS * 5 == value(found, f"{duration}_sum", agent="a", kind="agent", state="dead")
    assert DEATHS == value(found, "execwatch_detection_lag_seconds_count", detector="heartbeat")
    assert DEATHS == value(found, "execwatch_detections_total", agent="a",
                           detector="heartbeat", reason="heartbeat")  # fmt: skip


async def test_a_scrape_between_two_slices_counts_what_was_announced(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Metrics are read at scrape: a scrape that lands mid-sweep settles first."""
    seen: list[float] = []
    client: Client

    def scrape_now(records: Sequence[Record]) -> None:
        if any(type(r) is Transition and r.reason == "heartbeat" for r in records):
            families = {f.name: f for f in client.app[METRICS].collector.families()}
            finished = families["execwatch_executions_finished"]
            seen.append(sum(sample[2] for sample in finished.samples))

    client = await make_client(sinks=[scrape_now])
    await register(client, DEATHS)
    clock.advance(6)
    await sweep(client, clock)
    assert [TICK_BUDGET, 2 * TICK_BUDGET, DEATHS] == seen
    assert DEATHS == dead_counted(client)  # and nothing counted twice after the sweep


async def test_a_death_evicted_within_its_sweep_keeps_its_duration(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Retention may forget an execution before the metrics count its end: the duration
    comes with the transition, so it is counted all the same."""
    client = await make_client({"retention": {"max_finished": 0}})
    await register(client, 3)
    clock.advance(6)
    await sweep(client, clock)
    assert 0 == len(client.app[DETECTORS].registry)  # every one of them evicted
    found = samples(await scrape(client))
    duration = "execwatch_execution_duration_seconds"
    assert 3 == value(found, f"{duration}_count", agent="a", kind="agent", state="dead")
    assert 15 == value(found, f"{duration}_sum", agent="a", kind="agent", state="dead")


async def test_a_slice_the_metrics_fail_to_count_is_counted_as_a_failure_and_only_it(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """A batch that breaks the metrics at settle is dropped and counted as a sink failure;
    the slices before and after it are counted, and the announcing sinks saw all three."""
    announced: list[int] = []
    client = await make_client(sinks=[lambda records: announced.append(len(records))])
    sink = metrics_sink(client)
    count = sink._count
    batches: list[int] = []

    def second_fails(records: Sequence[Record]) -> None:
        batches.append(len(records))
        if len(batches) == 2:
            raise RuntimeError("boom")
        count(records)

    await register(client, DEATHS)
    sink._count = second_fails  # type: ignore[method-assign]
    announced.clear()
    clock.advance(6)
    await sweep(client, clock)
    assert 1 == client.app[INGESTOR].stats.sink_failures["prometheus"]
    assert 3 == len([n for n in announced if n])  # every slice announced
    assert DEATHS - TICK_BUDGET == dead_counted(client)  # the second slice, and only it, lost


def test_a_bad_kept_batch_is_dropped_alone_and_its_failure_raised() -> None:
    """Straight on the sink: kept good, bad, good; settle counts both good ones, then
    raises. A batch counted at once waits behind what is kept, in order."""
    sink = MetricsSink(AgentLabels(10), lookup=lambda key: None, trace_id=lambda k, e: None,
                       traced=lambda: False)  # fmt: skip

    def death(execution_id: str, reason: str = "heartbeat") -> list[Record]:
        return [Transition("t", execution_id, "a", Kind.AGENT, ExecState.RUNNING,
                           ExecState.DEAD, 10.0, None, reason, False, 11.0, 0.0)]  # fmt: skip

    sink.defer(death("1"))
    sink.defer(death("2", reason="bogus"))  # not a detector's reason: counting it raises
    sink.defer(death("3"))
    with pytest.raises(KeyError):
        sink.settle()
    # 1 and 3, and the bad one up to where it failed (its end counted, not its lag)
    assert 3 == sink.finished[("a", "agent", "dead")]
    assert 2 == sink.lags["heartbeat"].counts[bisect_left(LAG_BUCKETS, 1.0)]
    sink.defer(death("4", reason="bogus"))
    with pytest.raises(KeyError):
        sink(death("5"))  # kept first: 4 fails, 5 is counted all the same
    assert 5 == sink.finished[("a", "agent", "dead")]
    sink.settle()  # nothing is left kept
    assert 5 == sink.finished[("a", "agent", "dead")]
    assert 3 == sink.lags["heartbeat"].counts[bisect_left(LAG_BUCKETS, 1.0)]


async def test_while_executions_carry_traces_the_metrics_count_each_slice_at_once(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """An exemplar needs its execution, which retention may evict before a sweep ends:
    with traces about, nothing is kept, and each death's exemplar links its trace."""
    counted_when_seen: list[int] = []
    client: Client

    def announce(records: Sequence[Record]) -> None:
        if any(type(r) is Transition and r.reason == "heartbeat" for r in records):
            counted_when_seen.append(dead_counted(client))

    client = await make_client(sinks=[announce])
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await register(client, DEATHS, traceparent=traceparent)
    clock.advance(6)
    await sweep(client, clock)
    assert [TICK_BUDGET, 2 * TICK_BUDGET, DEATHS] == counted_when_seen
    text = await scrape(client, "application/openmetrics-text; version=1.0.0")
    assert '# {trace_id="4bf92f3577b34da6a3ce929d0e0e4736"}' in text
