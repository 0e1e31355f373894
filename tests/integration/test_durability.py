"""What a real daemon on the SQLite store keeps across `kill -9` and restarts."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from monitor.config import build_settings
from monitor.detectors.engine import Detectors
from monitor.registry import Registry
from monitor.server.ingest import Ingestor
from monitor.states import StateNames
from monitor.store.sqlite import SqliteStore
from monitor.testing import GatedStore, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import get, post
from tests.integration.test_daemon import Daemon

BATCH = 4
ROUNDS = 3


def names(k: int) -> list[str]:
    return [f"b{k}-{j}" for j in range(BATCH)]


def batch(k: int) -> list[dict[str, Any]]:
    """Batch k starts four executions and finishes the four of batch k-1: one request."""
    events = [
        {"type": "state", "execution_id": name, "agent": "a", "state": "running", "event_id": name}
        for name in names(k)
    ]
    if k:
        events += [
            {"type": "state", "execution_id": name, "state": "succeeded"} for name in names(k - 1)
        ]
    return events


def all_states(daemon: Daemon) -> dict[str, str]:
    states: dict[str, str] = {}
    cursor = ""
    while True:
        status, page = daemon.request("GET", f"/v1/executions?limit=1000{cursor}")
        assert 200 == status, page
        states.update({e["execution_id"]: e["state"] for e in page["executions"]})
        if page["next_cursor"] is None:
            return states
        cursor = f"&cursor={page['next_cursor']}"


class Writer(threading.Thread):
    """Posts batch after batch, each after the previous was answered, until the daemon dies."""

    def __init__(self, daemon: Daemon, first: int) -> None:
        super().__init__(daemon=True)
        self.target_daemon, self.next = daemon, first
        self.acknowledged: list[int] = []

    def run(self) -> None:
        while True:
            try:
                status, answer = self.target_daemon.request("POST", "/v1/events", batch(self.next))
            except OSError:
                return  # killed mid-request: batch self.next is unacknowledged
            assert 202 == status, answer
            assert [] == answer["rejected"]
            self.acknowledged.append(self.next)
            self.next += 1


def test_every_acknowledged_state_event_survives_kill_9(tmp_path: Path) -> None:
    """kill -9 in the middle of a stream, three times: every acknowledged batch is there,
    and the batch in flight is there whole or not at all."""
    database = str(tmp_path / "execwatch.db")
    rng = random.Random(7)
    first = 0
    for _ in range(ROUNDS):
        daemon = Daemon("--database", database)
        writer = Writer(daemon, first)
        writer.start()
        time.sleep(rng.uniform(0.3, 1.0))
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(timeout=10)
        writer.join(timeout=15)
        assert not writer.is_alive()
        assert writer.acknowledged, "no batch was acknowledged before the kill"

        restarted = Daemon("--database", database)
        try:
            states = all_states(restarted)
        finally:
            restarted.stop()
        in_flight = writer.next
        landed = names(in_flight)[0] in states
        for k in range(in_flight + (1 if landed else 0)):
            finished = k < in_flight - 1 or (k == in_flight - 1 and landed)
            expected = "completed" if finished else "running"  # succeeded is its alias
            assert dict.fromkeys(names(k), expected) == {
                name: states.get(name) for name in names(k)
            }, f"batch {k} (in flight: {in_flight})"
        assert in_flight + (1 if landed else 0) == len(states) // BATCH
        # Carry on as a client that retries would: resend the batch that was lost.
        first = in_flight + 1 if landed else in_flight


def test_a_restart_inside_the_heartbeat_timeout_kills_no_one_early(tmp_path: Path) -> None:
    """The daemon is down past an execution's heartbeat timeout: after the restart it is
    still running (fresh grace), and dead once the grace runs out with no heartbeat."""
    config = tmp_path / "execwatch.toml"
    config.write_text("[defaults]\nheartbeat_timeout_s = 3\n")
    args = ("--database", str(tmp_path / "execwatch.db"), "--config", str(config))
    first = Daemon(*args)
    status, _ = first.request(
        "POST", "/v1/events", {"type": "state", "execution_id": "r", "agent": "a",
                               "state": "running"},
    )  # fmt: skip
    assert 202 == status
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    time.sleep(3.5)  # down for longer than the heartbeat timeout

    second = Daemon(*args)
    try:
        restarted_at = time.time()
        time.sleep(0.5)
        status, ex = second.request("GET", "/v1/executions/r")
        assert (200, "running") == (status, ex["state"])
        deadline = time.monotonic() + 15
        while ex["state"] != "dead" and time.monotonic() < deadline:
            time.sleep(0.2)
            _, ex = second.request("GET", "/v1/executions/r")
        assert "dead" == ex["state"]
        assert ex["history"][-1]["detected_at"] >= restarted_at + 2.5  # not before the grace
    finally:
        second.stop()


def test_sigterm_checkpoints_the_heartbeats(tmp_path: Path) -> None:
    """Heartbeats are not written per event; SIGTERM writes the last checkpoint, so
    progress and seq come back after a clean restart."""
    args = ("--database", str(tmp_path / "execwatch.db"))
    first = Daemon(*args)
    first.request("POST", "/v1/events", {"type": "state", "execution_id": "r", "agent": "a",
                                         "state": "running"})  # fmt: skip
    for seq in range(1, 6):
        status, _ = first.request(
            "POST", "/v1/events",
            {"type": "heartbeat", "execution_id": "r", "seq": seq, "progress": seq * 10},
        )  # fmt: skip
        assert 202 == status
    assert 0 == first.stop()  # stop() fails if the daemon outlives its 30 s wait

    second = Daemon(*args)
    try:
        status, ex = second.request("GET", "/v1/executions/r")
    finally:
        second.stop()
    assert (200, "running", 50) == (status, ex["state"], ex["progress"])
    stale = {"type": "heartbeat", "execution_id": "r", "seq": 4}
    third = Daemon(*args)
    try:
        status, answer = third.request("POST", "/v1/events", stale)
    finally:
        third.stop()
    assert (409, "stale_seq") == (status, answer["rejected"][0]["reason"])


def test_sigterm_drains_a_request_in_flight_and_keeps_it(tmp_path: Path) -> None:
    """A big batch is being ingested when SIGTERM arrives: it is answered 202, the daemon
    exits 0, and every event of it is in the file after a restart."""
    args = ("--database", str(tmp_path / "execwatch.db"))
    daemon = Daemon(*args)
    batch = [
        {"type": "state", "execution_id": f"big-{i}", "agent": "a", "state": "running"}
        for i in range(10000)
    ]
    answer: list[tuple[int, Any]] = []
    poster = threading.Thread(target=lambda: answer.append(daemon.request("POST", "/v1/events",
                                                                            batch)))  # fmt: skip
    poster.start()
    time.sleep(0.15)  # the body is on its way or being applied
    daemon.process.send_signal(signal.SIGTERM)
    poster.join(timeout=30)
    assert 0 == daemon.process.wait(timeout=30)
    assert [202] == [status for status, _ in answer]
    assert 10000 == answer[0][1]["accepted"]

    restarted = Daemon(*args)
    try:
        states = all_states(restarted)
    finally:
        restarted.stop()
    assert 10000 == sum(1 for name in states if name.startswith("big-"))


async def test_a_request_is_acknowledged_only_once_its_own_changes_are_durable() -> None:
    """A big batch yields to the loop every 500 events. A commit that runs in that gap (the
    detector loop's, another request's) must not take half of the request's changes and
    leave the request to answer 202 before they are on disk."""
    settings = build_settings({})
    registry = Registry(settings)
    store = GatedStore()  # the disk is stuck until the test opens it
    ingestor = Ingestor(Detectors(registry, settings), store, StateNames(settings.aliases))
    batch = [{"type": "state", "execution_id": "x", "agent": "a", "state": "running"}]
    batch += [{"type": "heartbeat", "execution_id": "x"}] * 600
    answers: list[tuple[int, bool]] = []

    async def request() -> None:
        result = await ingestor.ingest(orjson.dumps(batch), "application/json", 1000.0)
        answers.append((result.status, ("default", "x") in store.snapshots))

    tasks = [asyncio.create_task(request()), asyncio.create_task(ingestor.commit())]
    await asyncio.sleep(0.05)
    assert [] == answers  # nothing is acknowledged while the store cannot commit
    store.open()
    await asyncio.gather(*tasks)
    assert [(202, True)] == answers


async def test_an_unreadable_row_is_skipped_not_a_crash_loop(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """One row that cannot be read (damaged, or an old format) is logged and skipped; the
    rest of the file is replayed and the daemon serves."""
    path = tmp_path / "x.db"
    client = await make_client(store=SqliteStore(path))
    await post(client, [state_event("good", "running", agent="a"),
                        state_event("bad", "running", agent="a")])  # fmt: skip
    await client.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE executions SET snapshot = ? WHERE execution_id = 'bad'",
                   (b'{"tenant": "default", "execution_id": "bad"}',))  # fmt: skip
        db.execute("INSERT INTO breakers VALUES ('default', 'x', '{\"state\": \"weird\"}')")
    db.close()

    restarted = await make_client(store=SqliteStore(path))
    assert ["good"] == [
        e["execution_id"] for e in (await get(restarted, "/v1/executions"))["executions"]
    ]
    assert "ready" == (await get(restarted, "/readyz"))["status"]
