"""The SDK against a real `execwatch serve` on a loopback port: no mocks of our code."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
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
    """Four threads switch every 10 us while their runs pause, resume and progress, and
    the background heartbeats go out every 0.1 s: no event is ever refused as stale."""

    def worker(n: int) -> None:
        with client.track("busy", heartbeat_timeout_s=0.3) as run:
            for i in range(300):
                run.progress(i)
                if i % 50 == 0:
                    run.pause()
                    run.resume(f"step-{i}")
                    time.sleep(0.12)  # let a background heartbeat go out

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert client.flush()
    assert 0 == client.stats.rejected


def test_one_value_json_cannot_carry_costs_only_its_own_event(
    daemon: Daemon, client: Client
) -> None:
    """A Decimal is sent as a number; an event that cannot be encoded at all is dropped
    alone (counted), never with the other runs' events of its batch."""
    circular: dict[str, object] = {}
    circular["self"] = circular
    with client.track("careless") as careless, client.track("careful") as careful:
        careless.progress(Decimal("0.5"))
        careless.progress(3, note=circular)
    assert client.flush()
    assert 0.5 <= execution(daemon, careless.execution_id)["progress"] <= 3
    assert "completed" == execution(daemon, careful.execution_id)["state"]
    assert 1 == client.stats.rejected


def test_sys_exit_0_is_a_completion_and_other_codes_a_failure(
    daemon: Daemon, client: Client
) -> None:
    outcomes = {}
    for code in (0, None, 3):
        with pytest.raises(SystemExit), client.track("exiting") as run:
            sys.exit(code)
        outcomes[code] = run.execution_id
    assert client.flush()
    assert ["completed", "completed", "failed"] == [
        execution(daemon, outcomes[code])["state"] for code in (0, None, 3)
    ]


def test_a_directive_after_an_async_run_ended_cancels_nothing(daemon: Daemon) -> None:
    """The directive is acted on in the run's loop only while the run is still active:
    the task, which has moved on to other work, is left alone."""

    async def scenario() -> bool:
        async with AsyncClient(daemon.url) as client:
            async with client.track("late") as run:
                pass
            run._cancel("run_timeout")  # as the sender thread would, a moment too late
            await asyncio.sleep(0.05)  # raises CancelledError if the task were cancelled
            return True

    assert asyncio.run(scenario())


def test_heartbeats_stop_once_the_daemon_ended_the_run(daemon: Daemon, client: Client) -> None:
    """After a directive a sync run may go on until its next check: it beats no more, so
    it is not refused again and again."""
    run = client.track("ended", run_timeout_s=0.3)
    with run:
        eventually(lambda: run.cancelled or run.progress(), "the directive")  # type: ignore[func-returns-value]
        rejected = client.stats.rejected
        time.sleep(0.5)  # three background heartbeats' worth
        assert rejected == client.stats.rejected
    assert client.flush()
    assert "timeout" == execution(daemon, run.execution_id)["state"]


def test_a_hung_daemon_costs_one_short_breaker_check(tmp_path: Path) -> None:
    """A daemon that accepts connections but answers nothing (SIGSTOP): the first run asks
    once, briefly, marks it down and starts; later runs do not ask again."""
    hung = Daemon()
    hung.process.send_signal(signal.SIGSTOP)
    client = Client(hung.url)
    try:
        with client.track("patient"):
            pass
        with client.track("patient"):
            pass
        assert 1 == client.stats.breaker_checks
        assert client._sender.down_since is not None
    finally:
        client.close(0.5)
        hung.process.send_signal(signal.SIGCONT)
        hung.stop()
    assert not client._sender.thread.is_alive()


def test_with_many_runs_and_no_daemon_the_buffer_stays_bounded() -> None:
    """Background heartbeats are built as batches leave, never queued: 500 quiet runs
    beating every 0.1 s with the daemon down leave only the application's own events."""
    client = Client(f"http://127.0.0.1:{free_port()}", max_buffer=100)
    runs = [client.track(f"quiet-{i % 10}", heartbeat_timeout_s=0.3, check_breaker=False)
            for i in range(500)]  # fmt: skip
    try:
        for run in runs:
            run.__enter__()
        time.sleep(1.0)
        assert len(client._sender.queue) <= 100
        assert 400 == client.stats.dropped  # 500 registrations into 100 places
    finally:
        client.close(0.2)
    assert not client._sender.thread.is_alive()


def test_a_multiprocessing_worker_delivers_its_events(daemon: Daemon, tmp_path: Path) -> None:
    """multiprocessing's children end with os._exit, which skips atexit: the client
    flushes from the finalizer multiprocessing runs before it."""
    code = (
        "import multiprocessing as mp\n"
        "from monitor.client import Client\n"
        f"client = Client({daemon.url!r})\n"
        "def work(n):\n"
        "    with client.track('pooled', execution_id=f'worker-{n}'):\n"
        "        pass\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('fork')\n"
        "    procs = [ctx.Process(target=work, args=(n,)) for n in range(3)]\n"
        "    [p.start() for p in procs]\n"
        "    [p.join() for p in procs]\n"
    )
    script = tmp_path / "pool.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    assert ["completed"] * 3 == [execution(daemon, f"worker-{n}")["state"] for n in range(3)]


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
