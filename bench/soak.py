"""Soak benchmark: a durable daemon under mixed traffic at half its measured maximum.

The requirement: over a 10-minute soak, the daemon's resident memory and open file
descriptors stay flat from the second minute to the end, and its SQLite file stays
bounded.

1. A real `execwatch serve` on a SQLite file, as a subprocess (pinned to CPU 0 when
   there are two cores; the load generator runs here, on the other).
2. The maximum: the generator sends mixed batches as fast as 8 connections allow, for
   --probe seconds. Each batch of 20 events starts 2 executions (`running`), completes
   2 (one in five `failed`), and heartbeats 16 live ones, over 20 agents, so about 1,000
   executions are live at any time and finished ones are evicted by retention.
3. The soak: the same traffic, paced at half that rate, for --minutes minutes. Every
   10 s the daemon's RSS, open fds and file size are sampled.

"Flat" compares the last minute's median with the second minute's: growth under 10%
for memory and none for fds. The baseline is the daemon itself (minute 2), in the
same run.

    .venv/bin/python bench/soak.py [--minutes 10] [--probe 20]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import ingest  # the sibling benchmark's server plumbing
import psutil

DEFAULT_JSON = ingest.BENCH_DIR / "results" / "soak.json"
BATCH_STARTS, BATCH_ENDS, BATCH_BEATS = 2, 2, 16
LIVE_TARGET = 1000
AGENTS = 20
CONCURRENCY = 8
SAMPLE_EVERY_S = 10.0
MEMORY_GROWTH_LIMIT = 0.10


class Traffic:
    """Builds mixed batches: starts, ends and heartbeats over a steady live set."""

    def __init__(self) -> None:
        self.serial = 0
        self.live: collections.deque[str] = collections.deque()
        self.beat = 0

    def start(self) -> dict[str, Any]:
        self.serial += 1
        execution_id = f"soak-{self.serial}"
        self.live.append(execution_id)
        agent = f"agent-{self.serial % AGENTS}"
        return {"type": "state", "execution_id": execution_id, "agent": agent,
                "state": "running", "event_id": f"{execution_id}-start"}  # fmt: skip

    def batch(self) -> bytes:
        events = [self.start() for _ in range(BATCH_STARTS)]
        if len(self.live) > LIVE_TARGET - BATCH_ENDS:
            for _ in range(BATCH_ENDS):
                execution_id = self.live.popleft()
                failed = int(execution_id.rsplit("-", 1)[1]) % 5 == 0
                events.append({"type": "state", "execution_id": execution_id,
                               "state": "failed" if failed else "completed"})  # fmt: skip
        # Heartbeats go to the newer half: the oldest are the next to end, and a batch in
        # flight on another connection must not heartbeat an execution already ended.
        half = len(self.live) // 2
        for _ in range(BATCH_BEATS):
            self.beat += 1
            execution_id = self.live[half + self.beat % (len(self.live) - half)]
            events.append({"type": "heartbeat", "execution_id": execution_id,
                           "progress": self.beat})  # fmt: skip
        return json.dumps(events, separators=(",", ":")).encode()


async def drive(url: str, traffic: Traffic, seconds: float, rate: float | None) -> dict[str, int]:
    """Send batches for `seconds`: as fast as possible, or paced at `rate` batches/s.
    Counts answers by status; anything but 202 makes the run void."""
    counts: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    lock = asyncio.Lock()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_at
        while True:
            async with lock:  # batches go out in order, so ends follow their starts
                now = time.monotonic()
                if now >= deadline:
                    return
                if rate is not None:
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                    next_at = max(next_at + 1 / rate, time.monotonic() - 1)
                body = traffic.batch()
            async with session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                answer = await response.json()
                counts[str(response.status)] += 1
                if response.status == 202 and answer["rejected"]:
                    counts["rejected_events"] += len(answer["rejected"])

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return dict(counts)


def sample(process: psutil.Process, database: Path) -> dict[str, float]:
    size = sum(p.stat().st_size for p in database.parent.glob(database.name + "*"))
    return {"rss_mb": process.memory_info().rss / 1e6, "fds": process.num_fds(),
            "file_mb": size / 1e6}  # fmt: skip


async def soak(url: str, pid: int, database: Path, minutes: float, rate: float,
               traffic: Traffic) -> tuple[list[dict[str, float]], dict[str, int]]:  # fmt: skip
    process = psutil.Process(pid)
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    load = asyncio.create_task(drive(url, traffic, minutes * 60, rate))
    while not load.done():
        await asyncio.wait({load}, timeout=SAMPLE_EVERY_S)
        if load.done():
            break  # the load is over: its connections are closing, not a sample of it
        point = {"t_s": round(time.monotonic() - started, 1), **sample(process, database)}
        samples.append(point)
        print(f"  {point['t_s']:>6.0f} s  rss {point['rss_mb']:7.1f} MB  fds "
              f"{point['fds']:4.0f}  file {point['file_mb']:6.1f} MB", flush=True)  # fmt: skip
    return samples, load.result()


def minute(samples: list[dict[str, float]], index: int, key: str) -> float:
    """The median of `key` over minute `index` (1-based; -1 for the last minute)."""
    end = max(s["t_s"] for s in samples)
    if index == -1:
        chosen = [s[key] for s in samples if s["t_s"] > end - 60]
    else:
        chosen = [s[key] for s in samples if (index - 1) * 60 < s["t_s"] <= index * 60]
    return statistics.median(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="soak length (10)")
    parser.add_argument("--probe", type=float, default=20, help="seconds at full speed (20)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)
    if args.minutes < 3:
        parser.error("--minutes must be >= 3 (minute 2 is the baseline, the last the verdict)")
    started = datetime.datetime.now(datetime.UTC)
    server_prefix, _ = ingest.pinning()
    execwatch_bin = Path(sys.executable).with_name("execwatch")
    with tempfile.TemporaryDirectory(prefix="execwatch-soak-") as tmp:
        work_dir = Path(tmp)
        database = work_dir / "execwatch.db"
        server = ingest.Server("execwatch", [*server_prefix, str(execwatch_bin), "serve",
                                             "--database", str(database), "--listen",
                                             "{listen}"])  # fmt: skip
        try:
            with ingest.running([server], work_dir):
                assert server.process is not None
                traffic = Traffic()
                probe = asyncio.run(drive(server.url, traffic, args.probe, None))
                maximum = probe.get("202", 0) / args.probe
                rate = maximum / 2
                print(f"soak benchmark: maximum {maximum:,.0f} batches/s of 20 events "
                      f"({probe}); soaking at {rate:,.0f}/s for {args.minutes:g} min",
                      flush=True)  # fmt: skip
                samples, counts = asyncio.run(
                    soak(server.url, server.process.pid, database, args.minutes, rate, traffic)
                )
        except ingest.BenchError as exc:
            print(f"soak benchmark failed: {exc}", file=sys.stderr)
            return 1
    rss2, rss_end = minute(samples, 2, "rss_mb"), minute(samples, -1, "rss_mb")
    fds2, fds_end = minute(samples, 2, "fds"), minute(samples, -1, "fds")
    file2, file_end = minute(samples, 2, "file_mb"), minute(samples, -1, "file_mb")
    growth = (rss_end - rss2) / rss2
    void = any(key != "202" for key in counts)  # an error answer, or a rejected event
    flat = growth < MEMORY_GROWTH_LIMIT and fds_end <= fds2
    verdict = "ERROR" if void else ("PASS" if flat else "FAIL")
    print()
    print(f"answers: {counts}")
    print(f"rss   minute 2 {rss2:7.1f} MB   last minute {rss_end:7.1f} MB   "
          f"growth {growth:+.1%} (limit {MEMORY_GROWTH_LIMIT:.0%})")  # fmt: skip
    print(f"fds   minute 2 {fds2:7.0f}      last minute {fds_end:7.0f}")
    print(f"file  minute 2 {file2:7.1f} MB   last minute {file_end:7.1f} MB   "
          f"max {max(s['file_mb'] for s in samples):.1f} MB")  # fmt: skip
    print(f"verdict: {verdict}")
    data = {
        "benchmark": "soak",
        "started": started.isoformat(),
        "command": f".venv/bin/python bench/soak.py --minutes={args.minutes:g} "
        f"--probe={args.probe:g}",
        "maximum_batches_per_s": maximum,
        "soak_batches_per_s": rate,
        "answers": counts,
        "samples": samples,
        "rss_mb": {"minute_2": rss2, "last_minute": rss_end, "growth": growth},
        "fds": {"minute_2": fds2, "last_minute": fds_end},
        "file_mb": {"minute_2": file2, "last_minute": file_end},
        "verdict": verdict,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults written to {args.json}")
    return 1 if void else 0


if __name__ == "__main__":
    raise SystemExit(main())
