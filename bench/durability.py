"""Durability benchmark: state events acknowledged after a SQLite commit, against the same
daemon keeping nothing (`--database :memory:`), measured with wrk in the same run.

The requirement: durable acknowledgement costs at most 30% of the in-memory ingest
rate, so the SQLite daemon reaches >= 0.7x the in-memory one.

Every request holds two state events that must be committed before the answer: a new
execution starting as `running` and its `completed`, so the registry keeps turning over
(finished executions are evicted by retention) and every answer waits for a
transaction. Rates are requests/s (two events each). Both daemons run as subprocesses
pinned to CPU 0 (wrk on CPU 1) when there are two cores; rounds alternate memory,
sqlite, memory, ... and each keeps its best clean run. The file's size after the run is
printed too.

    .venv/bin/python bench/durability.py [--duration S] [--connections N] [--rounds R]

Results are printed and written as JSON (default bench/results/durability.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import ingest  # the sibling benchmark's wrk and server plumbing

TARGET = 0.7
DEFAULT_JSON = ingest.BENCH_DIR / "results" / "durability.json"

# wrk runs this script in one Lua state per thread; a random prefix per thread keeps
# execution ids apart, and each request is self-contained so connections cannot race.
LUA = """
local counter = 0
local prefix = ""
function setup(thread)
  thread:set("prefix", tostring(math.random(1, 1000000000)))
end
function request()
  counter = counter + 1
  local id = '"d' .. prefix .. '-' .. counter .. '"'
  local body = '[{"type":"state","execution_id":' .. id .. ',"agent":"bench","state":"running"},' ..
               '{"type":"state","execution_id":' .. id .. ',"state":"completed"}]'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (10)")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (16)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (2)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per server (2)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    try:
        wrk = ingest.ensure_wrk()
    except ingest.BenchError as exc:
        print(f"durability benchmark: {exc}", file=sys.stderr)
        return 1
    server_prefix, wrk_prefix = ingest.pinning()
    # One wrk thread: wrk's per-connection counters are per thread, so ids stay unique.
    settings = ingest.WrkSettings(
        1, args.connections, args.duration, args.warmup, tuple(wrk_prefix)
    )
    execwatch_bin = Path(sys.executable).with_name("execwatch")
    failures: list[str] = []
    runs: dict[str, list[ingest.WrkRun]] = {"memory": [], "sqlite": []}
    with tempfile.TemporaryDirectory(prefix="execwatch-durability-") as tmp:
        work_dir = Path(tmp)
        database = work_dir / "execwatch.db"
        script = work_dir / "state.lua"
        script.write_text(LUA)
        servers = [
            ingest.Server(
                "memory",
                [
                    *server_prefix,
                    str(execwatch_bin),
                    "serve",
                    "--database",
                    ":memory:",
                    "--listen",
                    "{listen}",
                ],
            ),
            ingest.Server(
                "sqlite",
                [
                    *server_prefix,
                    str(execwatch_bin),
                    "serve",
                    "--database",
                    str(database),
                    "--listen",
                    "{listen}",
                ],
            ),
        ]
        print(
            f"durability benchmark: wrk -t1 -c{args.connections} -d{args.duration}s, "
            f"{args.rounds} rounds, best of each; two state events per request",
            flush=True,
        )
        try:
            with ingest.running(servers, work_dir):
                for server in servers:
                    if args.warmup:
                        ingest.run_wrk(wrk, settings, script, server, args.warmup, 0)
                for round_ in range(1, args.rounds + 1):
                    for server in servers:
                        run = ingest.run_wrk(wrk, settings, script, server, args.duration, round_)
                        runs[server.name].append(run)
                        print(
                            f"  round {round_}  {server.name:<7} {run.requests_per_s:>9,.0f} "
                            f"req/s  latency {run.latency_avg}",
                            flush=True,
                        )
                        if not run.ok:
                            failures.append(
                                f"{server.name} round {round_}: {run.non_2xx} "
                                f"non-2xx, socket errors {run.socket_errors}"
                            )
        except ingest.BenchError as exc:
            print(f"durability benchmark failed: {exc}", file=sys.stderr)
            return 1
        size = sum(p.stat().st_size for p in work_dir.glob("execwatch.db*"))
    memory, sqlite = ingest.best(runs["memory"]), ingest.best(runs["sqlite"])
    ratio = None
    if memory is not None and sqlite is not None:
        ratio = sqlite.requests_per_s / memory.requests_per_s
    verdict = "ERROR" if ratio is None or failures else ("PASS" if ratio >= TARGET else "FAIL")
    print()
    print(f"in memory     {memory.requests_per_s if memory else float('nan'):>9,.0f} req/s")
    print(f"sqlite (WAL)  {sqlite.requests_per_s if sqlite else float('nan'):>9,.0f} req/s")
    print(
        f"ratio         {ratio if ratio is not None else float('nan'):>9.3f}  "
        f"(target >= {TARGET})  {verdict}"
    )
    print(f"file size after the run (db + wal): {size / 1e6:.1f} MB")
    data = {
        "benchmark": "durability",
        "started": started.isoformat(),
        "command": f".venv/bin/python bench/durability.py --duration={args.duration} "
        f"--connections={args.connections} --rounds={args.rounds}",
        "target": TARGET,
        "ratio": ratio,
        "verdict": verdict,
        "requests_per_s": {
            "memory": memory and memory.requests_per_s,
            "sqlite": sqlite and sqlite.requests_per_s,
        },
        "file_bytes": size,
        "failures": failures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults written to {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
