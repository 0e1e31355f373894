"""Tokens and tenant isolation: every endpoint x every kind of caller.

Callers: no token, a bad token, a token of team-a asking for team-a's data ("own"), the
same token asking for team-b's ("other"), and an all-tenants token asking for team-b's
("all"). Besides the status, no answer to team-a may carry anything of team-b's, and an
answer about team-b's execution must read exactly like one about an id that exists
nowhere: existence does not leak.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from monitor.server.app import ROUTES
from monitor.server.keys import DETECTORS, INGESTOR, STREAM
from monitor.testing import FakeClock, heartbeat, state_event
from tests.conftest import ClientFactory
from tests.integration.test_api import Client

TOKENS = {"token-of-team-a": "team-a", "token-of-team-b": "team-b", "token-of-all": "*"}
CONFIG: dict[str, Any] = {
    "auth": {"tokens": TOKENS},
    "defaults": {"stall_timeout_s": 5},
    "breaker": {"minimum_calls": 1},
}
ALL = {"Authorization": "Bearer token-of-all"}
TEAM_A = {"Authorization": "Bearer token-of-team-a"}
CALLERS: dict[str, dict[str, str]] = {
    "none": {},
    "bad": {"Authorization": "Bearer token-of-nobody"},
    "own": TEAM_A,
    "other": TEAM_A,
    "all": ALL,
}
SECRETS = ("secret-agent-b", "secret-value-b", "secret-error-b", "run-b", "failed-b")
"""What team-b has: none of it may reach team-a, unless team-a's own request named it."""


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any = None


@dataclass(frozen=True)
class Endpoint:
    own: Call
    """team-a's own data (also what the no-token and bad-token callers try)."""
    other: Call
    """team-b's data, asked with team-a's token."""
    every: Call
    """team-b's data, asked with the all-tenants token."""
    expected: tuple[int, int, int, int, int]
    """Status for none, bad, own, other, all."""


def event(execution_id: str, tenant: str | None = None) -> dict[str, Any]:
    body = state_event(execution_id, "running", agent="agent-new")
    if tenant is not None:
        body["tenant"] = tenant
    return body


ENDPOINTS: dict[str, Endpoint] = {
    "GET /": Endpoint(
        Call("GET", "/"), Call("GET", "/?tenant=team-b"), Call("GET", "/?tenant=team-b"),
        (401, 401, 200, 403, 200),
    ),
    "POST /v1/events": Endpoint(
        Call("POST", "/v1/events", event("new-a")),
        Call("POST", "/v1/events", event("new-b", "team-b")),
        Call("POST", "/v1/events", event("new-b", "team-b")),
        (401, 401, 202, 403, 202),
    ),
    "GET /v1/executions": Endpoint(
        Call("GET", "/v1/executions"),
        Call("GET", "/v1/executions?tenant=team-b"),
        Call("GET", "/v1/executions?tenant=team-b"),
        (401, 401, 200, 403, 200),
    ),
    "GET /v1/executions/{execution_id}": Endpoint(
        Call("GET", "/v1/executions/run-a"),
        Call("GET", "/v1/executions/run-b?tenant=team-b"),
        Call("GET", "/v1/executions/run-b?tenant=team-b"),
        (401, 401, 200, 404, 200),
    ),
    "POST /v1/executions/{execution_id}/cancel": Endpoint(
        Call("POST", "/v1/executions/run-a/cancel"),
        Call("POST", "/v1/executions/run-b/cancel?tenant=team-b"),
        Call("POST", "/v1/executions/run-b/cancel?tenant=team-b"),
        (401, 401, 202, 404, 202),
    ),
    "GET /v1/agents": Endpoint(
        Call("GET", "/v1/agents"),
        Call("GET", "/v1/agents?tenant=team-b"),
        Call("GET", "/v1/agents?tenant=team-b"),
        (401, 401, 200, 403, 200),
    ),
    "GET /v1/breakers/{agent}": Endpoint(
        Call("GET", "/v1/breakers/agent-a"),
        Call("GET", "/v1/breakers/secret-agent-b?tenant=team-b"),
        Call("GET", "/v1/breakers/secret-agent-b?tenant=team-b"),
        (401, 401, 200, 404, 200),
    ),
    "GET /v1/findings": Endpoint(
        Call("GET", "/v1/findings"),
        Call("GET", "/v1/findings?tenant=team-b"),
        Call("GET", "/v1/findings?tenant=team-b"),
        (401, 401, 200, 403, 200),
    ),
    "GET /v1/stream": Endpoint(
        Call("GET", "/v1/stream"),
        Call("GET", "/v1/stream?tenant=team-b"),
        Call("GET", "/v1/stream?tenant=team-b"),
        (401, 401, 200, 403, 200),
    ),
    "GET /metrics": Endpoint(
        Call("GET", "/metrics"), Call("GET", "/metrics"), Call("GET", "/metrics"),
        (401, 401, 403, 403, 200),
    ),
    "GET /openapi.json": Endpoint(
        Call("GET", "/openapi.json"), Call("GET", "/openapi.json"), Call("GET", "/openapi.json"),
        (401, 401, 200, 200, 200),
    ),
    "GET /healthz": Endpoint(
        Call("GET", "/healthz"), Call("GET", "/healthz"), Call("GET", "/healthz"),
        (200, 200, 200, 200, 200),
    ),
    "GET /readyz": Endpoint(
        Call("GET", "/readyz"), Call("GET", "/readyz"), Call("GET", "/readyz"),
        (200, 200, 200, 200, 200),
    ),
}  # fmt: skip


def test_the_matrix_covers_every_route() -> None:
    assert {f"{r.method} {r.path}" for r in ROUTES} == set(ENDPOINTS)


async def seeded(make_client: ClientFactory, clock: FakeClock, **config: Any) -> Client:
    """team-a runs run-a; team-b runs run-b (with a secret attribute) and failed failed-b
    (its breaker opened); both running ones are stalled."""
    client = await make_client({**CONFIG, **config})
    for tenant, run, agent in (
        ("team-a", "run-a", "agent-a"),
        ("team-b", "run-b", "secret-agent-b"),
    ):
        body = state_event(run, "running", agent=agent, tenant=tenant, progress=1)
        if tenant == "team-b":
            body["attributes"] = {"note": "secret-value-b"}
        assert 202 == (await client.post("/v1/events", json=body, headers=ALL)).status
    failed = [
        state_event("failed-b", "running", agent="secret-agent-b", tenant="team-b"),
        state_event("failed-b", "failed", tenant="team-b", error={"message": "secret-error-b"}),
    ]
    answer = await client.post("/v1/events", json=failed, headers=ALL)
    assert 2 == (await answer.json())["accepted"]
    clock.advance(3)
    beats = [heartbeat("run-a", tenant="team-a", progress=1),
             heartbeat("run-b", tenant="team-b", progress=1)]  # fmt: skip
    assert 202 == (await client.post("/v1/events", json=beats, headers=ALL)).status
    clock.advance(2.5)
    await client.app[INGESTOR].commit(client.app[DETECTORS].tick(clock()).records)
    findings = await (await client.get("/v1/findings", headers=ALL)).json()
    assert {"run-a", "run-b"} == {f["execution_id"] for f in findings["findings"]}
    return client


async def call(client: Client, request: Call, headers: dict[str, str]) -> tuple[int, str]:
    data = None if request.body is None else orjson.dumps(request.body)
    if request.path.startswith("/v1/stream"):  # replay everything the ring holds
        headers = {**headers, "Last-Event-ID": str(client.app[STREAM].first_id - 1)}
    async with client.request(request.method, request.path, data=data, headers=headers) as answer:
        if answer.content_type == "text/event-stream":
            return answer.status, await replayed(answer)
        return answer.status, await answer.text()


async def replayed(answer: aiohttp.ClientResponse) -> str:
    """What a stream sent before it fell quiet: its whole replay."""
    chunks = []
    while True:
        try:
            chunks.append(await asyncio.wait_for(answer.content.readany(), 0.2))
        except TimeoutError:
            return b"".join(chunks).decode()


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("name", list(ENDPOINTS))
async def test_every_endpoint_answers_every_caller(
    make_client: ClientFactory, clock: FakeClock, name: str, caller: str
) -> None:
    client = await seeded(make_client, clock)
    endpoint = ENDPOINTS[name]
    request = {"other": endpoint.other, "all": endpoint.every}.get(caller, endpoint.own)
    status, body = await call(client, request, CALLERS[caller])
    expected = endpoint.expected[list(CALLERS).index(caller)]
    assert expected == status, body
    if status == 401:
        assert "bearer token" in body or "Bearer" in body
    if name == "GET /v1/stream" and status == 200:  # the replay holds the seeded events
        assert ("secret-agent-b" in body) == (caller == "all")
        assert ("agent-a" in body) == (caller == "own")
    if caller in ("none", "bad", "own", "other"):
        named = request.path + orjson.dumps(request.body).decode()
        leaked = [s for s in SECRETS if s in body and s not in named]
        assert [] == leaked, body


@pytest.mark.parametrize("caller", ["none", "bad"])
async def test_a_refused_caller_is_told_how_to_authenticate(
    make_client: ClientFactory, clock: FakeClock, caller: str
) -> None:
    """401 carries WWW-Authenticate (RFC 6750), and each refusal is counted by reason."""
    client = await make_client(CONFIG)
    answer = await client.get("/v1/executions", headers=CALLERS[caller])
    assert 401 == answer.status
    challenge = answer.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="execwatch"')
    assert ('error="invalid_token"' in challenge) == (caller == "bad")
    reason = "missing_token" if caller == "none" else "invalid_token"
    assert 1 == client.app[INGESTOR].stats.auth_failures[reason]


@pytest.mark.parametrize(
    "header", ["token-of-all", "Basic token-of-all", "Bearer", "Bearer token-of-all-x",
               "Bearer token-of-al", "bearer  token-of-all "],
)  # fmt: skip
async def test_only_an_exact_bearer_token_is_accepted(
    make_client: ClientFactory, header: str
) -> None:
    """The scheme has no case and spaces around are ignored; the token is matched exactly."""
    client = await make_client(CONFIG)
    answer = await client.get("/v1/executions", headers={"Authorization": header})
    assert (200 if header.lower().startswith("bearer  token-of-all") else 401) == answer.status


async def test_another_tenants_execution_reads_exactly_like_one_that_does_not_exist(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """run-b exists in team-b: team-a's answers about it, with or without ?tenant=, are the
    answers about an id that exists nowhere, byte for byte."""
    client = await seeded(make_client, clock)
    for template in ("/v1/executions/{}", "/v1/executions/{}/cancel"):
        method = "POST" if template.endswith("cancel") else "GET"
        for query in ("", "?tenant=team-b"):
            real = await call(client, Call(method, template.format("run-b") + query), TEAM_A)
            ghost = await call(client, Call(method, template.format("ghost") + query), TEAM_A)
            assert (404, ghost[1].replace("ghost", "run-b")) == real
    real = await call(client, Call("GET", "/v1/breakers/secret-agent-b?tenant=team-b"), TEAM_A)
    ghost = await call(client, Call("GET", "/v1/breakers/nobody?tenant=team-b"), TEAM_A)
    assert (404, ghost[1].replace("nobody", "secret-agent-b")) == real


async def test_lists_hold_only_the_tokens_tenant(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """team-a's lists hold team-a's rows; the all-tenants token sees both, or picks one."""
    client = await seeded(make_client, clock)

    async def tenants(path: str, key: str, headers: dict[str, str]) -> set[str]:
        answer = await client.get(path, headers=headers)
        assert 200 == answer.status
        return {row["tenant"] for row in (await answer.json())[key]}

    for path, key in (("/v1/executions", "executions"), ("/v1/agents", "agents"),
                      ("/v1/findings", "findings")):  # fmt: skip
        assert {"team-a"} == await tenants(path, key, TEAM_A)
        assert {"team-a"} == await tenants(f"{path}?tenant=team-a", key, TEAM_A)
        assert {"team-a", "team-b"} == await tenants(path, key, ALL)
        assert {"team-b"} == await tenants(f"{path}?tenant=team-b", key, ALL)


async def test_writes_land_in_the_tokens_tenant_and_breakers_are_per_tenant(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """An event without a tenant lands in the token's; one naming another is 403 and is
    never applied, also inside a batch; team-b's open breaker does not refuse team-a."""
    client = await seeded(make_client, clock)
    batch = [event("mine"), event("theirs", "team-b"), event("also-mine", "team-a")]
    answer = await client.post("/v1/events", json=batch, headers=TEAM_A)
    result = await answer.json()
    assert (202, 2) == (answer.status, result["accepted"])
    assert [(1, 403, "forbidden_tenant")] == [
        (r["index"], r["status"], r["reason"]) for r in result["rejected"]
    ]
    assert 404 == (await client.get("/v1/executions/theirs?tenant=team-b", headers=ALL)).status
    assert 200 == (await client.get("/v1/executions/mine?tenant=team-a", headers=ALL)).status
    assert 1 == client.app[INGESTOR].stats.rejected["forbidden_tenant"]

    open_b = await (
        await client.get("/v1/breakers/secret-agent-b?tenant=team-b", headers=ALL)
    ).json()
    assert "open" == open_b["state"]
    same_agent_a = await client.get("/v1/breakers/secret-agent-b", headers=TEAM_A)
    assert ("closed", True) == ((body := await same_agent_a.json())["state"], body["allow"])


async def test_a_cancel_directive_never_names_another_tenants_execution(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """team-b's run-b is asked to cancel; team-a posting an event that names it (refused
    403) gets no directive about it."""
    client = await seeded(make_client, clock)
    answer = await client.post("/v1/executions/run-b/cancel?tenant=team-b", headers=ALL)
    assert 202 == answer.status
    probe = heartbeat("run-b", tenant="team-b")
    result = await (await client.post("/v1/events", json=[probe], headers=TEAM_A)).json()
    assert [] == result["directives"]
    result = await (await client.post("/v1/events", json=[probe], headers=ALL)).json()
    assert ["run-b"] == [d["execution_id"] for d in result["directives"]]


async def test_metrics_can_be_opened_to_scrapers_without_a_token(
    make_client: ClientFactory,
) -> None:
    """[auth] metrics_public: /metrics needs no token; everything else still does."""
    client = await make_client({"auth": {"tokens": TOKENS, "metrics_public": True}})
    assert 200 == (await client.get("/metrics")).status
    assert 401 == (await client.get("/v1/executions")).status


async def test_without_tokens_every_caller_reads_every_tenant(
    make_client: ClientFactory,
) -> None:
    """No [auth.tokens]: the loopback-only daemon of a single team; ?tenant= still filters."""
    client = await make_client()
    for tenant in ("team-a", "team-b"):
        body = state_event(f"run-{tenant}", "running", agent="x", tenant=tenant)
        assert 202 == (await client.post("/v1/events", json=body)).status
    listed = await (await client.get("/v1/executions")).json()
    assert {"team-a", "team-b"} == {ex["tenant"] for ex in listed["executions"]}
    one = await (await client.get("/v1/executions?tenant=team-b")).json()
    assert ["team-b"] == [ex["tenant"] for ex in one["executions"]]


async def test_only_an_all_tenants_token_may_name_a_process(make_client: ClientFactory) -> None:
    """A pid makes the daemon read that process's memory and maybe signal it: a one-tenant
    token must not point it at another tenant's worker, so its pid is refused 403."""
    client = await make_client(CONFIG)
    body = state_event("with-pid", "running", agent="agent-a", pid=1234)
    answer = await client.post("/v1/events", json=body, headers=TEAM_A)
    result = await answer.json()
    assert (403, "forbidden_field") == (answer.status, result["rejected"][0]["reason"])
    assert "'pid'" in result["rejected"][0]["error"]
    assert 404 == (await client.get("/v1/executions/with-pid", headers=TEAM_A)).status
    assert 202 == (await client.post("/v1/events", json=body, headers=ALL)).status
