"""Exporter benchmark: /metrics render time at scale, and what the exporters cost ingest.

Targets (issue 4): /metrics renders in <= 50 ms with 100k live executions across 200
agents; with all three exporters on, ingest throughput stays >= 90% of what it is with
them off (same run).

- Render: the daemon's app in-process with N live executions over 200 agents (and a
  few thousand finished, so the histograms and counters are populated). A scrape is
  timed end to end (reading the state on the loop, rendering in a worker thread), as
  text and as OpenMetrics. Baseline in the same run: prometheus_client rendering the
  same number of samples from one plain gauge family: the library's own floor, which
  execwatch's encoder (checked byte for byte against the library's) is meant to beat.
- Ingest: the same app's ingest path on a workload in which a fifth of the events are
  state changes (so every exporter has records to handle), on a churn-heavy one, and on
  the ingest benchmark's heartbeat batches: exporters on (Prometheus, logs to /dev/null
  as JSON, OpenTelemetry spans through a BatchSpanProcessor to a no-op exporter)
  against the same ingest path with no sinks, alternating rounds, best of each.

    .venv/bin/python bench/exporting.py [--live 100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporters.logs import configure_logging
from monitor.config import build_settings
from monitor.events import parse_event
from monitor.server.app import make_app
from monitor.server.keys import DETECTORS, INGESTOR, METRICS, SPANS
from monitor.states import StateNames

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "exporters.json"
AGENTS = 200
RENDER_TARGET_S = 0.050
INGEST_TARGET = 0.90
NAMES = StateNames()
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class NullExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class PlainGauges(Collector):
    """The baseline: n samples of one gauge family, no state to read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def collect(self) -> Any:
        family = GaugeMetricFamily("x_executions", "x", labels=["agent", "kind", "state"])
        for i in range(self.n):
            family.add_metric([f"agent-{i % AGENTS}", "agent", f"s{i // AGENTS}"], i)
        yield family


async def render_run(live: int) -> dict[str, Any]:
    settings = build_settings(
        {"defaults": {"heartbeat_timeout_s": 3600}, "detectors": {"memory_samples_max": 0}}
    )
    app = make_app(settings, run_detectors=False)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        detectors = app[DETECTORS]
        now = time.time()
        for i in range(live):
            event = {"type": "state", "execution_id": f"r{i}", "agent": f"agent-{i % AGENTS}",
                     "state": "running", "kind": "agent" if i % 4 else "tool"}  # fmt: skip
            detectors.apply(parse_event(event, now, NAMES), now)
        ingestor = app[INGESTOR]
        for i in range(2000):  # some history, so counters and histograms have series
            body = orjson.dumps([
                {"type": "state", "execution_id": f"done-{i}", "agent": f"agent-{i % AGENTS}",
                 "state": "running", "ts": now - 30},
                {"type": "state", "execution_id": f"done-{i}",
                 "state": "completed" if i % 3 else "failed"},
            ])  # fmt: skip
            await ingestor.ingest(body, "application/json", now)
        gc.collect()
        metrics = app[METRICS]
        times: dict[str, float] = {}
        sizes: dict[str, int] = {}
        for label, accept in (("text", ""), ("openmetrics", OPENMETRICS)):
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                body, _ = await metrics.render(accept)
                best = min(best, time.perf_counter() - t0)
            times[label], sizes[label] = best, len(body)
        samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    finally:
        await runner.cleanup()
    baseline_registry = CollectorRegistry(auto_describe=False)
    baseline_registry.register(PlainGauges(samples))
    base = min(_timed(lambda: generate_latest(baseline_registry)) for _ in range(5))
    return {"live": live, "samples": samples, "seconds": times, "bytes": sizes,
            "baseline_text_s": base}  # fmt: skip


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


WORKLOADS = {
    # The ingest benchmark's own traffic: batches of 100 heartbeats from live runs.
    "heartbeats": (0, 100),
    # An agent run reports running, a phase, its end, and heartbeats in between: 5 runs
    # per 100 events is a busy fleet (15% of events change state, 3 spans' worth of records
    # per run).
    "typical": (5, 17),
    # Churn at its worst: 20 runs per 100 events, 3 heartbeats each (40% state changes).
    "churn": (20, 2),
}


def workload(name: str, round_: int, batches: int) -> list[bytes]:
    """Batches of 100 events: runs that register, report a phase, heartbeat and finish."""
    runs, beats = WORKLOADS[name]
    bodies = []
    if not runs:  # live runs registered by the first batch, heartbeating ever after
        return [
            orjson.dumps([{"type": "heartbeat", "execution_id": f"hb-{j}", "agent": f"a{j % 50}",
                           "progress": b} for j in range(beats)])
            for b in range(batches)
        ]  # fmt: skip
    for b in range(batches):
        events: list[dict[str, Any]] = []
        for j in range(runs):
            eid = f"{name}{round_}-{b}-{j}"
            events.append({"type": "state", "execution_id": eid, "agent": f"agent-{j % 50}",
                           "state": "running"})  # fmt: skip
            events.append({"type": "state", "execution_id": eid, "state": "running",
                           "phase": "tool_executing"})  # fmt: skip
            events += [{"type": "heartbeat", "execution_id": eid, "progress": k}
                       for k in range(beats)]  # fmt: skip
            events.append({"type": "state", "execution_id": eid, "state": "completed"})
        bodies.append(orjson.dumps(events))
    return bodies


async def ingest_rate(name: str, exporters_on: bool, round_: int, batches: int) -> float:
    settings = build_settings({"detectors": {"memory_samples_max": 0}})
    app = make_app(
        settings, run_detectors=False, span_exporter=NullExporter() if exporters_on else None
    )
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        ingestor = app[INGESTOR]
        if exporters_on:  # as in production: spans leave through a BatchSpanProcessor
            app[SPANS].pipeline.processor = BatchSpanProcessor(NullExporter())
        else:
            ingestor.set_sinks([])
            ingestor.publish = None
        bodies = workload(name, round_, batches)
        gc.collect()
        t0 = time.perf_counter()
        for body in bodies:
            await ingestor.ingest(body, "application/json", time.time())
        elapsed = time.perf_counter() - t0
    finally:
        await runner.cleanup()
    return batches * 100 / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--live", default="1000,10000,100000", help="live executions, comma-separated"
    )
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    configure_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115 - for the run

    renders = []
    for live in (int(n) for n in args.live.split(",")):
        result = asyncio.run(render_run(live))
        renders.append(result)
        text_s, om_s = result["seconds"]["text"], result["seconds"]["openmetrics"]
        print(f"/metrics with {live:,} live executions over {AGENTS} agents "
              f"({result['samples']:,} samples):")  # fmt: skip
        for label, seconds in (("text", text_s), ("openmetrics", om_s)):
            verdict = "PASS" if seconds <= RENDER_TARGET_S else "FAIL"
            print(f"  {label:12} {seconds * 1000:6.1f} ms  ({result['bytes'][label]:,} bytes)  "
                  f"target <= {RENDER_TARGET_S * 1000:.0f} ms  {verdict}")  # fmt: skip
        base = result["baseline_text_s"]
        print(f"  baseline: prometheus_client alone renders as many samples in "
              f"{base * 1000:.1f} ms; ratio {text_s / base:.2f}x\n")  # fmt: skip

    ingest: dict[str, dict[str, Any]] = {}
    for name, (runs, _) in WORKLOADS.items():
        rates: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(args.rounds):
            for on in (False, True):
                rates[on].append(asyncio.run(ingest_rate(name, on, round_ * 2 + on, args.batches)))
        off, on_rate = max(rates[False]), max(rates[True])
        ingest[name] = {"off": rates[False], "on": rates[True], "ratio": on_rate / off}
        verdict = "PASS" if on_rate / off >= INGEST_TARGET else "FAIL"
        print(f"ingest, workload {name!r} ({runs} runs per 100 events; best of rounds):")
        print(f"  exporters off {off:10,.0f} events/s")
        print(f"  exporters on  {on_rate:10,.0f} events/s   ratio {on_rate / off:.3f}x   "
              f"target >= {INGEST_TARGET:.2f}x  {verdict}")  # fmt: skip

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "exporters",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "render": renders,
        "ingest": ingest,
    }, indent=1))  # fmt: skip
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
