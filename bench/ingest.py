"""Ingest benchmark: execwatch's POST /v1/events against a bare aiohttp + orjson handler.

The requirement: heartbeats in batches of 100 are ingested at >= 0.25x the
events/s of a bare aiohttp handler that only parses the same JSON, and single
heartbeats at >= 0.5x its requests/s, both measured with wrk in the same run.

Both servers run as subprocesses on free loopback ports, pinned to CPU 0 with
taskset (wrk gets CPU 1) when there are two or more cores. Each scenario warms
both up, then alternates bare, execwatch, bare, execwatch ... for --rounds
rounds of --duration seconds and keeps each server's best run, which damps the
noise of a shared machine. A run with non-2xx answers or socket errors fails
the benchmark (exit 1); a missed target does not (it is reported, exit 0).

    .venv/bin/python bench/ingest.py [--duration S] [--connections N] [--threads T] [--json PATH]

Results are printed as a table and written as JSON (default bench/results/ingest.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_JSON = BENCH_DIR / "results" / "ingest.json"
HOST = "127.0.0.1"
BATCH_SIZE = 100
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
APT_TIMEOUT_S = 600.0
WRK_TIMEOUT_S = 5
"""wrk counts a request as a timeout error after this long."""
READY = re.compile(r"listening on http://\S+:(\d+)")


class BenchError(Exception):
    """The benchmark could not measure: a server did not start, or answered with errors."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One request body, sent over and over; `unit` is what the target ratio counts."""

    name: str
    body: bytes
    events_per_request: int
    unit: str
    """"events/s" or "requests/s": the rate the target compares."""
    target: float
    """execwatch must reach at least this fraction of the bare server's rate."""


@dataclass(slots=True)
class WrkRun:
    """What one wrk run reported."""

    server: str
    round: int
    requests_per_s: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    latency_avg: str | None
    output: str

    @property
    def ok(self) -> bool:
        """No error answers and no socket errors."""
        return self.non_2xx == 0 and not any(self.socket_errors.values())


@dataclass(slots=True)
class Server:
    """A server under test, running as a subprocess on a loopback port."""

    name: str
    command: list[str]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log: TextIO | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        """Where the benchmark POSTs."""
        return f"http://{HOST}:{self.port}/v1/events"


def heartbeat(i: int) -> dict[str, Any]:
    """The heartbeat of execution bench-<i>; naming `agent` lets the first one register it."""
    return {"type": "heartbeat", "execution_id": f"bench-{i}", "agent": "bench", "progress": i}


def scenarios() -> list[Scenario]:
    """Batches of 100 heartbeats (judged on events/s), single heartbeats (on requests/s)."""
    batch = json.dumps([heartbeat(i) for i in range(BATCH_SIZE)], separators=(",", ":"))
    single = json.dumps(heartbeat(0), separators=(",", ":"))
    return [
        Scenario(f"batch of {BATCH_SIZE}", batch.encode(), BATCH_SIZE, "events/s", 0.25),
        Scenario("single event", single.encode(), 1, "requests/s", 0.5),
    ]


# ---- environment ---------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The path of wrk, installing Debian's package first when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError("wrk is not installed and there is no apt-get to install it with")
    print("wrk is missing: apt-get update && apt-get install -y wrk", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([apt, "update"], [apt, "install", "-y", "wrk"]):
        try:
            subprocess.run(command, check=True, env=env, timeout=APT_TIMEOUT_S)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"could not install wrk: {exc}") from exc
    found = shutil.which("wrk")
    if found is None:
        raise BenchError("apt-get installed wrk, but it is not on PATH")
    return found


def cpu_count() -> int:
    """CPUs this process may run on (what taskset can pin to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pinning() -> tuple[list[str], list[str]]:
    """taskset prefixes for the servers (CPU 0) and wrk (CPU 1); empty when it cannot pin."""
    taskset = shutil.which("taskset")
    if taskset is None or cpu_count() < 2:
        return [], []
    cpus = sorted(os.sched_getaffinity(0))
    return [taskset, "-c", str(cpus[0])], [taskset, "-c", str(cpus[1])]


def shown(prefix: Sequence[str]) -> str | None:
    """A taskset prefix as a person would type it, or None when not pinned."""
    if not prefix:
        return None
    return " ".join([Path(prefix[0]).name, *prefix[1:]])


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def version_of(distribution: str) -> str | None:
    """The installed version of a distribution, None if it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def wrk_version(wrk: str) -> str | None:
    """wrk's first line of `wrk -v` (it exits 1 after printing it)."""
    try:
        done = subprocess.run([wrk, "-v"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def git_commit() -> str | None:
    """The commit the work tree is on, None before the first commit."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def machine_info(wrk: str) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "nproc": os.cpu_count(),
        "cpus_available": cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "aiohttp": version_of("aiohttp"),
        "orjson": version_of("orjson"),
        "execwatch": version_of("execwatch"),
        "wrk": wrk_version(wrk),
        "git_commit": git_commit(),
    }


# ---- servers -------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def server_env() -> dict[str, str]:
    """This environment less any EXECWATCH_* setting, so a developer's config cannot leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EXECWATCH_")}


def start(server: Server, log_dir: Path) -> None:
    """Start `server` and wait (bounded) for its "listening on" line."""
    server.port = free_port()
    command = [arg.replace("{listen}", f"{HOST}:{server.port}") for arg in server.command]
    server.log_path = log_dir / f"{server.name}.stderr.log"
    server.log = server.log_path.open("w+")
    server.process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=server.log,
        env=server_env(),
        cwd=REPO_DIR,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = READY.search(server.log_path.read_text(errors="replace"))
        if match:
            server.port = int(match[1])
            return
        if server.process.poll() is not None:
            break
        time.sleep(0.05)
    raise BenchError(
        f"{server.name} did not start (exit status {server.process.poll()}): "
        f"{' '.join(command)}\n{tail(server)}"
    )


def tail(server: Server, lines: int = 20) -> str:
    """The last lines the server wrote to stderr, for an error message."""
    if server.log_path is None or not server.log_path.exists():
        return ""
    text = server.log_path.read_text(errors="replace").splitlines()
    return "\n".join(f"  {server.name}| {line}" for line in text[-lines:])


def stop(server: Server) -> None:
    """SIGTERM, wait a bounded time, then SIGKILL."""
    process = server.process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(
                f"{server.name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; killing it",
                file=sys.stderr,
            )
            process.kill()
            process.wait(STOP_TIMEOUT_S)
    if server.log is not None:
        server.log.close()
        server.log = None


@contextlib.contextmanager
def running(servers: Sequence[Server], log_dir: Path) -> Iterator[None]:
    """Every server started for the block and stopped after it, whatever happens."""
    try:
        for server in servers:
            start(server, log_dir)
        yield
    finally:
        for server in servers:
            stop(server)


def check_answer(server: Server, scenario: Scenario) -> None:
    """One request by hand: a 2xx that accepted every event, or the benchmark is void."""
    request = urllib.request.Request(
        server.url,
        data=scenario.body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        raise BenchError(f"{server.name} did not answer POST {server.url}: {exc}") from exc
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    accepted = doc.get("accepted") if isinstance(doc, dict) else None
    rejected = doc.get("rejected") if isinstance(doc, dict) else None
    if not 200 <= status < 300 or accepted != scenario.events_per_request or rejected:
        raise BenchError(
            f"{server.name} answered {status} {body[:500]!r} to a {scenario.name} POST; "
            f"expected 2xx with accepted = {scenario.events_per_request} and nothing rejected"
        )


# ---- wrk -----------------------------------------------------------------------------------


def lua_string(text: str) -> str:
    """`text` as a double-quoted Lua string literal: quote and backslash escaped, bytes
    outside printable ASCII as decimal escapes."""
    out = []
    for byte in text.encode():
        if byte in (0x22, 0x5C):  # " and \
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def lua_script(body: bytes) -> str:
    """A wrk script that POSTs `body` as JSON on every request."""
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {lua_string(body.decode())}\n"
    )


_REQUESTS_PER_S = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_LATENCY = re.compile(r"^\s*Latency\s+(\S+)", re.MULTILINE)


def parse_wrk(server: str, round_: int, output: str) -> WrkRun:
    """Read the figures out of wrk's report; BenchError when it has no Requests/sec line."""
    rate = _REQUESTS_PER_S.search(output)
    total = _TOTAL.search(output)
    if rate is None or total is None:
        raise BenchError(f"could not read wrk's report for {server}:\n{output}")
    non_2xx = _NON_2XX.search(output)
    errors = _SOCKET_ERRORS.search(output)
    latency = _LATENCY.search(output)
    return WrkRun(
        server=server,
        round=round_,
        requests_per_s=float(rate[1]),
        requests=int(total[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
        if errors
        else {},
        latency_avg=latency[1] if latency else None,
        output=output,
    )


@dataclass(frozen=True, slots=True)
class WrkSettings:
    """The load every server gets, and where wrk runs."""

    threads: int
    connections: int
    duration_s: int
    warmup_s: int
    prefix: tuple[str, ...]

    def command(self, wrk: str, script: Path, url: str, duration_s: int) -> list[str]:
        """The wrk command line for one run."""
        return [
            *self.prefix,
            wrk,
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{duration_s}s",
            "--timeout",
            f"{WRK_TIMEOUT_S}s",
            "-s",
            str(script),
            url,
        ]


def run_wrk(
    wrk: str, settings: WrkSettings, script: Path, server: Server, duration_s: int, round_: int
) -> WrkRun:
    """One bounded wrk run against `server`; checks the server is still up afterwards."""
    command = settings.command(wrk, script, server.url, duration_s)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(command)}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {' '.join(command)}\n{done.stderr}")
    assert server.process is not None
    if server.process.poll() is not None:
        raise BenchError(f"{server.name} died during the run\n{tail(server)}")
    return parse_wrk(server.name, round_, done.stdout)


# ---- the benchmark -------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """One scenario's verdict, from each server's best clean run."""

    scenario: Scenario
    bare: WrkRun | None
    execwatch: WrkRun | None
    runs: dict[str, list[WrkRun]]
    """Every measured run of each server, in order."""
    failures: list[str]

    def rate(self, run: WrkRun | None) -> float | None:
        """The rate the target compares (events/s or requests/s) of `run`."""
        if run is None:
            return None
        if self.scenario.unit == "events/s":
            return run.requests_per_s * self.scenario.events_per_request
        return run.requests_per_s

    @property
    def ratio(self) -> float | None:
        """execwatch's rate over the bare server's."""
        bare, ours = self.rate(self.bare), self.rate(self.execwatch)
        if bare is None or ours is None or bare <= 0:
            return None
        return ours / bare

    @property
    def verdict(self) -> str:
        """PASS, FAIL (target missed) or ERROR (no clean measurement)."""
        if self.failures or self.ratio is None:
            return "ERROR"
        return "PASS" if self.ratio >= self.scenario.target else "FAIL"


def best(runs: Sequence[WrkRun]) -> WrkRun | None:
    """The fastest run without errors."""
    clean = [run for run in runs if run.ok]
    return max(clean, key=lambda run: run.requests_per_s) if clean else None


def measure(
    scenario: Scenario,
    servers: Sequence[Server],
    wrk: str,
    settings: WrkSettings,
    rounds: int,
    work_dir: Path,
) -> Outcome:
    """Warm both servers up, then alternate them for `rounds` rounds; keep each one's best."""
    script = work_dir / f"{scenario.name.replace(' ', '-')}.lua"
    script.write_text(lua_script(scenario.body))
    for server in servers:
        check_answer(server, scenario)
        if settings.warmup_s > 0:
            run_wrk(wrk, settings, script, server, settings.warmup_s, 0)
    runs: dict[str, list[WrkRun]] = {server.name: [] for server in servers}
    failures: list[str] = []
    for round_ in range(1, rounds + 1):
        for server in servers:
            run = run_wrk(wrk, settings, script, server, settings.duration_s, round_)
            runs[server.name].append(run)
            note = "" if run.ok else f"  non-2xx {run.non_2xx}, socket errors {run.socket_errors}"
            print(
                f"  {scenario.name:<14} round {round_}  {server.name:<9} "
                f"{run.requests_per_s:>10,.0f} req/s  latency {run.latency_avg}{note}",
                flush=True,
            )
            if not run.ok:
                failures.append(
                    f"{server.name} round {round_}: {run.non_2xx} non-2xx responses, "
                    f"socket errors {run.socket_errors}"
                )
    return Outcome(
        scenario, best(runs.get("bare", [])), best(runs.get("execwatch", [])), runs, failures
    )


def table(outcomes: Sequence[Outcome]) -> str:
    """The verdicts as an aligned text table."""
    header = ("scenario", "unit", "bare", "execwatch", "ratio", "target", "result")
    rows = [header]
    for outcome in outcomes:
        bare, ours, ratio = (
            outcome.rate(outcome.bare),
            outcome.rate(outcome.execwatch),
            outcome.ratio,
        )
        rows.append(
            (
                outcome.scenario.name,
                outcome.scenario.unit,
                "-" if bare is None else f"{bare:,.0f}",
                "-" if ours is None else f"{ours:,.0f}",
                "-" if ratio is None else f"{ratio:.3f}x",
                f">= {outcome.scenario.target}x",
                outcome.verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def run_json(run: WrkRun) -> dict[str, Any]:
    """One run for the JSON file (without wrk's raw report)."""
    data = dataclasses.asdict(run)
    data.pop("output")
    return data


def results_json(
    outcomes: Sequence[Outcome],
    settings: WrkSettings,
    rounds: int,
    info: dict[str, Any],
    started: datetime.datetime,
    command: list[str],
    server_prefix: Sequence[str],
) -> dict[str, Any]:
    """Everything the run measured, with what it ran on and how."""
    return {
        "benchmark": "ingest",
        "timestamp": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": info,
        "wrk": {
            "threads": settings.threads,
            "connections": settings.connections,
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "rounds": rounds,
            "timeout_s": WRK_TIMEOUT_S,
            "pinning": {"servers": shown(server_prefix), "wrk": shown(settings.prefix)},
        },
        "scenarios": [
            {
                "name": outcome.scenario.name,
                "events_per_request": outcome.scenario.events_per_request,
                "body_bytes": len(outcome.scenario.body),
                "unit": outcome.scenario.unit,
                "bare_rate": outcome.rate(outcome.bare),
                "execwatch_rate": outcome.rate(outcome.execwatch),
                "bare_requests_per_s": outcome.bare.requests_per_s if outcome.bare else None,
                "execwatch_requests_per_s": (
                    outcome.execwatch.requests_per_s if outcome.execwatch else None
                ),
                "ratio": outcome.ratio,
                "target": outcome.scenario.target,
                "result": outcome.verdict,
                "failures": outcome.failures,
                "runs": {
                    name: [run_json(run) for run in runs] for name, runs in outcome.runs.items()
                },
            }
            for outcome in outcomes
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: 0 when it measured (targets met or not), 1 when it could not."""
    parser = argparse.ArgumentParser(
        description="Benchmark execwatch's POST /v1/events against a bare aiohttp handler."
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (10)")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (16)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (2)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per server (2)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.rounds < 1:
        parser.error("--duration, --connections, --threads and --rounds must be >= 1")
    if args.connections < args.threads:
        parser.error("--connections must be >= --threads (wrk needs a connection per thread)")

    started = datetime.datetime.now(datetime.UTC)
    try:
        wrk = ensure_wrk()
    except BenchError as exc:
        print(f"ingest benchmark: {exc}", file=sys.stderr)
        return 1
    server_prefix, wrk_prefix = pinning()
    settings = WrkSettings(
        args.threads, args.connections, args.duration, args.warmup, tuple(wrk_prefix)
    )
    execwatch_bin = Path(sys.executable).with_name("execwatch")
    bare_command = [sys.executable, str(BENCH_DIR / "bare_server.py"), "--listen", "{listen}"]
    execwatch_command = [str(execwatch_bin), "serve", "--database", ":memory:"]
    servers = [
        Server("bare", [*server_prefix, *bare_command]),
        Server("execwatch", [*server_prefix, *execwatch_command, "--listen", "{listen}"]),
    ]
    if not execwatch_bin.exists():
        print(f"ingest benchmark: {execwatch_bin} not found; install the project", file=sys.stderr)
        return 1
    info = machine_info(wrk)
    pin_text = (
        f"servers on CPU {server_prefix[-1]}, wrk on CPU {wrk_prefix[-1]}"
        if server_prefix
        else "not pinned"
    )
    print(
        f"ingest benchmark: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
        f"{args.rounds} rounds, best of each; {pin_text}; "
        f"{info['cpu_model']} x{info['nproc']}, Python {info['python']}, "
        f"aiohttp {info['aiohttp']}",
        flush=True,
    )

    outcomes: list[Outcome] = []
    try:
        with tempfile.TemporaryDirectory(prefix="execwatch-bench-") as tmp:
            work_dir = Path(tmp)
            with running(servers, work_dir):
                for scenario in scenarios():
                    outcomes.append(
                        measure(scenario, servers, wrk, settings, args.rounds, work_dir)
                    )
    except BenchError as exc:
        print(f"ingest benchmark failed: {exc}", file=sys.stderr)
        return 1

    print()
    print(table(outcomes))
    command = [
        ".venv/bin/python",
        "bench/ingest.py",
        f"--duration={args.duration}",
        f"--connections={args.connections}",
        f"--threads={args.threads}",
        f"--rounds={args.rounds}",
        f"--warmup={args.warmup}",
    ]
    data = results_json(outcomes, settings, args.rounds, info, started, command, server_prefix)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults written to {args.json}")

    failures = [failure for outcome in outcomes for failure in outcome.failures]
    if failures:
        print("\nruns with error responses (the benchmark is void):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
