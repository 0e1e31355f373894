"""HTTP handlers: thin translations between requests and the registry/ingestor."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from monitor import __version__
from monitor.errors import Rejection
from monitor.events import Kind
from monitor.model import Execution
from monitor.registry import counts_by_agent
from monitor.server import stream
from monitor.server.auth import (
    SCOPE,
    ForeignTenant,
    list_tenant,
    named_tenant,
    write_tenant,
)
from monitor.server.ingest import Ingestor, StoreUnavailable
from monitor.server.keys import (
    CLOCK,
    DETECTORS,
    HEALTH,
    INGESTOR,
    METRICS,
    REGISTRY,
    SETTINGS,
    STREAM,
)
from monitor.server.openapi import document
from monitor.states import FINAL, LIVE, ExecState

log = structlog.get_logger("execwatch.api")

MAX_PAGE = 1000
DEFAULT_PAGE = 100


def respond(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response serialised once with orjson (enums become their values)."""
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return respond({"error": message, "status": status}, status, headers)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error, including aiohttp's own 404/405/413, answers JSON with a clear message."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return error(
            413,
            f"the body is larger than max_body_bytes ({limit} bytes); split the batch",
        )
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error(
            405,
            f"{request.method} is not allowed on {request.path}; allowed: {allowed}",
            {"Allow": allowed},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, ForeignTenant):
            request.app[INGESTOR].stats.auth_failures["forbidden_tenant"] += 1
        message = exc.text or exc.reason
        if isinstance(exc, web.HTTPNotFound) and message == "404: Not Found":
            message = f"no endpoint at {request.path}; the API is described at /openapi.json"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "retry-after"}
        return error(exc.status, message, headers)
    except Exception:
        log.exception("handler_failed", path=request.path, method=request.method)
        return error(500, "internal error; the daemon logged it and keeps serving")


async def post_events(request: web.Request) -> web.Response:
    """POST /v1/events: a JSON object, a JSON array of objects, or NDJSON.

    At most `max_ingest_in_flight` requests are applied or committing at once. One more
    is shed before its body is read: 503 with Retry-After, counted, nothing applied.
    """
    ingestor = request.app[INGESTOR]
    busy = _busy(request)
    if busy is not None:
        return busy
    ingestor.stats.in_flight += 1
    try:
        return await _ingest(request, ingestor)
    finally:
        ingestor.stats.in_flight -= 1


def _busy(request: web.Request) -> web.Response | None:
    """The 503 for a write over `max_ingest_in_flight` (counted), or None to go ahead."""
    stats, limit = request.app[INGESTOR].stats, request.app[SETTINGS].max_ingest_in_flight
    if stats.in_flight < limit:
        return None
    stats.shed["ingest_in_flight"] += 1
    return error(
        503,
        f"execwatch is busy: {limit} requests are being ingested already "
        "(max_ingest_in_flight); nothing in this request was applied, retry it after "
        "Retry-After seconds",
        {"Retry-After": "1"},
    )


async def _ingest(request: web.Request, ingestor: Ingestor) -> web.Response:
    body = await request.read()
    now = request.app[CLOCK]()
    try:
        result = await ingestor.ingest(body, request.content_type, now, write_tenant(request))
    except Rejection as exc:  # the body as a whole: not JSON (400), too many events (413)
        ingestor.stats.rejected[exc.reason] += 1
        ingestor.stats.received["invalid"] += 1  # received and rejected: the ratio stays true
        return error(exc.status, exc.message)
    except StoreUnavailable:
        return error(
            503,
            "the store could not commit, so this request is not acknowledged: its events "
            "were applied in memory and will be written by the next commit that succeeds. "
            "Retry it with the same event_id values, so the retry counts as duplicates; "
            "without them a retried state change may be refused as already applied (409)",
            {"Retry-After": "1"},
        )
    return respond(result.body, result.status)


def _query_error(name: str, value: str, allowed: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f"query parameter {name!r} = {value[:80]!r}: expected {allowed}")


def _check_params(request: web.Request, allowed: tuple[str, ...]) -> None:
    """Refuse unknown query parameters: a misspelt filter must not silently match all."""
    for name in request.query:
        if name not in allowed:
            raise web.HTTPBadRequest(
                text=f"unknown query parameter {name[:80]!r}; allowed: {', '.join(allowed)}"
            )


def _integer(name: str, text: str, minimum: int, allowed: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 18) or int(text) < minimum:
        raise _query_error(name, text, allowed)
    return int(text)


LIST_PARAMS = ("state", "agent", "kind", "tenant", "limit", "cursor")


async def list_executions(request: web.Request) -> web.Response:
    """GET /v1/executions?state=&agent=&kind=&tenant=&limit=&cursor="""
    _check_params(request, LIST_PARAMS)
    query = request.query
    registry = request.app[REGISTRY]
    state = kind = None
    if "state" in query:
        resolved = request.app[INGESTOR].names.resolve(query["state"])
        if resolved is None:
            raise _query_error(
                "state",
                query["state"],
                "a canonical state or an alias: " + ", ".join(s.value for s in ExecState),
            )
        state = resolved[0]
    if "kind" in query:
        try:
            kind = Kind(query["kind"])
        except ValueError:
            raise _query_error("kind", query["kind"], ", ".join(k.value for k in Kind)) from None
    limit = DEFAULT_PAGE
    if "limit" in query:
        limit = min(
            _integer(
                "limit", query["limit"], 1, f"an integer >= 1 (pages hold {MAX_PAGE} at most)"
            ),
            MAX_PAGE,
        )
    after = 0
    if "cursor" in query:
        after = _integer("cursor", query["cursor"], 0, "the next_cursor of a previous page")
    page, resume = registry.select(
        tenant=list_tenant(request),
        state=state,
        agent=query.get("agent"),
        kind=kind,
        after=after,
        limit=limit,
    )
    settings = request.app[SETTINGS]
    return respond(
        {
            "executions": [ex.to_dict(settings) for ex in page],
            "next_cursor": None if resume is None else str(resume),
        }
    )


def _named_execution(request: web.Request) -> Execution:
    """The execution the path names, in the tenant the token may read; 404 otherwise,
    the same answer whether it exists in another tenant or nowhere."""
    execution_id = request.match_info["execution_id"]
    tenant = named_tenant(request)
    ex = None if tenant is None else request.app[REGISTRY].get(tenant, execution_id)
    if ex is None:
        shown = tenant or request.query["tenant"]
        raise web.HTTPNotFound(text=f"execution {execution_id!r} (tenant {shown!r}) is not known")
    return ex


async def get_execution(request: web.Request) -> web.Response:
    """GET /v1/executions/{execution_id}?tenant="""
    _check_params(request, ("tenant",))
    return respond(_named_execution(request).to_dict(request.app[SETTINGS]))


async def list_agents(request: web.Request) -> web.Response:
    """GET /v1/agents: per-agent counts by state, and each agent's breaker."""
    _check_params(request, ("tenant",))
    registry, detectors = request.app[REGISTRY], request.app[DETECTORS]
    now = request.app[CLOCK]()
    tenant = list_tenant(request)
    executions = [ex for ex in registry if tenant is None or ex.tenant == tenant]
    counts = counts_by_agent(executions)
    for owner, agent in detectors.breakers:  # an agent whose executions were all evicted
        if tenant is None or owner == tenant:
            counts.setdefault((owner, agent), {})
    agents: list[dict[str, Any]] = []
    for (owner, agent), per_state in sorted(counts.items()):
        agents.append(
            {
                "tenant": owner,
                "agent": agent,
                "live": sum(n for state, n in per_state.items() if state in LIVE),
                "executions": {s.value: per_state.get(s, 0) for s in ExecState},
                "breaker": detectors.breaker(owner, agent).to_dict(now),
            }
        )
    return respond({"agents": agents})


async def get_breaker(request: web.Request) -> web.Response:
    """GET /v1/breakers/{agent}?tenant=: may a new execution of this agent start?"""
    _check_params(request, ("tenant",))
    tenant, agent = named_tenant(request), request.match_info["agent"]
    if tenant is None:  # another tenant's: the 404 an unknown agent would get if it could
        raise web.HTTPNotFound(
            text=f"agent {agent!r} (tenant {request.query['tenant']!r}) is not known"
        )
    breaker = request.app[DETECTORS].breaker(tenant, agent)
    return respond(breaker.to_dict(request.app[CLOCK]()))


async def list_findings(request: web.Request) -> web.Response:
    """GET /v1/findings?tenant=&agent=&finding=: the active detector findings."""
    _check_params(request, ("tenant", "agent", "finding"))
    query = request.query
    tenant, agent, name = list_tenant(request), query.get("agent"), query.get("finding")
    findings = [
        {"execution_id": f.execution_id, "tenant": f.tenant, "agent": f.agent, **f.to_dict()}
        for f in request.app[REGISTRY].findings.values()
        if (tenant is None or f.tenant == tenant)
        and (agent is None or f.agent == agent)
        and (name is None or f.finding == name)
    ]
    findings.sort(key=lambda f: (f["since"], f["execution_id"]))
    return respond({"findings": findings})


async def cancel_execution(request: web.Request) -> web.Response:
    """POST /v1/executions/{execution_id}/cancel?tenant=: ask the execution to stop.

    Its next answers carry a cancel directive; the SDK acts on it.
    """
    _check_params(request, ("tenant",))
    registry = request.app[REGISTRY]
    ex = _named_execution(request)
    execution_id = ex.execution_id
    if ex.state in FINAL:
        raise web.HTTPConflict(
            text=f"execution {execution_id!r} already ended in final state '{ex.state}'; "
            "there is nothing to cancel"
        )
    busy = _busy(request)  # a cancel waits on a commit too: it counts against the limit
    if busy is not None:
        return busy
    ingestor = request.app[INGESTOR]
    registry.request_cancel(ex, "cancel_requested")
    ingestor.stats.in_flight += 1
    try:
        await ingestor.commit()
    except StoreUnavailable:
        return error(503, "the store could not commit the request; retry", {"Retry-After": "1"})
    finally:
        ingestor.stats.in_flight -= 1
    return respond(
        {"execution_id": execution_id, "action": "cancel", "reason": "cancel_requested"}, 202
    )


async def stream_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/stream?tenant=&last_event_id=: Server-Sent Events of transitions, findings
    and breaker changes; `Last-Event-ID` resumes (see monitor.server.stream)."""
    _check_params(request, ("tenant", "last_event_id"))
    tenant = list_tenant(request)
    broadcaster = request.app[STREAM]
    if broadcaster.closing:
        return error(503, "the daemon is stopping; reconnect in a moment", {"Retry-After": "2"})
    full = broadcaster.full(tenant)
    if full is not None:
        request.app[INGESTOR].stats.shed["stream_consumers"] += 1
        return error(503, f"{full}; retry after Retry-After seconds", {"Retry-After": "5"})
    return await stream.serve(request, broadcaster, tenant)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text, or OpenMetrics (with exemplars) when the Accept asks.

    The series cover every tenant, so a token bound to one tenant may not read them."""
    own = request[SCOPE].tenant
    if own is not None:
        request.app[INGESTOR].stats.auth_failures["forbidden_tenant"] += 1
        return error(
            403,
            f"/metrics covers every tenant, and this token reads only tenant {own!r}: "
            'scrape with an all-tenants ("*") token, or set [auth] metrics_public = true',
        )
    body, content_type = await request.app[METRICS].render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


HEALTHZ_STALE_S = 60.0
"""/healthz fails when the detector loop has not woken for this long (its interval is
10 s at most): a daemon that answers HTTP but detects nothing is not alive."""


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers and the detector loop still wakes up."""
    ticked_at = request.app[HEALTH].ticked_at
    if ticked_at is not None:
        silent_s = time.monotonic() - ticked_at
        if silent_s > HEALTHZ_STALE_S:
            return respond(
                {
                    "status": "detector loop stalled",
                    "detail": f"the detector loop last woke {silent_s:.0f}s ago "
                    f"(more than {HEALTHZ_STALE_S:.0f}s): deaths and timeouts go undetected",
                    "version": __version__,
                },
                503,
            )
    return respond({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store is replayed and the daemon is not draining."""
    if request.app[HEALTH].ready:
        return respond({"status": "ready"})
    return respond({"status": "not ready"}, 503)


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of every endpoint."""
    return respond(document())


async def landing(request: web.Request) -> web.Response:
    """A small page with the links a person looks for first."""
    tenant = list_tenant(request)
    known = sum(1 for ex in request.app[REGISTRY] if tenant is None or ex.tenant == tenant)
    links = "".join(
        f'<li><a href="{path}">{path}</a></li>'
        for path in (
            "/v1/executions",
            "/v1/agents",
            "/v1/findings",
            "/v1/stream",
            "/metrics",
            "/openapi.json",
            "/healthz",
            "/readyz",
        )
    )
    html = (
        f"<!doctype html><html><head><title>execwatch</title></head><body>"
        f"<h1>execwatch {__version__}</h1><p>{known} executions known.</p>"
        f"<ul>{links}</ul></body></html>"
    )
    return web.Response(text=html, content_type="text/html")
