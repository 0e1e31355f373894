"""A detector sweep in slices: the announcing sinks see each slice as it is decided, the
metrics count the sweep once it is over, and a scrape in between misses nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exporters.prometheus import MetricsSink
from monitor.detectors.engine import Record
from monitor.model import Transition
from monitor.server.keys import DETECTORS, INGESTOR, METRICS
from monitor.server.scheduler import TICK_BUDGET, ProcessWatch, _tick
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


async def test_a_failing_metrics_sink_is_counted_and_the_sweep_goes_on(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """The settle at the end of a sweep fails like any sink: counted, logged, survived."""
    announced: list[int] = []
    client = await make_client(sinks=[lambda records: announced.append(len(records))])
    sink = metrics_sink(client)

    def broken() -> None:
        raise RuntimeError("boom")

    sink.settle = broken  # type: ignore[method-assign]
    await register(client, 3)
    announced.clear()
    clock.advance(6)
    await sweep(client, clock)
    assert 1 == client.app[INGESTOR].stats.sink_failures["prometheus"]
    assert [3] == [count for count in announced if count]  # the deaths, announced
