"""The aiohttp application: make_app() receives every dependency; nothing global."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from opentelemetry.sdk.trace.export import SpanExporter

from exporters.logs import LogSink
from exporters.otel import SpanSink, make_span_pipeline
from exporters.prometheus import AgentLabels, ExecwatchCollector, Metrics, MetricsSink
from exporters.traces import TraceIds
from monitor.config import Settings
from monitor.detectors.engine import Detectors
from monitor.registry import Registry
from monitor.server import api
from monitor.server.auth import make_middleware
from monitor.server.ingest import Ingestor, Sink
from monitor.server.keys import (
    CLOCK,
    DETECTORS,
    HEALTH,
    INGESTOR,
    METRICS,
    NOTIFIER,
    PROCESSES,
    REGISTRY,
    SETTINGS,
    SPANS,
    STORE,
    STREAM,
    Health,
)
from monitor.server.scheduler import ProcessWatch, detector_tasks, freeze_long_lived
from monitor.server.stream import Broadcaster
from monitor.server.systemd import Notifier
from monitor.states import TERMINAL, StateNames
from monitor.store import Store
from monitor.store.memory import NullStore

log = structlog.get_logger("execwatch.server")


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: the OpenAPI document is checked against this table by a test."""

    method: str
    path: str
    handler: Callable[[web.Request], object]


ROUTES: Sequence[Route] = (
    Route("GET", "/", api.landing),
    Route("POST", "/v1/events", api.post_events),
    Route("GET", "/v1/executions", api.list_executions),
    Route("GET", "/v1/executions/{execution_id}", api.get_execution),
    Route("POST", "/v1/executions/{execution_id}/cancel", api.cancel_execution),
    Route("GET", "/v1/agents", api.list_agents),
    Route("GET", "/v1/breakers/{agent}", api.get_breaker),
    Route("GET", "/v1/findings", api.list_findings),
    Route("GET", "/v1/stream", api.stream_events),
    Route("GET", "/metrics", api.metrics),
    Route("GET", "/healthz", api.healthz),
    Route("GET", "/readyz", api.readyz),
    Route("GET", "/openapi.json", api.openapi),
)


def make_app(
    settings: Settings,
    *,
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
    sinks: Sequence[Sink] = (),
    run_detectors: bool = True,
    otel_environ: Mapping[str, str] | None = None,
    span_exporter: SpanExporter | None = None,
    notifier: Notifier | None = None,
) -> web.Application:
    """Build the daemon's app. `clock` is the only source of "now" for everything below.

    With `run_detectors=False` no loop ticks: tests drive `app[DETECTORS].tick(now)`.
    Traces are exported when `otel_environ` (the OTEL_* variables) asks for them, or to
    `span_exporter` (tests).
    """
    registry = Registry(settings)
    detectors = Detectors(registry, settings)
    store = store if store is not None else NullStore()
    ingestor = Ingestor(
        detectors, store, StateNames(settings.aliases), (), settings.max_batch_events
    )
    authenticate = make_middleware(
        settings.auth.tokens,
        settings.auth.metrics_public,
        api.error,
        lambda reason: ingestor.stats.auth_failures.update((reason,)),
    )
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[api.json_errors, authenticate]
    )
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[DETECTORS] = detectors
    app[STORE] = store
    app[CLOCK] = clock
    app[HEALTH] = Health()
    app[NOTIFIER] = notifier if notifier is not None else Notifier(None, None)
    app[PROCESSES] = ProcessWatch()
    traces = TraceIds()

    def traced() -> bool:
        """Whether any execution may have a trace: a span, or a caller's traceparent."""
        return bool(traces.open or traces.ended or registry.traced)

    app[INGESTOR] = ingestor
    metrics_sink = MetricsSink(
        AgentLabels(settings.metrics.max_agents, settings.metrics.tenants),
        lookup=registry.by_key,
        trace_id=traces.exemplar_trace_id,
        drain=lambda: (registry.drain_heartbeats(), detectors.drain_not_permitted()),
        traced=traced,
    )
    app[METRICS] = Metrics(ExecwatchCollector(detectors, ingestor.stats, metrics_sink, clock))
    # Stream ids start at the start time in microseconds: they increase across restarts.
    app[STREAM] = broadcaster = Broadcaster(
        settings.stream, int(clock() * 1_000_000), ingestor.stats.stream
    )
    exporters: list[Sink] = [metrics_sink, LogSink(traces, registry.by_key, traced)]
    ingestor.set_publish(broadcaster)
    pipeline = make_span_pipeline(otel_environ or {}, ingestor.stats, span_exporter)
    if pipeline is not None:
        span_sink = SpanSink(pipeline, traces, registry.by_key)
        exporters.insert(0, span_sink)  # first: the others read the trace ids it assigns
        app[SPANS] = span_sink
        ingestor.traces = traces  # span contexts are committed, so traces survive restarts
        app.cleanup_ctx.append(_flush_spans)
    ingestor.set_sinks([*exporters, *sinks])
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)  # type: ignore[arg-type]
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_draining)
    if run_detectors:
        app.cleanup_ctx.append(detector_tasks)
    return app


async def _flush_spans(app: web.Application) -> AsyncIterator[None]:
    """At shutdown, export the spans of executions still running, and flush (bounded)."""
    yield
    await asyncio.to_thread(app[SPANS].close)  # its flush must not block the loop


async def _draining(app: web.Application) -> None:
    """SIGTERM: the listener is closed; say so before the in-flight requests drain."""
    app[HEALTH].ready = False
    app[STREAM].close()  # streams end now; they would hold the drain for its whole timeout
    app[NOTIFIER].stopping()
    log.info("daemon_draining")


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Replay the store, give every execution a fresh heartbeat grace (the daemon was not
    watching while it was down), then declare the daemon ready; close the store at exit."""
    registry, detectors, store, health = app[REGISTRY], app[DETECTORS], app[STORE], app[HEALTH]
    unreadable: list[str] = []

    def skip(kind: str) -> Callable[[dict[str, Any], Exception], None]:
        def skipped(snapshot: dict[str, Any], exc: Exception) -> None:
            # One bad row must not crash-loop the daemon: log it, count it, go on.
            unreadable.append(kind)
            log.error("snapshot_unreadable", kind=kind, tenant=snapshot.get("tenant"),
                      execution_id=snapshot.get("execution_id"), agent=snapshot.get("agent"),
                      error=repr(exc))  # fmt: skip

        return skipped

    restored = registry.restore_all(await store.load(), skip("execution"))
    breakers = detectors.restore_breakers(await store.load_breakers(), skip("breaker"))
    if SPANS in app:
        live = [
            (key, ctx)
            for key, ctx in await store.load_span_contexts()
            if (ex := registry.by_key(key)) is not None and ex.state not in TERMINAL
        ]
        app[SPANS].traces.restore(live, app[CLOCK]())
    detectors.regain_sight(app[CLOCK]())
    detectors.schedule_all()
    freeze_long_lived()
    health.ready = True
    log.info("store_replayed", executions=restored, breakers=breakers, skipped=len(unreadable))
    yield
    health.ready = False
    try:  # bounded: a stuck disk must not outlive the supervisor's grace period
        await asyncio.wait_for(_close_store(app), STORE_CLOSE_TIMEOUT_S)
    except TimeoutError:
        log.error("store_close_timed_out", timeout_s=STORE_CLOSE_TIMEOUT_S)


STORE_CLOSE_TIMEOUT_S = 10.0
"""The last checkpoint and the store's close, at most (after a drain of up to 10 s)."""


async def _close_store(app: web.Application) -> None:
    try:
        await app[INGESTOR].commit(checkpoint=True)  # the last heartbeats, and anything owed
    except Exception:
        log.exception("final_checkpoint_failed")
    await app[STORE].close()
