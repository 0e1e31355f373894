"""The aiohttp application: make_app() receives every dependency; nothing global."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import structlog
from aiohttp import web

from monitor.config import Settings
from monitor.registry import Registry
from monitor.server import api
from monitor.server.ingest import Ingestor, Sink
from monitor.server.keys import CLOCK, HEALTH, INGESTOR, REGISTRY, SETTINGS, STORE, Health
from monitor.states import StateNames
from monitor.store import Store
from monitor.store.memory import MemoryStore

log = structlog.get_logger("execwatch.server")

HOUSEKEEPING_INTERVAL_S = 1.0


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
    Route("GET", "/v1/agents", api.list_agents),
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
    housekeeping_interval_s: float = HOUSEKEEPING_INTERVAL_S,
) -> web.Application:
    """Build the daemon's app. `clock` is the only source of "now" for everything below."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[api.json_errors])
    registry = Registry(settings)
    store = store if store is not None else MemoryStore()
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[STORE] = store
    app[CLOCK] = clock
    app[HEALTH] = Health()
    app[INGESTOR] = Ingestor(
        registry, store, StateNames(settings.aliases), sinks, settings.max_batch_events
    )
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)  # type: ignore[arg-type]
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(_housekeeping(housekeeping_interval_s))
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Replay the store into the registry, then declare the daemon ready; close it at exit."""
    registry, store, health = app[REGISTRY], app[STORE], app[HEALTH]
    restored = registry.restore_all(await store.load())
    health.ready = True
    log.info("store_replayed", executions=restored)
    yield
    health.ready = False
    await store.close()


def _housekeeping(interval_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_evict_loop(app, interval_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return run


async def _evict_loop(app: web.Application, interval_s: float) -> None:
    """Evict finished executions past retention even when no traffic arrives."""
    registry, ingestor, clock = app[REGISTRY], app[INGESTOR], app[CLOCK]
    while True:
        await asyncio.sleep(interval_s)
        try:
            registry.evict(clock())
            await ingestor.commit()
        except Exception:
            log.exception("housekeeping_failed")
