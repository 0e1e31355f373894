"""GET /v1/stream: order, tenant scope, resume after a disconnect, reset, keep-alive, a
stalled consumer dropped while ingestion goes on, and a clean end at shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from monitor.server.keys import DETECTORS, INGESTOR, REGISTRY, STREAM
from monitor.server.scheduler import ProcessWatch, _tick
from monitor.store import Changes
from monitor.store.memory import MemoryStore
from monitor.testing import FakeClock, RecordingSink, heartbeat, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import Client, FlakyStore, post
from tests.integration.test_daemon import Daemon
from tests.integration.test_detectors_api import tick

READ_TIMEOUT_S = 10.0
"""How long a test waits for an event that must come (a hang fails, it does not time)."""


@dataclass
class Event:
    event: str
    id: int | None
    data: dict[str, Any] = field(default_factory=dict)


class Reader:
    """Parses a text/event-stream body: events, and the comments seen between them."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []
        self.retry: int | None = None

    async def next(self) -> Event:
        fields: dict[str, str] = {}
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), READ_TIMEOUT_S)
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\n")
            if line == "":
                if "event" in fields or "data" in fields:
                    event_id = int(fields["id"]) if "id" in fields else None
                    return Event(fields.get("event", "message"), event_id,
                                 json.loads(fields.get("data", "{}")))  # fmt: skip
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, text = line.partition(":")
            if name == "retry":
                self.retry = int(text.strip())
            else:
                fields[name] = text.removeprefix(" ")

    async def comment(self) -> str:
        """The next comment line (events before it are skipped)."""
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), READ_TIMEOUT_S)
            if not raw:
                raise EOFError("the stream ended")
            if raw.startswith(b":"):
                return raw[1:].decode().strip()

    async def take(self, count: int) -> list[Event]:
        return [await self.next() for _ in range(count)]


async def open_stream(
    client: Client, query: str = "", headers: dict[str, str] | None = None
) -> Reader:
    response = await client.get(f"/v1/stream{query}", headers=headers or {})
    assert 200 == response.status, await response.text()
    assert response.content_type == "text/event-stream"
    assert "no-cache" == response.headers["Cache-Control"]
    return Reader(response)


def run(execution_id: str, *states: str, **fields: Any) -> list[dict[str, Any]]:
    """An execution's state events, the first registering it."""
    first, *rest = states
    return [state_event(execution_id, first, agent="a", **fields),
            *(state_event(execution_id, s, **fields) for s in rest)]  # fmt: skip


async def test_events_come_in_commit_order_with_increasing_ids(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Transitions, findings and breaker changes arrive in the order the sinks saw them
    (commit order), each with a larger id than the last."""
    sink = RecordingSink()
    client = await make_client(
        {"breaker": {"minimum_calls": 2}, "defaults": {"heartbeat_timeout_s": 5}}, sinks=[sink]
    )
    reader = await open_stream(client)
    for i in range(20):
        await post(client, run(f"r{i}", "queued", "starting", "running"))
    await post(client, run("f1", "running", "failed") + run("f2", "running", "failed"))
    await tick(client, clock, 6)  # 20 deaths, as one sweep
    expected = [
        (type(r).__name__, getattr(r, "execution_id", None), getattr(r, "new", None))
        for r in sink.records
    ]
    got = await reader.take(len(expected))
    names = {"Transition": "transition", "FindingChange": "finding", "BreakerTransition": "breaker"}
    assert [(names[k], i, s and str(s)) for k, i, s in expected] == [
        (e.event, e.data.get("execution_id"), e.data.get("to")) for e in got
    ]
    ids = [e.id for e in got]
    assert sorted(set(ids)) == ids  # strictly increasing
    assert 2000 == reader.retry
    assert {"transition", "breaker"} == {e.event for e in got}
    assert "open" == next(e for e in got if e.event == "breaker").data["to"]
    assert "heartbeat" == got[-1].data["reason"]


async def test_a_token_streams_only_its_tenant(make_client: ClientFactory) -> None:
    """Scoped like every list: one tenant for its token; all, or the one asked, for '*'."""
    tokens = {"token-of-team-a": "team-a", "token-of-all": "*"}
    client = await make_client({"auth": {"tokens": tokens}})
    team_a = {"Authorization": "Bearer token-of-team-a"}
    every = {"Authorization": "Bearer token-of-all"}
    own = await open_stream(client, headers=team_a)
    everything = await open_stream(client, headers=every)
    only_b = await open_stream(client, "?tenant=team-b", every)
    for i, tenant in enumerate(("team-b", "team-a", "team-b", "team-b")):
        await post(client, state_event(f"r{i}", "queued", agent="a", tenant=tenant), headers=every)
    assert ["team-a"] == [e.data["tenant"] for e in await own.take(1)]
    assert ["team-b", "team-a", "team-b", "team-b"] == [
        e.data["tenant"] for e in await everything.take(4)
    ]
    assert ["team-b"] * 3 == [e.data["tenant"] for e in await only_b.take(3)]
    forbidden = await client.get("/v1/stream?tenant=team-b", headers=team_a)
    assert 403 == forbidden.status


async def test_a_reconnect_with_last_event_id_misses_nothing(
    make_client: ClientFactory,
) -> None:
    """Disconnect, let events happen, reconnect with Last-Event-ID: the missed events
    first, in order, then the live ones; ?last_event_id= works the same."""
    client = await make_client()
    first = await open_stream(client)
    await post(client, run("r1", "queued", "running"))
    seen = await first.take(2)
    first.response.close()
    await post(client, run("r2", "queued", "running") + run("r1", "completed"))

    again = await open_stream(client, headers={"Last-Event-ID": str(seen[-1].id)})
    missed = await again.take(3)
    assert [("r2", "pending"), ("r2", "running"), ("r1", "completed")] == [
        (e.data["execution_id"], e.data["to"]) for e in missed
    ]
    assert all(e.id is not None and seen[-1].id is not None and e.id > seen[-1].id for e in missed)
    await post(client, run("r3", "queued"))
    assert "r3" == (await again.take(1))[0].data["execution_id"]

    by_query = await open_stream(client, f"?last_event_id={seen[0].id}")
    assert ["r1", "r2", "r2", "r1", "r3"] == [
        e.data["execution_id"] for e in await by_query.take(5)
    ]


async def test_a_client_too_far_behind_is_told_to_reset(make_client: ClientFactory) -> None:
    """The ring holds 5 events: 10 later, a resume cannot be served, so the first event is
    `reset`, whose id is where to go on from; then the live events follow."""
    client = await make_client({"stream": {"ring_size": 5}})
    reader = await open_stream(client)
    await post(client, run("r0", "queued"))
    last = (await reader.take(1))[0]
    reader.response.close()
    await post(client, [state_event(f"r{i}", "queued", agent="a") for i in range(1, 11)])

    behind = await open_stream(client, headers={"Last-Event-ID": str(last.id)})
    reset = await behind.next()
    assert "reset" == reset.event
    assert "ring_size" in reset.data["reason"]
    assert last.id == reset.data["last_event_id"]
    await post(client, run("r11", "queued"))
    live = await behind.next()
    assert ("transition", "r11") == (live.event, live.data["execution_id"])
    assert reset.id is not None
    assert live.id == reset.id + 1
    assert 1 == client.app[INGESTOR].stats.stream.resets

    resumed = await open_stream(client, headers={"Last-Event-ID": str(reset.id)})
    assert "r11" == (await resumed.next()).data["execution_id"]  # resets can be resumed from


async def test_an_id_from_before_a_restart_gets_a_reset(make_client: ClientFactory) -> None:
    """Ids start at the start time in microseconds: an older id is from another run."""
    client = await make_client()
    before_start = client.app[STREAM].first_id - 1000
    reader = await open_stream(client, headers={"Last-Event-ID": str(before_start)})
    reset = await reader.next()
    assert "reset" == reset.event
    assert "restarted" in reset.data["reason"]
    bad = await client.get("/v1/stream", headers={"Last-Event-ID": "yesterday"})
    assert 400 == bad.status
    assert "Last-Event-ID" in (await bad.json())["error"]


async def test_a_quiet_tenant_resumes_however_busy_the_others_were(
    make_client: ClientFactory,
) -> None:
    """team-b overruns the ring; team-a, which had nothing in what left it, resumes whole."""
    tokens = {"token-of-team-a": "team-a", "token-of-all": "*"}
    client = await make_client({"auth": {"tokens": tokens}, "stream": {"ring_size": 5}})
    team_a = {"Authorization": "Bearer token-of-team-a"}
    every = {"Authorization": "Bearer token-of-all"}
    reader = await open_stream(client, headers=team_a)
    await post(client, state_event("a1", "queued", agent="a"), headers=team_a)
    last = (await reader.take(1))[0]
    reader.response.close()
    busy = [state_event(f"b{i}", "queued", agent="b", tenant="team-b") for i in range(10)]
    await post(client, busy, headers=every)
    await post(client, state_event("a2", "queued", agent="a"), headers=team_a)
    resumed = await open_stream(client, headers={**team_a, "Last-Event-ID": str(last.id)})
    event = await resumed.next()
    assert ("transition", "a2") == (event.event, event.data["execution_id"])


async def test_an_idle_stream_sends_keep_alive_comments(make_client: ClientFactory) -> None:
    client = await make_client({"stream": {"keepalive_s": 0.05}})
    """Proxies close connections that carry nothing for a while: a comment goes out."""
    reader = await open_stream(client)
    await post(client, run("r", "queued"))
    await reader.next()
    await post(client, heartbeat("r"))  # heartbeats are no stream events
    assert "keep-alive" == await reader.comment()


async def test_streams_are_capped_and_the_one_over_is_shed(make_client: ClientFactory) -> None:
    client = await make_client({"stream": {"max_consumers": 1}})
    await open_stream(client)
    over = await client.get("/v1/stream")
    assert (503, "5") == (over.status, over.headers["Retry-After"])
    assert 1 == client.app[INGESTOR].stats.shed["stream_consumers"]


async def test_a_stalled_consumer_is_dropped_while_ingestion_goes_on(
    make_client: ClientFactory,
) -> None:
    """One consumer stops reading: its queue fills, it is dropped and counted, and every
    ingest request is answered 202 meanwhile; a healthy consumer gets every event, in order."""
    client = await make_client({"stream": {"queue_size": 50}})
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(stalled, (client.server.host, client.server.port))
    await loop.sock_sendall(stalled, b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    healthy = await open_stream(client)
    while client.app[INGESTOR].stats.stream.consumers < 2:
        await asyncio.sleep(0.01)

    phase = "p" * 128  # big frames fill the stalled socket's buffers sooner
    total = 0
    stats = client.app[INGESTOR].stats.stream
    received: list[Event] = []
    batches = 0
    while stats.dropped == 0:
        assert batches < 200, "the stalled consumer was never dropped"
        batch = [state_event(f"r{batches}-{i}", "queued", agent="a", phase=phase)
                 for i in range(500)]  # fmt: skip
        answer = await post(client, batch)
        assert 500 == answer["accepted"]
        total += 500
        batches += 1
        received += await healthy.take(500)  # the healthy one keeps up
    assert 1 == stats.dropped
    assert 1 == stats.consumers
    assert total == len(received)
    ids = [e.id for e in received]
    assert sorted(set(ids)) == ids
    stalled.close()


def test_a_real_daemon_ends_its_streams_cleanly_on_sigterm() -> None:
    """SIGTERM: an open stream ends with the end of its chunked body (not a reset), and the
    daemon exits 0 without waiting out its drain timeout on it."""
    daemon = Daemon()
    try:
        request = urllib.request.Request(daemon.url + "/v1/stream")
        with urllib.request.urlopen(request, timeout=30) as stream:
            assert b"retry: 2000\n" == stream.readline()
            event = {"type": "state", "execution_id": "r", "agent": "a", "state": "queued"}
            assert 202 == daemon.request("POST", "/v1/events", event)[0]
            lines = [stream.readline()]
            while not lines[-1].startswith(b"data:"):
                lines.append(stream.readline())
            assert b"event: transition\n" in lines
            assert b'"execution_id":"r"' in lines[-1]
            daemon.process.send_signal(15)
            assert b"\n" == stream.read()  # the event's blank line, then a clean end
        assert 0 == daemon.process.wait(timeout=30)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()


def test_stream_events_are_json_lines_a_browser_can_read() -> None:
    """orjson never writes a newline: each event's data is one `data:` line."""
    from monitor.server.stream import frame

    text = frame("transition", 7, {"detail": "line one\nline two"}).decode()
    assert text.startswith("id: 7\nevent: transition\ndata: ")
    assert 1 == text.count("data:")
    assert {"detail": "line one\nline two"} == orjson.loads(text.split("data: ")[1])


async def test_a_first_connection_learns_where_to_resume_before_any_event(
    make_client: ClientFactory,
) -> None:
    """The opening carries an id (an `id:` line alone dispatches nothing): a client that
    loses its first connection before any event still resumes without a gap."""
    client = await make_client()
    reader = await open_stream(client)
    opening = await reader.response.content.readuntil(b"\n\n")  # retry:
    opening += await reader.response.content.readuntil(b"\n\n")
    start = int(opening.split(b"id: ")[1].split(b"\n")[0])
    reader.response.close()
    await post(client, run("missed", "queued"))
    again = await open_stream(client, headers={"Last-Event-ID": str(start)})
    assert "missed" == (await again.next()).data["execution_id"]


async def test_a_tenants_ids_say_nothing_of_the_other_tenants(make_client: ClientFactory) -> None:
    """A one-tenant stream counts in its tenant's own sequence: no gaps where the others'
    events went, and a reset names its own newest id, not the daemon's."""
    tokens = {"token-of-team-a": "team-a", "token-of-all": "*"}
    client = await make_client({"auth": {"tokens": tokens}})
    team_a = {"Authorization": "Bearer token-of-team-a"}
    every = {"Authorization": "Bearer token-of-all"}
    own = await open_stream(client, headers=team_a)
    for i in range(4):
        await post(
            client, state_event(f"b{i}", "queued", agent="x", tenant="team-b"), headers=every
        )
        await post(client, state_event(f"a{i}", "queued", agent="x"), headers=team_a)
    ids = [e.id for e in await own.take(4)]
    assert ids[0] is not None
    assert [ids[0] + i for i in range(4)] == ids
    probe = await open_stream(client, headers={**team_a, "Last-Event-ID": "0"})
    assert ids[-1] == (await probe.next()).id  # the reset: team-a's newest, not the count


async def test_side_records_come_where_they_happened(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """In one batch: progress clears x's stall, x fails (its breaker opens), y registers.
    The stream shows that order, not the transitions first and the side records after."""
    client = await make_client(
        {"defaults": {"stall_timeout_s": 5}, "breaker": {"minimum_calls": 1}}
    )
    await post(client, state_event("x", "running", agent="a", progress=1))
    clock.advance(3)
    await post(client, heartbeat("x", progress=1))
    await tick(client, clock, 2.5)  # x is stalled
    reader = await open_stream(client)
    await post(client, [heartbeat("x", progress=2), state_event("x", "failed"),
                        state_event("y", "queued", agent="a")])  # fmt: skip
    got = [(e.event, e.data.get("execution_id"), e.data.get("to") or e.data.get("raised"))
           for e in await reader.take(4)]  # fmt: skip
    assert [("finding", "x", False), ("transition", "x", "failed"),
            ("breaker", None, "open"), ("transition", "y", "pending")] == got  # fmt: skip


async def test_the_stream_shows_only_what_was_committed(make_client: ClientFactory) -> None:
    """A failed commit (503, not acknowledged) publishes nothing; the next commit that
    succeeds publishes what it owed first, in order."""
    store = FlakyStore(failures=1)
    client = await make_client(store=store)
    reader = await open_stream(client)
    await reader.response.content.readuntil(b"\n\n")
    await post(client, run("lost-for-now", "queued"), status=503)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.next(), 0.2)
    await post(client, run("next", "queued"))
    assert ["lost-for-now", "next"] == [e.data["execution_id"] for e in await reader.take(2)]


async def test_a_store_down_too_long_ends_in_a_reset(make_client: ClientFactory) -> None:
    """More records owed than the ring holds: the oldest are lost to the stream, so every
    open stream is told to re-list rather than left with a silent gap."""
    store = FlakyStore(failures=1)
    client = await make_client({"stream": {"ring_size": 3}}, store=store)
    reader = await open_stream(client)
    await post(client, [state_event(f"r{i}", "queued", agent="a") for i in range(5)], status=503)
    await post(client, run("after", "queued"))
    first = await reader.next()
    assert ("reset", None) == (first.event, first.data["last_event_id"])
    assert "store" in first.data["reason"]


async def test_a_reset_after_a_gap_comes_before_what_follows_it(make_client: ClientFactory) -> None:
    """Three failed commits owe more than the ring holds: the reset that tells of the gap
    has an id no later than the events published right after it."""
    store = FlakyStore(failures=0)
    client = await make_client({"stream": {"ring_size": 4}}, store=store)
    reader = await open_stream(client)
    await post(client, run("warm", "queued"))
    await reader.next()
    store.failures = 3
    for i in range(3):
        await post(client, [state_event(f"f{i}a", "queued", agent="a"),
                            state_event(f"f{i}b", "queued", agent="a")], status=503)  # fmt: skip
    await post(client, run("ok", "queued"))
    got = await reader.take(6)
    assert "reset" == got[0].event
    ids = [e.id for e in got]
    assert sorted(ids, key=lambda i: i or 0) == ids
    assert len(set(ids)) == len(ids)


class HeldStore(MemoryStore):
    """Each commit waits for the test to let it through, or to fail it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[asyncio.Future[None]] = []
        self.holding = True

    async def commit(self, changes: Changes) -> None:
        if self.holding:
            gate = asyncio.get_running_loop().create_future()
            self.held.append(gate)
            await gate
        await super().commit(changes)


async def test_owed_records_wait_for_a_commit_that_carries_them(
    make_client: ClientFactory,
) -> None:
    """A fails while B, taken before A gave its changes back, succeeds: A is not in the
    store yet, so the stream must not show it; the next commit carries and publishes it."""
    store = HeldStore()
    client = await make_client(store=store)
    reader = await open_stream(client)
    await reader.response.content.readuntil(b"\n\n")

    async def until(count: int) -> None:
        while len(store.held) < count:
            await asyncio.sleep(0.01)

    first = asyncio.create_task(client.post("/v1/events", json=run("A", "queued")))
    await until(1)
    second = asyncio.create_task(client.post("/v1/events", json=run("B", "queued")))
    await until(2)
    store.held[0].set_exception(OSError("disk full"))
    assert 503 == (await first).status
    store.held[1].set_result(None)
    assert 202 == (await second).status
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.next(), 0.3)
    store.holding = False
    await post(client, run("C", "queued"))
    assert ["A", "B", "C"] == [e.data["execution_id"] for e in await reader.take(3)]


async def test_a_sweep_waits_for_a_request_between_its_slices(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """A request holds the write lock while it yields between slices of its batch: a
    detector sweep that wakes then waits, so its records follow the request's."""
    client = await make_client({"defaults": {"heartbeat_timeout_s": 5}})
    await post(client, run("x", "running"))
    clock.advance(6)  # x's heartbeat deadline has passed
    ingestor, detectors = client.app[INGESTOR], client.app[DETECTORS]
    async with ingestor.write_lock:  # as a request does between two of its slices
        sweep = asyncio.create_task(_tick(detectors, ingestor, ProcessWatch(), clock(), clock))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not sweep.done()
        assert "running" == client.app[REGISTRY].get("default", "x").state  # type: ignore[union-attr]
    await sweep
    assert "dead" == client.app[REGISTRY].get("default", "x").state  # type: ignore[union-attr]


async def test_a_sweep_places_each_deadlines_side_records_with_it(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Two deaths in one sweep: each one's transition, the finding that ended with it and
    its breaker opening, in that order, before the next death."""
    client = await make_client({"defaults": {"heartbeat_timeout_s": 5, "stall_timeout_s": 2},
                                "breaker": {"minimum_calls": 1}})  # fmt: skip
    reader = await open_stream(client)
    await post(client, [state_event("x1", "running", agent="a", progress=1),
                        state_event("x2", "running", agent="b", progress=1)])  # fmt: skip
    clock.advance(1)
    await post(client, [heartbeat("x1", progress=1), heartbeat("x2", progress=1)])
    await tick(client, clock, 1.5)  # both stalled
    await tick(client, clock, 4)  # both dead
    got = [(e.event, e.data.get("execution_id") or e.data.get("agent"),
            e.data.get("to") or e.data.get("raised")) for e in await reader.take(10)]  # fmt: skip
    assert [
        ("transition", "x1", "running"), ("transition", "x2", "running"),
        ("finding", "x1", True), ("finding", "x2", True),
        ("transition", "x1", "dead"), ("finding", "x1", False), ("breaker", "a", "open"),
        ("transition", "x2", "dead"), ("finding", "x2", False), ("breaker", "b", "open"),
    ] == got  # fmt: skip


async def test_a_memory_finding_a_transition_clears_comes_after_it(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    client = await make_client({"defaults": {"memory_limit_bytes": 1000, "memory_hold_s": 1}})
    reader = await open_stream(client)
    await post(client, state_event("x", "running", agent="a", rss_bytes=900))
    await tick(client, clock, 2)  # memory_high raised
    await post(client, state_event("x", "running", phase="p2", rss_bytes=100))
    got = [(e.event, e.data.get("phase") or e.data.get("finding"), e.data.get("raised"))
           for e in await reader.take(4)]  # fmt: skip
    assert [("transition", None, None), ("finding", "memory_high", True),
            ("transition", "p2", None), ("finding", "memory_high", False)] == got  # fmt: skip
