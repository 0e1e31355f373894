"""`execwatch demo`: a daemon on a temporary SQLite file, and a fleet written with the
SDK in which executions die, hang, stall, leak memory and trip a breaker.

The daemon is a real `execwatch serve` subprocess. The fleet reports through
`monitor.client`, from threads of this process and from child processes (the one
that dies by SIGKILL, the one that leaks memory until the daemon terminates it).
What execwatch detects arrives over its own live stream (`GET /v1/stream`) and is
shown as it happens: a live view on a terminal, one line per detection otherwise.
At the end, a summary says what was detected and where to look next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.client import Client
from monitor.errors import BreakerOpen, ExecutionCancelled

MIB = 1024 * 1024
PR_SET_PDEATHSIG = 1
LEAK_LIMIT_BYTES = 160 * MIB
CONFIG = f"""
# execwatch demo: limits short enough to see every detector within seconds.
[defaults]
heartbeat_timeout_s = 3
[agents.sleeper]                # dies silently (SIGKILL): no final event
heartbeat_timeout_s = 2
[agents.queue-stuck]            # never leaves its queue
start_timeout_s = 3
[agents.hanger]                 # runs, beats, never finishes
run_timeout_s = 5
[agents.long-haul]              # makes progress, but for too long in all
timeout_s = 7
[agents.looper]                 # beats, but makes no progress
stall_timeout_s = 4
[agents.leaker]                 # a child process that leaks memory
memory_limit_bytes = {LEAK_LIMIT_BYTES}
memory_hold_s = 1
memory_policy = "terminate"
terminate_grace_s = 2
[breaker]
minimum_calls = 4
window_size = 10
wait_in_open_s = 20
[detectors]
memory_sample_interval_s = 0.5
[stream]
keepalive_s = 1                 # the demo's stream reader notices a silent daemon soon
"""
EXPECTED = {
    "death": "sleeper died silently (no heartbeat for 2 s)",
    "start_timeout": "queue-stuck never started (start_timeout_s = 3)",
    "run_timeout": "hanger ran past run_timeout_s = 5",
    "total_timeout": "long-haul ran past timeout_s = 7",
    "stalled": "looper kept beating without progress (stall_timeout_s = 4)",
    "memory_exceeded": f"leaker went over {LEAK_LIMIT_BYTES // MIB} MiB",
    "terminated": "the daemon terminated the leaking process (SIGTERM)",
    "task_cancelled": "hanger's asyncio task was cancelled by the daemon's directive",
    "circuit_open": "flaky failed until its breaker opened",
}
"""What the demo must show, by detection."""
LISTENING = re.compile(r"execwatch listening on (http://[\w.:\[\]-]+)")


@dataclass
class Detection:
    kind: str
    agent: str
    execution_id: str | None
    detail: str
    at: float


@dataclass
class Seen:
    """What the demo saw: detections from the stream, and its fleet's own outcomes."""

    announce: Callable[[Detection], None] = lambda detection: None
    detections: list[Detection] = field(default_factory=list)
    refused: int = 0
    runs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.monotonic)

    def add(self, detection: Detection) -> None:
        with self.lock:
            self.detections.append(detection)
        self.announce(detection)

    def kinds(self) -> set[str]:
        with self.lock:
            return {d.kind for d in self.detections}


# ---- the daemon ----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the demo dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def daemon(workdir: Path, listen: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `execwatch serve` on a temporary SQLite file; yields its URL and process."""
    config = workdir / "execwatch.toml"
    config.write_text(CONFIG)
    log_path, err_path = workdir / "execwatch.log", workdir / "execwatch.stderr"
    # Apart: the "listening on" line must not interleave with the log lines.
    with open(log_path, "wb") as log, open(err_path, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "serve", "--config", str(config),
             "--database", str(workdir / "execwatch.db"), "--listen", listen],
            stdout=log, stderr=err,
            env={**os.environ, "EXECWATCH_LOG_FORMAT": "json"},
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - started before any thread of ours
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            url = None
            while url is None:
                match = LISTENING.search(err_path.read_text(errors="replace"))
                if match:
                    url = match[1]
                elif process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the daemon did not start:\n"
                        + err_path.read_text(errors="replace")
                        + log_path.read_text(errors="replace")
                    )
                else:
                    time.sleep(0.05)
            yield url, process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def free_listen() -> str:
    """127.0.0.1:9478 when it is free, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 9478))
            return "127.0.0.1:9478"
        except OSError:
            return "127.0.0.1:0"


# ---- what execwatch detects, from its live stream -----------------------------------------


def follow(url: str, seen: Seen, stop: threading.Event) -> None:
    """Read GET /v1/stream and keep the detections; reconnect with Last-Event-ID."""
    last_id: str | None = None
    host, port = url.removeprefix("http://").rsplit(":", 1)
    while not stop.is_set():
        conn = http.client.HTTPConnection(host, int(port), timeout=5.0)  # keep-alives: 1 s
        try:
            conn.request("GET", "/v1/stream", headers={"Last-Event-ID": last_id} if last_id else {})
            response = conn.getresponse()
            fields: dict[str, str] = {}
            while not stop.is_set():
                raw = response.fp.readline()  # a timeout (no keep-alive for 5 s) reconnects
                if not raw:
                    break
                line = raw.decode().rstrip("\n")
                if line:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                    continue
                if "id" in fields:
                    last_id = fields["id"]
                if "data" in fields:
                    detection = detected(fields.get("event", ""), json.loads(fields["data"]))
                    if detection is not None:
                        seen.add(detection)
                fields = {}
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(0.2)
        finally:
            conn.close()


def detected(event: str, data: dict[str, Any]) -> Detection | None:
    """A stream event as a detection, or None for ordinary traffic."""
    now = time.time()
    if event == "transition" and data.get("reason"):
        reason = str(data["reason"])
        kind = "death" if reason == "heartbeat" else reason
        if data.get("revived"):
            return None
        lag = (data.get("detected_at") or now) - data["at"]
        return Detection(kind, data["agent"], data["execution_id"],
                         f"{data['from']} -> {data['to']} ({reason}, {lag * 1000:.0f} ms after "
                         "its deadline)", now)  # fmt: skip
    if event == "finding" and data.get("raised"):
        return Detection(data["finding"], data["agent"], data["execution_id"], data["detail"], now)
    if event == "breaker" and data.get("to") == "open":
        return Detection("circuit_open", data["agent"], None,
                         f"breaker {data['from']} -> open, failure rate "
                         f"{data['failure_rate']:.0%}", now)  # fmt: skip
    return None


# ---- the fleet ------------------------------------------------------------------------------


class Fleet:
    """The simulated agents, each on its own thread (and two in child processes)."""

    def __init__(self, url: str, seen: Seen, stop: threading.Event) -> None:
        self.url = url
        self.seen = seen
        self.stop = stop
        self.client = Client(url)
        self.threads: list[threading.Thread] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.closed = False

    def start(self) -> None:
        for name in ("healthy_triage", "healthy_summarize", "waves", "flaky"):
            thread = threading.Thread(target=getattr(self, name), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self, flush_s: float = 2.0) -> None:
        """Stop every agent (2 s for all of them at most), then send what is left."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()
        deadline = time.monotonic() + 2.0
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.client.close(flush_s)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the demo is over; False when it is."""
        return not self.stop.wait(seconds)

    def _healthy(self, agent: str, phases: tuple[str, ...]) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(ExecutionCancelled, BreakerOpen):
                with self.client.track(agent, run_timeout_s=30) as run:
                    for phase in phases:
                        run.phase(phase)
                        for _ in range(3):
                            if not self._sleep(random.uniform(0.1, 0.4)):
                                return
                            run.progress()
                self.seen.runs += 1

    def healthy_triage(self) -> None:
        self._healthy("triage", ("thinking", "tool_executing", "responding"))

    def healthy_summarize(self) -> None:
        self._healthy("summarize", ("reading", "writing"))

    def flaky(self) -> None:
        """Fails every time: its breaker opens, and later runs are refused up front."""
        while not self.stop.is_set():
            try:
                with self.client.track("flaky") as run:
                    run.phase("calling_upstream")
                    self._sleep(0.3)
                    raise ConnectionError("upstream answered 503")
            except ConnectionError:
                self.seen.runs += 1
            except BreakerOpen as refused:
                self.seen.refused += 1
                self._sleep(min(refused.retry_after_s, 5.0))
                continue
            self.client.flush(2.0)  # each outcome counts before the next run asks
            self._sleep(0.2)

    def waves(self) -> None:
        """Every 30 s, one of each kind of trouble."""
        while not self.stop.is_set():
            troubles = [self.sleeper, self.queue_stuck, self.hanger, self.long_haul,
                        self.looper, self.leaker]  # fmt: skip
            for trouble in troubles:
                thread = threading.Thread(target=trouble, name=trouble.__name__, daemon=True)
                thread.start()
                self.threads.append(thread)
            if not self._sleep(30):
                return

    def sleeper(self) -> None:
        """A worker process that is SIGKILLed mid-run: it never says anything again."""
        self.children.append(_child("sleeper", self.url))

    def leaker(self) -> None:
        """A worker process whose memory grows until the daemon terminates it."""
        child = _child("leaker", self.url)
        self.children.append(child)
        code = child.wait()
        # SIGKILL only counts before the demo's own clean-up, which kills what is left.
        if code == -signal.SIGTERM or (code == -signal.SIGKILL and not self.stop.is_set()):
            signame = signal.Signals(-code).name
            self.seen.add(Detection("terminated", "leaker", None,
                                    f"process {child.pid} ended by {signame} from execwatch",
                                    time.time()))  # fmt: skip

    def queue_stuck(self) -> None:
        execution_id = f"queue-stuck-{os.urandom(4).hex()}"
        self.client.state(execution_id, "queued", agent="queue-stuck", kind="job")

    def hanger(self) -> None:
        """An asyncio agent that awaits forever: the daemon's cancel directive ends it."""

        async def hang() -> None:
            run = self.client.track("hanger")
            try:
                async with run:
                    run.phase("waiting_on_tool")
                    while not self.stop.is_set():  # hangs, as far as the daemon can tell
                        await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                if run.cancel_reason is not None:
                    self.seen.add(Detection("task_cancelled", "hanger", run.execution_id,
                                            f"asyncio task cancelled: {run.cancel_reason}",
                                            time.time()))  # fmt: skip

        asyncio.run(hang())

    def long_haul(self) -> None:
        with contextlib.suppress(ExecutionCancelled), self.client.track("long-haul") as run:
            while self._sleep(0.5):
                run.progress()

    def looper(self) -> None:
        with contextlib.suppress(ExecutionCancelled), self.client.track("looper") as run:
            run.phase("retrying")
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline and self._sleep(0.5):
                run.progress(1)  # "progress" that never moves
            run.phase("gave_up_retrying")


def _child(role: str, url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", f"from monitor.demo import child; child({role!r}, {url!r})"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def child(role: str, url: str) -> None:
    """The body of a child process of the fleet; it ends with the demo, whatever happens."""
    parent = os.getppid()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    client = Client(url)
    if role == "sleeper":
        with client.track("sleeper", pid=os.getpid()) as run:
            for _ in range(4):
                run.progress()
                time.sleep(0.25)
            client.flush(2.0)
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no final event, no flush
    elif role == "leaker":
        hog: list[bytes] = []
        with client.track("leaker", pid=os.getpid()) as run:
            run.phase("loading_everything")
            deadline = time.monotonic() + 30  # never outlive the demo, whatever happens
            while time.monotonic() < deadline:
                if len(hog) * 8 * MIB < 2 * LEAK_LIMIT_BYTES:
                    hog.append(b"x" * (8 * MIB))  # written, so really resident
                run.progress()
                time.sleep(0.1)


# ---- showing it -----------------------------------------------------------------------------


def agents_table(url: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/v1/agents", timeout=2) as response:
            return list(json.load(response)["agents"])
    except (OSError, ValueError, KeyError):
        return []


def live_view(url: str, seen: Seen, duration_s: float) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    table = Table(title=f"execwatch demo: {url}", expand=True)
    for column in ("agent", "live", "completed", "failed", "timeout", "dead", "cancelled",
                   "breaker"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("agent", "breaker") else "right")
    for row in agents_table(url):
        counts = row["executions"]
        state = row["breaker"]["state"]
        style = {"open": "bold red", "half_open": "yellow"}.get(state, "green")
        table.add_row(row["agent"], str(row["live"]), str(counts["completed"]),
                      str(counts["failed"]), str(counts["timeout"]), str(counts["dead"]),
                      str(counts["cancelled"]), f"[{style}]{state}[/]")  # fmt: skip
    with seen.lock:
        recent = seen.detections[-12:]
    lines = [f"[bold]{d.kind:16}[/] {d.agent:12} {d.execution_id or '':32} {d.detail}"
             for d in recent] or ["(nothing detected yet)"]  # fmt: skip
    elapsed = time.monotonic() - seen.started
    found = seen.kinds()
    checklist = "  ".join(f"[green]✓ {k}[/]" if k in found else f"[dim]· {k}[/]" for k in EXPECTED)
    return Group(
        table,
        Panel("\n".join(lines), title="detections (from GET /v1/stream)"),
        Panel(checklist, title=f"{elapsed:.0f}s of {duration_s:.0f}s"),
    )


def summary(url: str, seen: Seen, workdir: Path, keep: bool) -> tuple[str, bool]:
    found = seen.kinds()
    command = shutil.which("execwatch") or str(Path(sys.executable).parent / "execwatch")
    serve_again = (
        f"{command} serve --database {workdir / 'execwatch.db'} "
        f"--config {workdir / 'execwatch.toml'}"
        if keep
        else "(run the demo with --keep to keep its SQLite file and serve it)"
    )
    lines = ["", "execwatch demo: what was detected", ""]
    for kind, what in EXPECTED.items():
        hits = [d for d in seen.detections if d.kind == kind]
        mark = "✓" if hits else "✗"
        lines.append(f"  {mark} {kind:16} x{len(hits):<3} {what}")
        if hits:
            lines.append(f"        e.g. {hits[0].execution_id or hits[0].agent}: {hits[0].detail}")
    others = sorted({d.kind for d in seen.detections} - set(EXPECTED))
    if others:
        lines.append(f"  also: {', '.join(others)}")
    lines += [
        "",
        f"  {seen.runs} runs reported; {seen.refused} refused up front by the open breaker",
        "",
        "The daemon stopped with the demo. To serve what it recorded:",
        f"  {serve_again}",
        "Where it was (`serve` listens on 127.0.0.1:9478 unless given --listen):",
        f"  API          {url}/v1/executions  /v1/agents  /v1/findings  /openapi.json",
        f"  live stream  curl -N {url}/v1/stream",
        f"  metrics      {url}/metrics",
    ]
    repo = Path(__file__).resolve().parents[1] / "dashboards"
    if repo.is_dir():
        grafana = repo / "grafana"
        lines.append(f"  dashboards   {grafana} (provisioning in {grafana / 'provisioning'})")
        lines.append(f"  alert rules  {repo / 'prometheus'}")
    if keep:
        lines.append(f"  daemon log   {workdir / 'execwatch.log'}")
    missing = [k for k in EXPECTED if k not in found]
    if missing:
        lines += ["", f"Not seen within the run: {', '.join(missing)}; try a longer --duration."]
    return "\n".join(lines), not missing


def run(duration_s: float, listen: str | None, keep: bool, live: bool | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="execwatch-demo-"))
    stop = threading.Event()
    interactive = sys.stdout.isatty() if live is None else live

    def announce(detection: Detection) -> None:
        if not interactive:
            print(f"  detected {detection.kind:16} {detection.agent:12} "
                  f"{detection.execution_id or '':30} {detection.detail}", flush=True)  # fmt: skip

    seen = Seen(announce)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM, SIGHUP: clean up as after Ctrl-C

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    try:
        with daemon(workdir, listen or free_listen()) as (url, process):
            print(f"execwatch demo: daemon at {url} (SQLite file {workdir / 'execwatch.db'}); "
                  f"a fleet runs for {duration_s:.0f}s", flush=True)  # fmt: skip

            follower = threading.Thread(target=follow, args=(url, seen, stop), name="stream",
                                        daemon=True)  # fmt: skip
            follower.start()
            fleet = Fleet(url, seen, stop)
            fleet.start()
            try:
                deadline = time.monotonic() + duration_s
                if interactive:
                    from rich.live import Live

                    with Live(live_view(url, seen, duration_s), refresh_per_second=4) as screen:
                        while time.monotonic() < deadline and process.poll() is None:
                            time.sleep(0.5)
                            screen.update(live_view(url, seen, duration_s))
                else:
                    while time.monotonic() < deadline and process.poll() is None:
                        time.sleep(0.2)
            except KeyboardInterrupt:
                stop.set()
                fleet.close(flush_s=0.0)  # the daemon is going too: send nothing more
                raise
            finally:
                stop.set()
                fleet.close()  # a no-op when already closed
                follower.join(timeout=3)
            if process.poll() is not None:
                log = (workdir / "execwatch.log").read_text(errors="replace")
                print(f"execwatch demo: the daemon exited with {process.returncode} before the "
                      f"end; its log ends with:\n{log[-2000:]}", file=sys.stderr)  # fmt: skip
                return 1
            text, complete = summary(url, seen, workdir, keep)
            print(text, flush=True)
            return 0 if complete else 1
    except KeyboardInterrupt:
        stop.set()
        print("\nexecwatch demo: interrupted", file=sys.stderr)
        return 130
    finally:
        if not keep:
            for path in sorted(workdir.iterdir(), reverse=True):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                workdir.rmdir()


def main(args: argparse.Namespace) -> int:
    return run(args.duration, args.listen, args.keep, args.live)
