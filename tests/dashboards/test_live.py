"""A real execwatch and a real Prometheus on loopback: every dashboard query returns data,
and the dead-execution and open-breaker alerts reach `firing`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.testing import heartbeat, state_event
from tests.dashboards.test_dashboards import BOARDS, ROOT, load, panels
from tests.integration.test_daemon import Daemon

CONFIG = """
[defaults]
heartbeat_timeout_s = 1.0
memory_hold_s = 0.2
[agents.hog]
memory_limit_bytes = 1000
[breaker]
minimum_calls = 2
[detectors]
interval_s = 0.02
"""
VARIABLES = {
    'agent="$agent"': 'agent="triage"',  # the drill-down picks one agent, matched exactly
    "$job": "execwatch",
    "$instance": ".+",
    "$agent": ".+",
    "$__rate_interval": "20s",
}
DEADLINE_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: `make test` installs Debian's prometheus package")
        pytest.skip("prometheus is not installed (make test installs it)")
    return found


@pytest.fixture
def stack(tmp_path: Path, prometheus_binary: str) -> Iterator[tuple[Daemon, str]]:
    """execwatch, and Prometheus scraping it every second with the rules loaded."""
    config = tmp_path / "execwatch.toml"
    config.write_text(CONFIG)
    daemon = Daemon("--config", str(config))
    target = daemon.url.removeprefix("http://")
    rules = []
    for name in ("execwatch_rules.yml", "execwatch_alerts.yml"):
        text = (ROOT / "prometheus" / name).read_text()
        copy = tmp_path / name
        copy.write_text(re.sub(r"\bfor: \d+m\b", "for: 1s", text))  # the test copy: no waiting
        rules.append(str(copy))
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: {json.dumps(rules)}\n"
        "scrape_configs:\n  - job_name: execwatch\n"
        f"    static_configs:\n      - targets: [{json.dumps(target)}]\n"
    )
    prometheus = subprocess.Popen(
        [prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("prometheus did not become ready")
        # Traffic starts once execwatch has been scraped, as it would in production: a
        # counter first scraped already raised shows no increase.
        query = urllib.parse.urlencode({"query": 'up{job="execwatch"} == 1'})
        while time.monotonic() < end and not get(f"{url}/api/v1/query?{query}")["data"]["result"]:
            time.sleep(0.2)
        yield daemon, url
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        daemon.stop()


def drive(daemon: Daemon) -> None:
    """A small fleet through every condition the dashboards and alerts show."""
    send = daemon.request
    send("POST", "/v1/events", [
        state_event("ok-1", "running", agent="triage", progress=1),
        state_event("silent", "running", agent="triage"),
        state_event("late", "queued", agent="triage", start_timeout_s=0.3),
        state_event("slow", "running", agent="triage", run_timeout_s=0.3),
        state_event("whole", "running", agent="triage", timeout_s=0.4),
        state_event("loop", "running", agent="triage", stall_timeout_s=0.3, progress=1,
                    heartbeat_timeout_s=30),
        state_event("hog", "running", agent="hog", rss_bytes=5000, heartbeat_timeout_s=30),
        *[state_event(f"f{i}", "failed", agent="flaky", error="boom") for i in range(12)],
        state_event("refused", "queued", agent="flaky"),
        *[state_event("ok-1", "bogus") for _ in range(20)],  # a client in another vocabulary
    ])  # fmt: skip
    for _ in range(20):  # 2 s: keep the living alive, let the others die and time out
        send("POST", "/v1/events", [heartbeat(i, progress=1) for i in ("ok-1", "loop", "slow")]
             + [heartbeat("hog", rss_bytes=5000)])  # fmt: skip
        time.sleep(0.1)
    send("POST", "/v1/events", [heartbeat("silent"), state_event("ok-1", "completed")])  # revive


EXPECTED = {
    "ExecwatchExecutionDead", "ExecwatchExecutionTimedOut", "ExecwatchExecutionNeverStarted",
    "ExecwatchExecutionStalled", "ExecwatchMemoryExceeded", "ExecwatchCircuitBreakerOpen",
    "ExecwatchHighFailureRatio", "ExecwatchEventsRejected",
}  # fmt: skip
"""Every alert on a condition the fleet goes through: a typo in a rule fails here."""
SILENT = {"ExecwatchDown", "ExecwatchAbsent", "ExecwatchDetectorNotTicking"}


def test_every_dashboard_query_returns_data_and_alerts_fire(stack: tuple[Daemon, str]) -> None:
    """Valid PromQL with data behind it for every panel; every condition's alert firing and
    the meta alerts silent, with the default breaker (which flaps open / half open)."""
    daemon, url = stack
    drive(daemon)
    exprs = [
        (path.name, panel["title"], target["expr"])
        for path in BOARDS
        for panel in panels(load(path))
        for target in panel["targets"]
    ]
    firing: set[str] = set()
    empty: list[str] = []
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        daemon.request(
            "POST", "/v1/events", heartbeat("ok-2", agent="triage")
        )  # keep scraping live
        empty = []
        for board, title, template in exprs:
            expr = template
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            query = urllib.parse.urlencode({"query": expr})
            answer = get(f"{url}/api/v1/query?{query}")
            assert "success" == answer["status"], (board, title, answer)
            if not answer["data"]["result"]:
                empty.append(f"{board} / {title}: {expr}")
        alerts = get(f"{url}/api/v1/alerts")["data"]["alerts"]
        firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        if not empty and EXPECTED <= firing:
            break
        time.sleep(1)
    assert [] == empty
    assert set() == EXPECTED - firing
    assert set() == SILENT & firing
