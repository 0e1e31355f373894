"""The HTTP API through aiohttp's test client: every status code of DESIGN.md's wire format."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from monitor.events import FIELDS
from monitor.server.app import ROUTES
from monitor.server.keys import INGESTOR
from monitor.server.openapi import EVENT, document
from monitor.store import Changes
from monitor.store.memory import MemoryStore
from monitor.testing import FailingSink, FakeClock, RecordingSink, heartbeat, state_event
from tests.conftest import ClientFactory

Client = TestClient[Any, Any]


async def post(client: Client, body: Any, status: int = 202, **kwargs: Any) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await client.post("/v1/events", data=data, **kwargs)
    payload: dict[str, Any] = await response.json()
    assert status == response.status, payload
    return payload


async def get(client: Client, path: str, status: int = 200) -> Any:
    response = await client.get(path)
    payload = await response.json()
    assert status == response.status, payload
    return payload


async def test_a_good_event_is_accepted_and_readable_at_once(make_client: ClientFactory) -> None:
    """202, then a following read sees the event applied."""
    client = await make_client()
    answer = await post(client, state_event("run-42", "running", agent="triage", phase="thinking"))
    assert {"accepted": 1, "duplicates": 0, "rejected": [], "directives": []} == answer
    execution = await get(client, "/v1/executions/run-42")
    assert ("running", "thinking", "triage") == (
        execution["state"],
        execution["phase"],
        execution["agent"],
    )
    assert [
        {
            "from": None,
            "to": "running",
            "at": execution["created_at"],
            "reason": None,
            "phase": "thinking",
        }
    ] == execution["history"]


async def test_a_batch_applies_good_events_and_rejects_bad_ones_by_index(
    make_client: ClientFactory,
) -> None:
    """Partial acceptance: 202 with per-index 404/409/422 rejections."""
    client = await make_client()
    answer = await post(
        client,
        [
            state_event("r1", "running", agent="a"),
            heartbeat("ghost"),
            state_event("r1", "starting"),
            state_event("r1", "exploded"),
            heartbeat("r1", progress=5),
        ],
    )
    assert (2, 0) == (answer["accepted"], answer["duplicates"])
    assert [
        (1, 404, "unknown_execution"),
        (2, 409, "invalid_transition"),
        (3, 422, "unknown_state"),
    ] == [(r["index"], r["status"], r["reason"]) for r in answer["rejected"]]
    assert 5 == (await get(client, "/v1/executions/r1"))["progress"]


async def test_ndjson_is_accepted_with_bad_lines_rejected(make_client: ClientFactory) -> None:
    """NDJSON lines are events; a line that is not JSON is a 422 at its index."""
    client = await make_client()
    body = b"\n".join(
        [
            orjson.dumps(state_event("r1", "running", agent="a")),
            b"{oops",
            orjson.dumps(state_event("r1", "SUCCESS")),
        ]
    )
    answer = await post(client, body, headers={"Content-Type": "application/x-ndjson"})
    assert 2 == answer["accepted"]
    assert [(1, 422, "invalid_json")] == [
        (r["index"], r["status"], r["reason"]) for r in answer["rejected"]
    ]
    assert "completed" == (await get(client, "/v1/executions/r1"))["state"]


@pytest.mark.parametrize(
    ("first", "second", "status", "reason"),
    [
        (
            state_event("r", "running", agent="a"),
            state_event("r", "pending"),
            409,
            "invalid_transition",
        ),
        (state_event("r", "completed", agent="a"), heartbeat("r"), 409, "final_state"),
        (state_event("r", "running", agent="a", seq=3), heartbeat("r", seq=2), 409, "stale_seq"),
        (None, heartbeat("r"), 404, "unknown_execution"),
        (None, state_event("r", "exploded", agent="a"), 422, "unknown_state"),
        (None, heartbeat("r", agent="a", colour=1), 422, "unknown_field"),
    ],
)
async def test_a_single_rejected_event_answers_with_its_own_status(
    make_client: ClientFactory, first: Any, second: Any, status: int, reason: str
) -> None:
    """One bare object: the answer's status is the rejection's, with the same body shape."""
    client = await make_client()
    if first is not None:
        await post(client, first)
    answer = await post(client, second, status)
    assert [(0, status, reason)] == [
        (r["index"], r["status"], r["reason"]) for r in answer["rejected"]
    ]


async def test_an_unknown_state_lists_the_canonical_states(make_client: ClientFactory) -> None:
    """422 that tells the sender what it may say."""
    client = await make_client()
    answer = await post(client, state_event("r", "exploded", agent="a"), 422)
    assert (
        "pending, starting, running, paused, completing, completed, failed, timeout, "
        "cancelled, dead"
    ) in answer["rejected"][0]["error"]


async def test_config_aliases_are_accepted_and_never_emitted(make_client: ClientFactory) -> None:
    """An extra spelling from [aliases] is stored as its canonical state."""
    client = await make_client({"aliases": {"SUCCESS_WITH_WARNINGS": "completed"}})
    await post(client, state_event("r", "running", agent="a"))
    await post(client, state_event("r", "success_with_warnings"))
    execution = await get(client, "/v1/executions/r")
    assert ["running", "completed"] == [h["to"] for h in execution["history"]]


async def test_duplicates_are_acknowledged_not_applied(make_client: ClientFactory) -> None:
    """A repeated event_id counts as a duplicate."""
    client = await make_client()
    event = state_event("r", "running", agent="a", event_id="e-1")
    await post(client, event)
    answer = await post(client, [event, event])
    assert (0, 2) == (answer["accepted"], answer["duplicates"])


async def test_over_max_body_bytes_is_413(make_client: ClientFactory) -> None:
    """A body over the limit is refused whole with a JSON message."""
    client = await make_client({"max_body_bytes": 2048})
    answer = await post(client, b"[" + b" " * 4096 + b"]", 413)
    assert "max_body_bytes (2048 bytes)" in answer["error"]


BARRAGE: list[bytes] = [
    b"",
    b"   ",
    b"not json",
    b"NaN",
    b'{"type": "heartbeat", "execution_id": NaN}',
    b"Infinity",
    b"\xff\xfe\xfd",
    b'{"type": "state", "execution_id": "\xc3\x28"}',
    b"[" * 10000,
    b"{" * 10000,
    b"null",
    b"true",
    b"42",
    b'"a string"',
    b"[1, 2, 3]",
    b'[null, {}, [], "x"]',
    b'{"type": ["state"], "execution_id": {"a": 1}}',
    b'{"type": "state", "execution_id": "r", "agent": "' + b"a" * 100_000 + b'", "state": "ok"}',
    b'{"type": "heartbeat", "execution_id": "r", "agent": "a", "attributes": '
    + orjson.dumps({"k": [[[[[[[[]]]]]]]]})
    + b"}",
    b'{"type": "heartbeat", "execution_id": "r", "agent": "a", "error": '
    + b'{"a":' * 500
    + b"1"
    + b"}" * 500
    + b"}",
    b'{"type": "heartbeat", "execution_id": "r", "agent": "a", "seq": 1e400}',
    b'{"type": "heartbeat", "execution_id": "r", "agent": "\\u0000"}',
    b'{"type": "heartbeat", "execution_id": "r", "agent": "\\ud800"}',
    b'{"type": "state", "execution_id": "r", "agent": "a", "state": "\\u0000running"}',
    b'{"type": "heartbeat", "execution_id": "r", "agent": "a", "ts": "2026-13-45T99:99:99Z"}',
    b"\x00\x00\x00",
    b'{"type":"heartbeat","execution_id":"r","agent":"a"}' * 3,
]


async def test_a_barrage_of_malformed_bodies_gets_4xx_only(make_client: ClientFactory) -> None:
    """Junk of every sort answers 4xx (or 202 with rejections); the daemon keeps serving."""
    client = await make_client()
    for body, content_type in itertools.product(
        BARRAGE, ["application/json", "application/x-ndjson", "text/plain"]
    ):
        response = await client.post(
            "/v1/events", data=body, headers={"Content-Type": content_type}
        )
        payload = await response.json()
        assert response.status < 500, (body[:60], payload)
        if response.status == 202:
            assert 0 == payload["accepted"] or body.startswith(b'{"type":"heartbeat"')
        else:
            assert payload.get("error") or payload.get("rejected"), payload
    assert 200 == (await client.get("/healthz")).status
    await post(client, state_event("still-serving", "running", agent="a"))


async def test_listing_filters_and_follows_the_cursor(make_client: ClientFactory) -> None:
    """Filters by state (aliases too), agent and kind; pages follow next_cursor to the end."""
    client = await make_client()
    events = [
        state_event(
            f"r{i}", "running", agent="a" if i < 5 else "b", kind="job" if i % 2 else "agent"
        )
        for i in range(8)
    ]
    events.append(state_event("r0", "done"))
    await post(client, events)
    page = await get(client, "/v1/executions?agent=a&limit=2")
    seen = [e["execution_id"] for e in page["executions"]]
    while page["next_cursor"]:
        page = await get(client, f"/v1/executions?agent=a&limit=2&cursor={page['next_cursor']}")
        seen += [e["execution_id"] for e in page["executions"]]
    assert ["r0", "r1", "r2", "r3", "r4"] == seen
    assert ["r0"] == [
        e["execution_id"] for e in (await get(client, "/v1/executions?state=SUCCESS"))["executions"]
    ]
    jobs = await get(client, "/v1/executions?kind=job&state=running")
    assert ["r1", "r3", "r5", "r7"] == [e["execution_id"] for e in jobs["executions"]]
    assert 8 == len((await get(client, "/v1/executions"))["executions"])


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("state=exploded", "'state'"),
        ("kind=daemon", "'kind'"),
        ("limit=0", "'limit'"),
        ("limit=ten", "'limit'"),
        ("cursor=abc", "'cursor'"),
        ("limit=\u00b2", "'limit'"),
        ("cursor=\u00b2", "'cursor'"),
        ("cursor=" + "9" * 5000, "'cursor'"),
        ("stat=running", "unknown query parameter 'stat'"),
    ],
)
async def test_bad_query_parameters_are_400_naming_the_parameter(
    make_client: ClientFactory, query: str, words: str
) -> None:
    """A bad filter is a clear 400, not an empty list."""
    client = await make_client()
    answer = await get(client, f"/v1/executions?{query}", 400)
    assert words in answer["error"]


async def test_an_unknown_execution_is_404(make_client: ClientFactory) -> None:
    """GET of an id nobody registered."""
    client = await make_client()
    answer = await get(client, "/v1/executions/nobody", 404)
    assert "execution 'nobody' (tenant 'default') is not known" == answer["error"]


async def test_executions_are_read_per_tenant(make_client: ClientFactory) -> None:
    """?tenant= picks the tenant of a named id; the default tenant is 'default'."""
    client = await make_client()
    await post(client, state_event("r", "running", agent="a", tenant="team-a"))
    await get(client, "/v1/executions/r", 404)
    assert "team-a" == (await get(client, "/v1/executions/r?tenant=team-a"))["tenant"]


async def test_agents_count_executions_by_state(make_client: ClientFactory) -> None:
    """Every state appears, zeros included."""
    client = await make_client()
    await post(
        client,
        [
            state_event("r1", "running", agent="a"),
            state_event("r2", "failed", agent="a"),
            state_event("r3", "paused", agent="b"),
        ],
    )
    agents = (await get(client, "/v1/agents"))["agents"]
    assert [("a", 1), ("b", 1)] == [(a["agent"], a["live"]) for a in agents]
    assert {"running": 1, "failed": 1} == {k: v for k, v in agents[0]["executions"].items() if v}
    assert 10 == len(agents[0]["executions"])


async def test_health_and_readiness(make_client: ClientFactory) -> None:
    """/healthz answers; /readyz is 200 once the store is replayed."""
    client = await make_client()
    assert "ok" == (await get(client, "/healthz"))["status"]
    assert "ready" == (await get(client, "/readyz"))["status"]


async def test_unknown_routes_and_methods_answer_json(make_client: ClientFactory) -> None:
    """404 and 405 say what exists."""
    client = await make_client()
    assert "/openapi.json" in (await get(client, "/v1/nope", 404))["error"]
    response = await client.delete("/v1/events")
    assert (405, "POST") == (response.status, response.headers["Allow"])


async def test_openapi_lists_exactly_the_routes(make_client: ClientFactory) -> None:
    """The document and the router never drift apart, nor the event schema and the parser."""
    client = await make_client()
    spec = await get(client, "/openapi.json")
    assert "3.1.0" == spec["openapi"]
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    routed = {
        (r.method, r.resource.canonical)
        for r in client.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert routed == documented
    assert {(r.method, r.path) for r in ROUTES} == documented
    assert FIELDS == set(EVENT["properties"])  # type: ignore[call-overload]
    assert spec == orjson.loads(orjson.dumps(document()))


async def test_sinks_get_committed_transitions_and_a_failing_one_is_skipped(
    make_client: ClientFactory,
) -> None:
    """One failing exporter never stops ingestion or the other sinks."""
    failing, recording = FailingSink(), RecordingSink()
    client = await make_client(sinks=[failing, recording])
    await post(
        client,
        [state_event("r", "running", agent="a"), heartbeat("r"), state_event("r", "completed")],
    )
    await post(client, state_event("r2", "running", agent="a"))
    assert 2 == failing.calls
    assert [("r", None, "running"), ("r", "running", "completed"), ("r2", None, "running")] == [
        (t.execution_id, t.old, t.new) for t in recording.transitions
    ]


class FlakyStore(MemoryStore):
    """Fails its next `failures` commits, then works."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def commit(self, changes: Changes) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        await super().commit(changes)


async def test_a_failing_store_answers_503_and_a_retry_makes_it_durable(
    make_client: ClientFactory,
) -> None:
    """Nothing is acknowledged before it is durable; a retry with the same event_id is."""
    store = FlakyStore(failures=2)
    client = await make_client(store=store)
    event = state_event("r", "completed", agent="a", event_id="e1")
    for _ in range(2):
        response = await client.post("/v1/events", data=orjson.dumps(event))
        assert (503, "1") == (response.status, response.headers["Retry-After"])
        assert "this request is not acknowledged" in (await response.json())["error"]
    assert {} == store.snapshots
    answer = await post(client, event)  # the store is back: the owed change is committed
    assert (0, 1) == (answer["accepted"], answer["duplicates"])
    assert "completed" == store.snapshots[("default", "r")]["state"]


async def test_a_same_state_event_with_new_facts_is_committed(make_client: ClientFactory) -> None:
    """Limits, attributes or seq on a no-op state event reach the store too."""
    store = MemoryStore()
    client = await make_client(store=store)
    await post(client, state_event("r", "running", agent="a"))
    await post(client, state_event("r", "running", run_timeout_s=7, attributes={"k": 1}, seq=9))
    snap = store.snapshots[("default", "r")]
    assert ({"run_timeout_s": 7.0}, {"k": 1}, 9) == (
        snap["limits"],
        snap["attributes"],
        snap["last_seq"],
    )


async def test_a_heartbeat_keeps_every_field_it_carries(make_client: ClientFactory) -> None:
    """A registering heartbeat (or a later one) never accepts a field and drops it."""
    store = MemoryStore()
    client = await make_client(store=store)
    await post(
        client,
        heartbeat(
            "r",
            agent="a",
            heartbeat_timeout_s=5,
            pid=42,
            memory_limit_bytes=1024,
            attributes={"k": "v"},
            parent_id="p",
            traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    )
    await post(client, heartbeat("r", error="late detail", attributes={"k2": 2}))
    execution = await get(client, "/v1/executions/r")
    assert (5.0, 1024, 42, "p", {"k": "v", "k2": 2}, "late detail") == (
        execution["limits"]["heartbeat_timeout_s"],
        execution["limits"]["memory_limit_bytes"],
        execution["pid"],
        execution["parent_id"],
        execution["attributes"],
        execution["error"],
    )
    assert "late detail" == store.snapshots[("default", "r")]["error"]


async def test_a_huge_batch_is_refused_and_rejections_are_capped(
    make_client: ClientFactory,
) -> None:
    """Over max_batch_events is 413; a batch of junk lists 100 rejections and counts the rest."""
    client = await make_client({"max_batch_events": 1000})
    answer = await post(client, [1] * 1001, 413)
    assert "at most 1000 (max_batch_events)" in answer["error"]
    answer = await post(client, [1] * 1000)
    assert (100, 900) == (len(answer["rejected"]), answer["rejected_omitted"])


async def test_state_is_committed_before_the_answer_and_replayed_on_start(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """What was acknowledged is in the store; a new app on the same store sees it."""
    store = MemoryStore()
    client = await make_client(store=store)
    await post(
        client,
        [
            state_event("r", "running", agent="a", progress=3),
            state_event("r2", "completed", agent="b"),
        ],
    )
    assert {("default", "r"), ("default", "r2")} == set(store.snapshots)
    before = await get(client, "/v1/executions")
    await client.close()
    restarted = await make_client(store=store)
    assert before == await get(restarted, "/v1/executions")


async def test_finished_executions_are_evicted_after_retention(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """Retention applies on the ingest path and the store forgets evicted executions."""
    store = MemoryStore()
    client = await make_client({"retention": {"finished_s": 60}}, store=store)
    await post(client, state_event("old", "completed", agent="a"))
    clock.advance(61)
    await post(client, state_event("new", "running", agent="a"))
    assert ["new"] == [
        e["execution_id"] for e in (await get(client, "/v1/executions"))["executions"]
    ]
    assert {("default", "new")} == set(store.snapshots)


async def test_ingest_counts_received_rejected_and_duplicate_events(
    make_client: ClientFactory,
) -> None:
    """The counters the metrics will export: by type, by rejection reason, duplicates."""
    client = await make_client()
    await post(
        client,
        [
            state_event("r", "running", agent="a", event_id="e1"),
            state_event("r", "running", agent="a", event_id="e1"),
            heartbeat("r"),
            heartbeat("ghost"),
            {"type": "bogus", "execution_id": "r"},
            state_event("r", "pending"),
        ],
    )
    await post(client, b"not json", 400)
    stats = client.app[INGESTOR].stats
    # the unparsable body counts as received too, so rejected/received stays a true ratio
    assert {"state": 3, "heartbeat": 2, "invalid": 2} == dict(stats.received)
    assert {
        "unknown_execution": 1,
        "invalid_field": 1,
        "invalid_transition": 1,
        "invalid_body": 1,
    } == {reason: n for reason, n in stats.rejected.items() if n}
    assert 0 == stats.rejected["stale_seq"]  # every reason's series exists from the start
    assert (2, 1) == (stats.accepted, stats.duplicates)
