"""Every detector against a real `execwatch serve` with sub-second limits, and the
`terminate` policy against real child processes. Real time: polls are bounded."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_daemon import Daemon

CONFIG = """
[defaults]
heartbeat_timeout_s = 0.6
memory_hold_s = 0.2
[agents.hog]
memory_limit_bytes = 1000
[breaker]
minimum_calls = 2
failure_rate_threshold = 0.5
wait_in_open_s = 1.0
permitted_calls_in_half_open = 1
[detectors]
interval_s = 0.02
memory_sample_interval_s = 0.1
"""
DEADLINE_S = 8.0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    config = tmp_path / "execwatch.toml"
    config.write_text(CONFIG)
    started = Daemon("--config", str(config))
    try:
        yield started
    finally:
        started.stop()


def wait_for(
    daemon: Daemon, what: str, check: Callable[[], bool], keepalive: list[dict[str, Any]]
) -> None:
    """Poll `check` while sending `keepalive` heartbeats, for DEADLINE_S at most."""
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        if keepalive:
            daemon.request("POST", "/v1/events", keepalive)
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never saw: {what}")


def execution(daemon: Daemon, execution_id: str) -> dict[str, Any]:
    status, body = daemon.request("GET", f"/v1/executions/{execution_id}")
    assert 200 == status, body
    result: dict[str, Any] = body
    return result


def ended_by(daemon: Daemon, execution_id: str, state: str, reason: str) -> bool:
    ex = execution(daemon, execution_id)
    return ex["state"] == state and ex["history"][-1]["reason"] == reason


def test_each_detector_fires_in_a_real_daemon(daemon: Daemon) -> None:
    """Each timeout reason, a death, a stall and its clearing, a memory finding, and a
    breaker going closed -> open -> half_open -> closed."""
    post = daemon.request
    post("POST", "/v1/events", [
        {"type": "state", "execution_id": "never", "agent": "w", "state": "queued",
         "start_timeout_s": 0.3},
        {"type": "state", "execution_id": "slow", "agent": "w", "state": "running",
         "run_timeout_s": 0.4},
        {"type": "state", "execution_id": "total", "agent": "w", "state": "queued",
         "timeout_s": 0.5},
        {"type": "state", "execution_id": "total", "state": "running"},
        {"type": "state", "execution_id": "silent", "agent": "w", "state": "running"},
        {"type": "state", "execution_id": "loop", "agent": "w", "state": "running",
         "stall_timeout_s": 0.3, "progress": 1},
        {"type": "state", "execution_id": "hog", "agent": "hog", "state": "running",
         "rss_bytes": 5000},
    ])  # fmt: skip
    alive = [
        {"type": "heartbeat", "execution_id": i, "progress": 1, **extra}
        for i, extra in (("slow", {}), ("total", {}), ("loop", {}), ("hog", {"rss_bytes": 5000}))
    ]
    wait_for(daemon, "start_timeout", lambda: ended_by(daemon, "never", "timeout",
                                                      "start_timeout"), alive)  # fmt: skip
    wait_for(daemon, "run_timeout", lambda: ended_by(daemon, "slow", "timeout", "run_timeout"),
             alive)  # fmt: skip
    wait_for(daemon, "total_timeout", lambda: ended_by(daemon, "total", "timeout",
                                                      "total_timeout"), alive)  # fmt: skip
    wait_for(daemon, "dead", lambda: ended_by(daemon, "silent", "dead", "heartbeat"), alive)
    wait_for(
        daemon,
        "stalled",
        lambda: any(f["kind"] == "stalled" for f in execution(daemon, "loop")["findings"]),
        alive,
    )
    wait_for(
        daemon,
        "memory_exceeded",
        lambda: any(f["kind"] == "memory_exceeded" for f in execution(daemon, "hog")["findings"]),
        alive,
    )
    post("POST", "/v1/events", {"type": "heartbeat", "execution_id": "loop", "progress": 2})
    assert [] == [f for f in execution(daemon, "loop")["findings"] if f["kind"] == "stalled"]
    _, findings = post("GET", "/v1/findings")
    assert [("hog", "memory_exceeded"), ("hog", "memory_high")] == sorted(
        (f["execution_id"], f["kind"]) for f in findings["findings"]
    )

    def breaker() -> str:
        state: str = post("GET", "/v1/breakers/flaky")[1]["state"]
        return state

    for i in range(2):
        post(
            "POST",
            "/v1/events",
            [
                {"type": "state", "execution_id": f"f{i}", "agent": "flaky", "state": "running"},
                {"type": "state", "execution_id": f"f{i}", "state": "failed", "error": "boom"},
            ],
        )
    assert "open" == breaker()
    wait_for(daemon, "half_open", lambda: breaker() == "half_open", [])
    post(
        "POST",
        "/v1/events",
        [
            {"type": "state", "execution_id": "trial", "agent": "flaky", "state": "running"},
            {"type": "state", "execution_id": "trial", "state": "completed"},
        ],
    )
    assert "closed" == breaker()


HOG = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ballast = bytearray(64 * 1024 * 1024)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
print("ready", flush=True)
time.sleep(60)
"""

TERMINATE_CONFIG = """
[agents.hog]
memory_limit_bytes = 33554432
memory_policy = "terminate"
memory_hold_s = 0.2
terminate_grace_s = 0.5
[detectors]
interval_s = 0.02
memory_sample_interval_s = 0.1
"""


@pytest.mark.parametrize(
    ("mode", "expected_signal"), [("comply", signal.SIGTERM), ("ignore", signal.SIGKILL)]
)
def test_a_process_over_its_limit_is_terminated_and_nothing_else(
    tmp_path: Path, mode: str, expected_signal: signal.Signals
) -> None:
    """SIGTERM first; SIGKILL after the grace if SIGTERM is ignored; a bystander survives."""
    config = tmp_path / "execwatch.toml"
    config.write_text(TERMINATE_CONFIG)
    hog = subprocess.Popen([sys.executable, "-c", HOG, mode], stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    daemon = Daemon("--config", str(config))
    try:
        assert hog.stdout is not None
        assert "ready" == hog.stdout.readline().strip()
        daemon.request("POST", "/v1/events", {
            "type": "state", "execution_id": "hog-1", "agent": "hog", "state": "running",
            "pid": hog.pid, "heartbeat_timeout_s": 60})  # fmt: skip
        returncode = hog.wait(timeout=DEADLINE_S)
        assert -expected_signal == returncode
        assert bystander.poll() is None
        ex = execution(daemon, "hog-1")
        assert ("failed", "memory_exceeded") == (ex["state"], ex["history"][-1]["reason"])
        assert ex["rss_bytes"] > 33554432
    finally:
        for process in (hog, bystander):
            if process.poll() is None:
                process.kill()
                process.wait()
        daemon.stop()
