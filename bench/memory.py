"""Memory benchmark: resident memory per live execution, in a real durable daemon.

A real `execwatch serve` on a SQLite file (the default store, every exporter it runs by
default) is measured idle, then after --live executions registered in batches of 1000
(one `running` event each, with a run timeout, over 200 agents) and one heartbeat each.
The daemon's RSS growth divided by the executions held is the cost of one. The
baseline, in the same run, is the daemon's own idle RSS; the target is 2 KiB each.

    .venv/bin/python bench/memory.py [--live 100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import ingest  # the sibling benchmark's server plumbing
import orjson
import psutil

DEFAULT_JSON = ingest.BENCH_DIR / "results" / "memory.json"
TARGET_BYTES = 2048
BATCH = 1000
AGENTS = 200
SETTLE_S = 3.0
"""Time for the detector loop to run its collections and freeze (it does every second)."""


def post(url: str, events: list[dict[str, object]]) -> None:
    request = urllib.request.Request(
        url, data=orjson.dumps(events), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        body = json.load(answer)
        assert body["accepted"] == len(events), body


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--live", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--database", help="the daemon's --database (default: a SQLite file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="execwatch-memory-") as tmp:
        server = ingest.Server(
            "execwatch",
            [sys.executable, "-m", "monitor.cli", "serve", "--listen", "{listen}",
             "--database", args.database or str(Path(tmp) / "execwatch.db")],
        )  # fmt: skip
        with ingest.running([server], Path(tmp)):
            assert server.process is not None
            pid = server.process.pid
            time.sleep(SETTLE_S)
            idle = rss(pid)
            for start in range(0, args.live, BATCH):
                post(server.url, [
                    {"type": "state", "execution_id": f"run-{i}", "agent": f"agent-{i % AGENTS}",
                     "state": "running", "run_timeout_s": 3600}
                    for i in range(start, min(start + BATCH, args.live))
                ])  # fmt: skip
            for start in range(0, args.live, BATCH):
                post(server.url, [
                    {"type": "heartbeat", "execution_id": f"run-{i}", "progress": 1}
                    for i in range(start, min(start + BATCH, args.live))
                ])  # fmt: skip
            time.sleep(SETTLE_S)
            loaded = rss(pid)
    per = (loaded - idle) / args.live
    verdict = "PASS" if per <= TARGET_BYTES else "FAIL"
    print(f"resident memory with {args.live:,} live executions (SQLite store, default exporters):")
    print(f"  idle daemon (baseline)  {idle / 2**20:8.1f} MiB")
    print(f"  loaded                  {loaded / 2**20:8.1f} MiB   ({loaded / idle:.1f}x idle)")
    print(f"  per live execution      {per:8.0f} bytes   target <= {TARGET_BYTES} bytes  {verdict}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "memory",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version()},
        "live": args.live,
        "idle_rss_bytes": idle,
        "loaded_rss_bytes": loaded,
        "bytes_per_execution": per,
        "target_bytes": TARGET_BYTES,
    }, indent=1))  # fmt: skip
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
