"""The SDK against a real `execwatch serve` on a loopback port: no mocks of our code."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.client import AsyncClient, Client, current
from monitor.errors import BreakerOpen, ExecutionCancelled
from tests.integration.test_daemon import Daemon

CONFIG = """
[agents.fast]
heartbeat_timeout_s = 0.6
[agents.flaky]
run_timeout_s = 60
[breaker]
minimum_calls = 2
wait_in_open_s = 30
"""
WAIT_S = 10.0
"""How long a test waits for something that must happen (a hang fails; nothing is timed)."""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = tmp_path_factory.mktemp("client") / "execwatch.toml"
    config.write_text(CONFIG)
    started = Daemon("--config", str(config))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    made = Client(daemon.url)
    try:
        yield made
    finally:
        made.close()


def execution(daemon: Daemon, execution_id: str) -> dict[str, Any]:
    status, body = daemon.request("GET", f"/v1/executions/{execution_id}")
    assert 200 == status, body
    return dict(body)


def eventually(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def test_a_run_reports_its_phases_progress_and_completion(daemon: Daemon, client: Client) -> None:
    with client.track("reporter", run_timeout_s=60, attributes={"model": "m1"}) as run:
        assert current() is run
        run.phase("thinking")
        run.progress()
        run.progress(5)
    assert current() is None
    assert client.flush()
    ex = execution(daemon, run.execution_id)
    assert ("completed", "reporter", 5) == (ex["state"], ex["agent"], ex["progress"])
    assert 60 == ex["limits"]["run_timeout_s"]
    assert [("running", None), ("running", "thinking"), ("completed", None)] == [
        (h["to"], h.get("phase")) for h in ex["history"]
    ]
    assert 0 == client.stats.rejected


def test_an_exception_is_reported_failed_and_still_raised(daemon: Daemon, client: Client) -> None:
    with pytest.raises(ZeroDivisionError), client.track("crasher") as run:
        1 / 0  # noqa: B018
    assert client.flush()
    ex = execution(daemon, run.execution_id)
    assert "failed" == ex["state"]
    assert {"type": "ZeroDivisionError", "message": "division by zero"} == ex["error"]


def test_the_decorator_makes_a_run_per_call_sync_and_async(daemon: Daemon, client: Client) -> None:
    seen: list[str] = []

    @client.track("decorated")
    def work(x: int) -> int:
        run = current()
        assert run is not None
        seen.append(run.execution_id)
        return x * 2

    @client.track("decorated", kind="tool")
    async def awork() -> str:
        run = current()
        assert run is not None
        seen.append(run.execution_id)
        return "ok"

    assert (2, 4) == (work(1), work(2))
    assert "ok" == asyncio.run(awork())
    assert client.flush()
    assert 3 == len(set(seen))
    assert ["completed"] * 3 == [execution(daemon, i)["state"] for i in seen]
    assert "tool" == execution(daemon, seen[2])["kind"]


def test_background_heartbeats_keep_a_quiet_run_alive(daemon: Daemon, client: Client) -> None:
    """Agent `fast` has a 0.6 s heartbeat timeout in the daemon's config only: the SDK
    learns it after registering and beats every 0.2 s, so 2 s of silence is no death."""
    with client.track("fast") as run:
        time.sleep(2.0)
        assert "running" == execution(daemon, run.execution_id)["state"]
    assert client.flush()
    assert "completed" == execution(daemon, run.execution_id)["state"]
    assert abs(run.interval_s - 0.2) < 1e-9


def test_a_sync_run_past_its_timeout_is_stopped_at_its_next_progress(
    daemon: Daemon, client: Client
) -> None:
    def busy() -> None:
        with client.track("slowpoke", run_timeout_s=0.3) as run:
            ids.append(run.execution_id)
            while True:
                run.progress()
                time.sleep(0.05)

    ids: list[str] = []
    with pytest.raises(ExecutionCancelled) as stopped:
        busy()
    assert "run_timeout" == stopped.value.reason
    assert client.flush()
    assert "timeout" == execution(daemon, ids[0])["state"]  # final: no cancelled


def test_a_cancel_request_cancels_the_asyncio_task(daemon: Daemon) -> None:
    async def scenario() -> tuple[str, str]:
        async with AsyncClient(daemon.url) as client:
            started = asyncio.Event()
            ids: list[str] = []

            async def agent() -> None:
                async with client.track("cancellable", heartbeat_timeout_s=0.6) as run:
                    ids.append(run.execution_id)
                    started.set()
                    await asyncio.sleep(WAIT_S)

            task = asyncio.create_task(agent())
            await started.wait()
            await client.aflush()
            status, _ = await asyncio.to_thread(
                daemon.request, "POST", f"/v1/executions/{ids[0]}/cancel"
            )
            assert 202 == status
            with pytest.raises(asyncio.CancelledError):
                await task  # the next heartbeat's answer carries the directive
            await client.aflush()
            return ids[0], str(task.cancelled())

    execution_id, cancelled = asyncio.run(scenario())
    assert "True" == cancelled
    ex = execution(daemon, execution_id)
    assert ("cancelled", "cancel_requested") == (ex["state"], ex["error"])


def test_an_open_breaker_refuses_to_start_and_says_when_to_retry(
    daemon: Daemon, client: Client
) -> None:
    for _ in range(2):
        with pytest.raises(RuntimeError), client.track("flaky"):
            raise RuntimeError("upstream down")
    assert client.flush()
    with pytest.raises(BreakerOpen) as refused, client.track("flaky"):
        pytest.fail("a refused run must not start")
    assert ("flaky", "open") == (refused.value.agent, refused.value.state)
    assert 0 < refused.value.retry_after_s <= 30
    assert "retry in" in str(refused.value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_with_the_daemon_down_the_application_runs_on_and_catches_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No daemon: runs start, end and raise nothing; one warning; the buffer is bounded
    (oldest heartbeats dropped, counted). When a daemon comes up, what is kept arrives."""
    port = free_port()
    caplog.set_level(logging.WARNING, logger="execwatch.client")
    client = Client(f"http://127.0.0.1:{port}", max_buffer=50)
    try:
        with client.track("triage") as run:
            for _ in range(200):
                run.progress()
        eventually(lambda: client.stats.failed_posts >= 2, "a retry")
        assert client.stats.dropped >= 150
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert 1 == len(warnings), [r.getMessage() for r in warnings]
        assert "the application is not affected" in warnings[0].getMessage()

        daemon = Daemon("--listen", f"127.0.0.1:{port}")
        try:
            assert client.flush(WAIT_S)
            ex = execution(daemon, run.execution_id)
            assert ("completed", 200) == (ex["state"], ex["progress"])
        finally:
            daemon.stop()
    finally:
        client.close(0.5)


def test_a_token_places_runs_in_its_tenant(tmp_path: Path) -> None:
    config = tmp_path / "execwatch.toml"
    config.write_text('[auth.tokens]\n"token-of-team-a" = "team-a"\n"token-of-all" = "*"\n')
    daemon = Daemon("--config", str(config))
    try:
        with Client(daemon.url, token="token-of-team-a") as client:
            with client.track("triage") as run:
                pass
            assert client.flush()
        every = {"Authorization": "Bearer token-of-all"}
        status, ex = daemon.request(
            "GET", f"/v1/executions/{run.execution_id}?tenant=team-a", headers=every
        )
        assert (200, "team-a", "completed") == (status, ex["tenant"], ex["state"])
    finally:
        daemon.stop()


def test_the_sdk_imports_without_the_servers_dependencies() -> None:
    """An application installs nothing but execwatch's own package to report."""
    code = (
        "import sys\n"
        "for name in ('aiohttp', 'orjson', 'prometheus_client', 'opentelemetry', 'structlog',"
        " 'psutil'):\n"
        "    sys.modules[name] = None\n"
        "from monitor.client import Client\n"
        "Client('http://127.0.0.1:9').close(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_heartbeats_never_overtake_a_runs_own_events(daemon: Daemon, client: Client) -> None:
    """Seq numbers are given in queue order, under one lock: the background heartbeats
    (every 0.1 s here) and thousands of progress reports never produce a stale seq."""
    with client.track("busy", heartbeat_timeout_s=0.3) as run:
        for i in range(5000):
            run.progress(i)
            if i % 500 == 0:
                time.sleep(0.15)  # let background heartbeats interleave
    assert client.flush()
    assert 0 == client.stats.rejected
    assert ("completed", 4999) == (
        (ex := execution(daemon, run.execution_id))["state"],
        ex["progress"],
    )


def test_what_is_reported_before_exit_is_sent_at_exit(daemon: Daemon) -> None:
    """An application that ends without flushing still delivers its last events."""
    code = (
        "from monitor.client import Client\n"
        f"client = Client({daemon.url!r})\n"
        "with client.track('short-lived', execution_id='exits-at-once'):\n"
        "    pass\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert "completed" == execution(daemon, "exits-at-once")["state"]


def test_a_forked_child_reports_through_a_sender_of_its_own(daemon: Daemon) -> None:
    """A Client made before os.fork keeps working in the child (a worker pool)."""
    code = (
        "import os\n"
        "from monitor.client import Client\n"
        f"client = Client({daemon.url!r})\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    with client.track('forked', execution_id='from-the-child'):\n"
        "        pass\n"
        "    client.flush(10)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert "completed" == execution(daemon, "from-the-child")["state"]
