"""Stream benchmark: what live-stream consumers cost ingestion, and that a stalled one
costs it nothing.

The daemon's app runs in this process on a loopback port; the ingest path is driven
directly (as bench/exporting.py does) with its "typical" workload: batches of 100
events in which 15% change state, so every batch publishes records to the stream.
Consumers are real sockets: a healthy one is `curl -sN` in another process, reading
everything; a stalled one is a socket in this process that never reads (a small
receive buffer, so it stalls sooner). Rounds alternate between:

- baseline: no consumer;
- stalled: one stalled consumer (it must be dropped, and ingestion must not notice);
- healthy: one healthy consumer, reading every event;
- both: a healthy and a stalled one.

A stalled consumer is served like a healthy one until the kernel's socket buffers and its
queue are full; the events that took are fed before the clock starts, and reported. The
timed part shows that once dropped it costs nothing. Each prints its events/s and its
ratio to the baseline of the same run (best of rounds). Targets: stalled >= 0.95x; the
others are reported (a healthy consumer costs the serialisation and the writes of its
events).

    .venv/bin/python bench/stream.py [--batches 1000] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from exporting import workload  # the sibling benchmark's "typical" workload

from exporters.logs import configure_logging
from monitor.config import build_settings
from monitor.server.app import make_app
from monitor.server.keys import INGESTOR

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "stream.json"
STALLED_TARGET = 0.95
SCENARIOS = ("baseline", "stalled", "healthy", "both")


async def ingest_rate(scenario: str, round_: int, batches: int) -> dict[str, Any]:
    settings = build_settings({"detectors": {"memory_samples_max": 0}})
    app = make_app(settings, run_detectors=False)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stats = app[INGESTOR].stats.stream
    curl: subprocess.Popen[bytes] | None = None
    stalled: socket.socket | None = None
    try:
        if scenario in ("healthy", "both"):
            curl = subprocess.Popen(
                ["curl", "-sN", f"http://127.0.0.1:{port}/v1/stream"],
                stdout=subprocess.DEVNULL,
            )
        if scenario in ("stalled", "both"):
            stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", port))
            stalled.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: bench\r\n\r\n")
        wanted = (curl is not None) + (stalled is not None)
        while stats.consumers < wanted:
            await asyncio.sleep(0.01)
        ingestor = app[INGESTOR]
        until_dropped = 0
        published_until_dropped = None
        if stalled is not None:  # untimed: feed it until its buffers fill and it is let go
            for body in workload("typical", round_ + 1000, 2000):
                await ingestor.ingest(body, "application/json", time.time())
                await asyncio.sleep(0)
                until_dropped += 100
                if stats.dropped:
                    published_until_dropped = stats.published
                    break
        bodies = workload("typical", round_, batches)
        gc.collect()
        t0 = time.perf_counter()
        for body in bodies:
            await ingestor.ingest(body, "application/json", time.time())
            await asyncio.sleep(0)  # as between two requests: the stream writers get a turn
        elapsed = time.perf_counter() - t0
        return {
            "events_per_s": batches * 100 / elapsed,
            "published": stats.published,
            "dropped": stats.dropped,
            "events_until_dropped": until_dropped,
            "records_until_dropped": published_until_dropped,
        }
    finally:
        if curl is not None:
            curl.terminate()
            curl.wait()
        if stalled is not None:
            stalled.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    configure_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115 - for the run

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
    for round_ in range(args.rounds):
        for i, name in enumerate(SCENARIOS):
            runs[name].append(asyncio.run(ingest_rate(name, round_ * 10 + i, args.batches)))
    best = {name: max(r["events_per_s"] for r in runs[name]) for name in SCENARIOS}
    print(f"ingest with live-stream consumers ({args.batches} batches of 100 events, 15% "
          "state changes; best of rounds):")  # fmt: skip
    results: dict[str, Any] = {}
    for name in SCENARIOS:
        ratio = best[name] / best["baseline"]
        dropped = max(r["dropped"] for r in runs[name])
        line = f"  {name:9} {best[name]:10,.0f} events/s   ratio {ratio:.3f}x   dropped {dropped}"
        if name == "stalled":
            line += f"   target >= {STALLED_TARGET:.2f}x  "
            line += "PASS" if ratio >= STALLED_TARGET and dropped == 1 else "FAIL"
        print(line)
        if name in ("stalled", "both"):
            took = max(r["records_until_dropped"] for r in runs[name])
            print(f"            the stalled consumer was dropped after {took:,} stream events")
        results[name] = {"runs": runs[name], "best": best[name], "ratio": ratio}

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "stream",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "scenarios": results,
    }, indent=1))  # fmt: skip
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
