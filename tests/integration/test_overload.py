"""Overload: bounded work in flight, 503 with Retry-After beyond it, counted, and recovery."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from monitor.server.keys import INGESTOR
from monitor.testing import GatedStore, heartbeat, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import get, post
from tests.integration.test_daemon import Daemon
from tests.integration.test_metrics import scrape


async def test_a_request_over_the_in_flight_limit_is_shed_and_the_daemon_recovers(
    make_client: ClientFactory,
) -> None:
    """Two requests wait on a slow store; a third gets 503 + Retry-After, applies nothing,
    and is counted. Once the store catches up, the next request is accepted."""
    store = GatedStore()
    client = await make_client({"max_ingest_in_flight": 2}, store=store)
    waiting = [
        asyncio.create_task(client.post("/v1/events", json=state_event(f"w{i}", "running",
                                                                        agent="a")))
        for i in range(2)
    ]  # fmt: skip
    while store.waiting < 2:
        await asyncio.sleep(0.01)

    response = await client.post("/v1/events", json=state_event("shed", "running", agent="a"))
    body = await response.json()
    assert (503, "1") == (response.status, response.headers["Retry-After"])
    assert "max_ingest_in_flight" in body["error"]
    assert "nothing in this request was applied" in body["error"]
    await get(client, "/v1/executions/shed", 404)
    cancel = await client.post("/v1/executions/w0/cancel")  # waits on a commit too: shed
    assert (503, "1") == (cancel.status, cancel.headers["Retry-After"])
    text = await scrape(client)
    assert 'execwatch_requests_shed_total{reason="ingest_in_flight"} 2.0' in text
    assert "execwatch_ingest_in_flight 2.0" in text

    store.open()
    assert [202, 202] == [r.status for r in await asyncio.gather(*waiting)]
    assert 0 == client.app[INGESTOR].stats.in_flight
    await post(client, state_event("shed", "running", agent="a"))  # the retry
    assert "running" == (await get(client, "/v1/executions/shed"))["state"]


def post_batch(url: str, body: list[dict[str, Any]]) -> tuple[int, str | None, Any]:
    request = urllib.request.Request(
        url + "/v1/events", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, None, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After"), json.load(exc)


def test_a_real_daemon_under_a_burst_sheds_loudly_and_loses_nothing(tmp_path: Path) -> None:
    """Forty clients at once, each with a batch of 2,000 events, against a durable daemon
    that takes two at a time: every answer is 202 or 503 with Retry-After; every event
    of a 202 is there, none of a 503; the shed count matches; then it serves again."""
    config = tmp_path / "execwatch.toml"
    config.write_text("max_ingest_in_flight = 2\n")
    daemon = Daemon("--database", str(tmp_path / "execwatch.db"), "--config", str(config))
    try:
        answers: dict[int, tuple[int, str | None, Any]] = {}

        def client(n: int) -> None:
            batch = [heartbeat(f"c{n}-{i}", agent="burst") for i in range(2000)]
            answers[n] = post_batch(daemon.url, batch)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

        statuses = sorted({status for status, _, _ in answers.values()})
        assert 40 == len(answers)
        assert set(statuses) <= {202, 503}, statuses
        shed = [n for n, (status, _, _) in answers.items() if status == 503]
        assert shed, "the burst never hit the limit"
        assert {"1"} == {answers[n][1] for n in shed}
        accepted = [n for n, (status, _, _) in answers.items() if status == 202]
        assert all(answers[n][2]["accepted"] == 2000 for n in accepted)

        _, agents = daemon.request("GET", "/v1/agents")
        burst = {a["agent"]: a for a in agents["agents"]}["burst"]
        # Every event of a 202 is there, and none of a 503.
        assert 2000 * len(accepted) == burst["live"], burst
        metrics = urllib.request.urlopen(daemon.url + "/metrics", timeout=10).read().decode()
        assert f'execwatch_requests_shed_total{{reason="ingest_in_flight"}} {len(shed)}.0' in (
            metrics
        )
        status, _, answer = post_batch(daemon.url, [heartbeat("after", agent="burst")])
        assert (202, 1) == (status, answer["accepted"])
    finally:
        daemon.stop()
