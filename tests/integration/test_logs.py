"""Logs: one line per transition, finding and breaker change, with the ids operators search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from typing import Any

import structlog

from monitor.testing import FakeClock, heartbeat, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import post
from tests.integration.test_daemon import EXECWATCH
from tests.integration.test_detectors_api import tick


async def test_every_record_is_one_line_with_its_ids(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Transitions, findings and breaker changes: event name, ids, level by trouble."""
    client = await make_client(
        {"defaults": {"heartbeat_timeout_s": 5, "stall_timeout_s": 2},
         "breaker": {"minimum_calls": 1}}
    )  # fmt: skip
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with structlog.testing.capture_logs() as logs:
        await post(client, [
            state_event("r", "running", agent="a", tenant="t1", traceparent=traceparent),
            state_event("r", "running", tenant="t1", phase="tool"),
        ])  # fmt: skip
        clock.advance(1)
        await post(client, heartbeat("r", tenant="t1"))
        await tick(client, clock, 1.5)  # stalled
        await tick(client, clock, 5)  # dead, and the breaker opens (one failure of one)
    records = [entry for entry in logs if entry["event"] != "store_replayed"]
    assert [
        ("execution_transitioned", "info", None, "running"),
        ("execution_transitioned", "info", "running", "running"),
        ("finding_raised", "warning", None, None),
        ("execution_transitioned", "warning", "running", "dead"),
        ("finding_cleared", "info", None, None),  # it ended, and its findings with it
        ("breaker_transitioned", "warning", "closed", "open"),
    ] == [(e["event"], e["log_level"], e.get("from"), e.get("to")) for e in records]
    first, dead = records[0], records[3]
    assert ("r", "t1", "a", "4bf92f3577b34da6a3ce929d0e0e4736") == (
        first["execution_id"],
        first["tenant"],
        first["agent"],
        first["trace_id"],
    )
    assert ("heartbeat", True) == (dead["reason"], dead["detection_lag_s"] >= 0)


def test_the_daemon_writes_json_lines_and_survives_a_closed_stdout() -> None:
    """Real serve: JSON on stdout with access lines; closing stdout does not stop it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECWATCH_")}
    process = subprocess.Popen(
        [*EXECWATCH, "serve", "--listen", "127.0.0.1:0", "--database", ":memory:"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        assert process.stdout is not None
        url = next(line.split()[-1] for line in process.stderr if "execwatch listening on" in line)

        def send(body: Any) -> int:
            request = urllib.request.Request(f"{url}/v1/events", data=json.dumps(body).encode())
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)

        assert 202 == send(state_event("r", "running", agent="a"))
        with urllib.request.urlopen(f"{url}/v1/agents", timeout=10) as response:
            assert 200 == response.status
        lines = []
        for line in process.stdout:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "http_request":
                break
        events = [entry["event"] for entry in lines]
        assert "execution_transitioned" in events
        access = lines[-1]
        assert ("GET", "/v1/agents", 200) == (access["method"], access["path"], access["status"])
        assert all({"timestamp", "level"} <= set(entry) for entry in lines)
        process.stdout.close()  # the reader went away (`execwatch serve | head`)
        assert 202 == send(state_event("r2", "running", agent="a"))
        assert 202 == send(state_event("r2", "failed"))
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_a_stdout_nobody_reads_never_stalls_the_daemon() -> None:
    """The pipe fills up; ingest, health and detection go on, and the drops are counted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECWATCH_")}
    process = subprocess.Popen(
        [*EXECWATCH, "serve", "--listen", "127.0.0.1:0", "--database", ":memory:"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        url = next(line.split()[-1] for line in process.stderr if "execwatch listening on" in line)
        for batch in range(200):  # ~20,000 lines (~6 MB): past the pipe and the 4 MiB queue
            events = []
            for i in range(50):
                eid = f"r{batch}-{i}"
                events += [state_event(eid, "running", agent="a"), state_event(eid, "failed")]
            request = urllib.request.Request(f"{url}/v1/events", data=json.dumps(events).encode())
            with urllib.request.urlopen(request, timeout=10) as response:
                assert 202 == response.status
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert 200 == response.status
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
        dropped = next(line for line in text.splitlines()
                       if line.startswith("execwatch_log_lines_dropped_total"))  # fmt: skip
        assert float(dropped.split()[-1]) > 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
