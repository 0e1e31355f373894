"""Logs: one line per transition, finding and breaker change, with the ids operators search."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import structlog

from monitor.testing import FakeClock, heartbeat, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import post
from tests.integration.test_daemon import Daemon
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
    # Its last heartbeat at +1 with a 5 s timeout: due at +6, seen by the tick at +7.5.
    assert ("heartbeat", 1.5) == (dead["reason"], dead["detection_lag_s"])


def test_the_daemon_writes_json_lines_and_survives_a_closed_stdout() -> None:
    """Real serve: JSON on stdout with access lines; closing stdout does not stop it."""
    daemon = Daemon(stdout=subprocess.PIPE)
    stdout = daemon.process.stdout
    try:
        assert stdout is not None
        assert (
            202 == daemon.request("POST", "/v1/events", state_event("r", "running", agent="a"))[0]
        )
        assert 200 == daemon.request("GET", "/v1/agents")[0]
        lines = []
        for line in stdout:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "http_request":
                break
        assert "execution_transitioned" in [entry["event"] for entry in lines]
        access = lines[-1]
        assert ("GET", "/v1/agents", 200) == (access["method"], access["path"], access["status"])
        assert all({"timestamp", "level"} <= set(entry) for entry in lines)
        stdout.close()  # the reader went away (`execwatch serve | head`)
        events = [state_event("r2", "running", agent="a"), state_event("r2", "failed")]
        assert 202 == daemon.request("POST", "/v1/events", events)[0]
        assert daemon.process.poll() is None
    finally:
        daemon.stop()


def test_successful_ingest_is_logged_only_at_debug() -> None:
    """Heartbeat batches and probes answer quietly at info; at debug each gets its line."""
    for level, expected in (("info", []), ("debug", ["/v1/events", "/healthz"])):
        daemon = Daemon(stdout=subprocess.PIPE, env={"EXECWATCH_LOG_LEVEL": level})
        try:
            assert (
                202
                == daemon.request("POST", "/v1/events", state_event("r", "running", agent="a"))[0]
            )
            assert 200 == daemon.request("GET", "/healthz")[0]
            assert 404 == daemon.request("GET", "/v1/executions/nobody")[0]  # always at info
        finally:
            daemon.stop()
        assert daemon.process.stdout is not None
        lines = [json.loads(line) for line in daemon.process.stdout]
        access = [(e["path"], e["level"]) for e in lines if e["event"] == "http_request"]
        assert [
            *((path, "debug") for path in expected),
            ("/v1/executions/nobody", "info"),
        ] == access, level


def test_a_stdout_nobody_reads_never_stalls_the_daemon() -> None:
    """The pipe fills up; ingest, health and detection go on, and the drops are counted."""
    daemon = Daemon(stdout=subprocess.PIPE)  # and never read
    try:
        for batch in range(200):  # ~20,000 lines (~6 MB): past the pipe and the 4 MiB queue
            events = []
            for i in range(50):
                eid = f"r{batch}-{i}"
                events += [state_event(eid, "running", agent="a"), state_event(eid, "failed")]
            assert 202 == daemon.request("POST", "/v1/events", events)[0]
        assert 200 == daemon.request("GET", "/healthz")[0]
        with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        dropped = next(line for line in text.splitlines()
                       if line.startswith("execwatch_log_lines_dropped_total"))  # fmt: skip
        assert float(dropped.split()[-1]) > 0
    finally:
        daemon.stop()
