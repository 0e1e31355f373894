"""Heartbeats per core: execwatch against Prometheus Pushgateway, in the same run.

The way many teams report liveness today is a push per heartbeat to Pushgateway (Go):
`PUT /metrics/job/heartbeat/instance/<execution>` with a timestamp gauge. execwatch takes
the same heartbeat as an event, and an SDK batches them. Both servers run pinned to the
same CPU, loaded by the same wrk on another; what is compared is heartbeats per second
of CPU time used by the server process (psutil), so neither can win by using more cores.

- execwatch, batches of 100 heartbeats (as the SDK sends them): target >= 5x Pushgateway;
- execwatch, one heartbeat per request: reported.

Debian's prometheus-pushgateway and wrk are installed when missing.

    .venv/bin/python bench/pushgateway.py [--duration 10] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import ingest  # the sibling benchmark's wrk and server plumbing
import psutil

DEFAULT_JSON = ingest.BENCH_DIR / "results" / "pushgateway.json"
TARGET = 5.0
INSTANCES = int(os.environ.get("PUSH_INSTANCES", "1000"))
"""Distinct executions the pushes cycle through (as many live series)."""


def ensure_pushgateway() -> str:
    found = shutil.which("prometheus-pushgateway")
    if found:
        return found
    print("prometheus-pushgateway is missing: apt-get install -y prometheus-pushgateway",
          file=sys.stderr)  # fmt: skip
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/bin"}
    subprocess.run(["apt-get", "install", "-y", "prometheus-pushgateway"], check=True,
                   timeout=ingest.APT_TIMEOUT_S, env=env)  # fmt: skip
    found = shutil.which("prometheus-pushgateway")
    if found is None:
        raise ingest.BenchError("apt-get installed prometheus-pushgateway, but it is not on PATH")
    return found


def push_script() -> str:
    """wrk: one PUT per heartbeat, cycling through INSTANCES executions."""
    return (
        "local n = 0\n"
        "request = function()\n"
        f"  n = (n + 1) % {INSTANCES}\n"
        '  local body = "execution_heartbeat_timestamp_seconds " .. os.time() .. "\\n"\n'
        '  return wrk.format("PUT", "/metrics/job/heartbeat/instance/bench-" .. n, '
        '{["Content-Type"] = "text/plain; version=0.0.4"}, body)\n'
        "end\n"
    )


@dataclass
class Measured:
    name: str
    heartbeats_per_request: int
    requests_per_s: float
    cpu_s: float
    duration_s: float
    ok: bool

    @property
    def per_core(self) -> float:
        """Heartbeats per second of the server's CPU time."""
        return self.requests_per_s * self.duration_s * self.heartbeats_per_request / self.cpu_s


def cpu_seconds(pid: int) -> float:
    process = psutil.Process(pid)
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        total += sum(child.cpu_times()[:2])
    return total


def measure(
    name: str, server: ingest.Server, script: Path, beats: int, wrk: str,
    settings: ingest.WrkSettings, rounds: int,
) -> Measured:  # fmt: skip
    """Warm up, then `rounds` runs; the best by heartbeats per CPU-second."""
    assert server.process is not None
    ingest.run_wrk(wrk, settings, script, server, settings.warmup_s, 0)
    best: Measured | None = None
    for round_ in range(1, rounds + 1):
        before, t0 = cpu_seconds(server.process.pid), time.monotonic()
        run = ingest.run_wrk(wrk, settings, script, server, settings.duration_s, round_)
        used, elapsed = cpu_seconds(server.process.pid) - before, time.monotonic() - t0
        result = Measured(name, beats, run.requests_per_s, used, elapsed, run.ok)
        print(f"  {name:<22} round {round_}  {run.requests_per_s:>10,.0f} req/s  "
              f"{result.per_core:>12,.0f} heartbeats per CPU-second"
              f"{'' if run.ok else '  (errors)'}", flush=True)  # fmt: skip
        if run.ok and (best is None or result.per_core > best.per_core):
            best = result
    if best is None:
        raise ingest.BenchError(f"{name}: no clean run")
    return best


def start_pushgateway(binary: str, prefix: list[str], log_dir: Path) -> ingest.Server:
    server = ingest.Server("pushgateway", [])
    server.port = ingest.free_port()
    server.log_path = log_dir / "pushgateway.log"
    server.log = server.log_path.open("w+")
    server.process = subprocess.Popen(
        [*prefix, binary, f"--web.listen-address={ingest.HOST}:{server.port}",
         "--persistence.interval=5m"],
        stdin=subprocess.DEVNULL, stdout=server.log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + ingest.START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"http://{ingest.HOST}:{server.port}/-/ready", timeout=1):
                return server
        except OSError:
            if time.monotonic() > deadline or server.process.poll() is not None:
                raise ingest.BenchError(
                    f"pushgateway did not start\n{ingest.tail(server)}"
                ) from None
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    try:
        wrk, pushgateway = ingest.ensure_wrk(), ensure_pushgateway()
    except (ingest.BenchError, subprocess.SubprocessError) as exc:
        print(f"pushgateway benchmark: {exc}", file=sys.stderr)
        return 1
    server_prefix, wrk_prefix = ingest.pinning()
    settings = ingest.WrkSettings(1, args.connections, args.duration, args.warmup,
                                  tuple(wrk_prefix))  # fmt: skip
    execwatch_bin = Path(sys.executable).with_name("execwatch")
    print(
        f"heartbeats per core: wrk -c{args.connections} -d{args.duration}s, "
        f"{args.rounds} rounds; servers pinned to one CPU: {bool(server_prefix)}",
        flush=True,
    )
    results: dict[str, Measured] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="execwatch-push-") as tmp:
            work = Path(tmp)
            execwatch = ingest.Server("execwatch", [*server_prefix, str(execwatch_bin), "serve",
                                                    "--database", ":memory:",
                                                    "--listen", "{listen}"])  # fmt: skip
            with ingest.running([execwatch], work):
                for scenario in ingest.scenarios():
                    script = work / f"{scenario.events_per_request}.lua"
                    script.write_text(ingest.lua_script(scenario.body))
                    ingest.check_answer(execwatch, scenario)
                    name = f"execwatch, {scenario.name}"
                    results[name] = measure(name, execwatch, script, scenario.events_per_request,
                                            wrk, settings, args.rounds)  # fmt: skip
            gateway = start_pushgateway(pushgateway, server_prefix, work)
            try:
                script = work / "push.lua"
                script.write_text(push_script())
                results["pushgateway"] = measure("pushgateway, one push each", gateway, script, 1,
                                                 wrk, settings, args.rounds)  # fmt: skip
            finally:
                ingest.stop(gateway)
    except ingest.BenchError as exc:
        print(f"pushgateway benchmark failed: {exc}", file=sys.stderr)
        return 1
    base = results["pushgateway"].per_core
    print("\n| server | heartbeats per CPU-second | ratio to Pushgateway | target |")
    print("| --- | ---: | ---: | ---: |")
    for name, result in results.items():
        ratio = result.per_core / base
        target = f">= {TARGET:.0f}x" if "batch" in name else "reported"
        verdict = (" PASS" if ratio >= TARGET else " FAIL") if "batch" in name else ""
        print(f"| {name} | {result.per_core:,.0f} | {ratio:.2f}x | {target}{verdict} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "pushgateway",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": {name: {**vars(r), "per_core": r.per_core} for name, r in results.items()},
        "target": TARGET,
    }, indent=1))  # fmt: skip
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
