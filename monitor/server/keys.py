"""Typed keys for the application's state (aiohttp AppKey), shared by app and handlers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from monitor.config import Settings
from monitor.detectors.engine import Detectors
from monitor.registry import Registry
from monitor.server.ingest import Ingestor
from monitor.server.stream import Broadcaster
from monitor.server.systemd import Notifier
from monitor.store import Store


@dataclass(slots=True)
class Health:
    """What /readyz reports (ready once the store is replayed, not while draining), and
    what /healthz checks (the detector loop still wakes up)."""

    ready: bool = False
    ticked_at: float | None = None
    """time.monotonic() of the detector loop's last wake-up (None: no loop runs)."""


SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
STORE = web.AppKey("store", Store)
Clock = Callable[[], float]
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
HEALTH = web.AppKey("health", Health)
INGESTOR = web.AppKey("ingestor", Ingestor)
DETECTORS = web.AppKey("detectors", Detectors)
METRICS: web.AppKey[Any] = web.AppKey("metrics")  # exporters.prometheus.Metrics
NOTIFIER = web.AppKey("notifier", Notifier)
SPANS: web.AppKey[Any] = web.AppKey("spans")  # exporters.otel.SpanSink, when tracing is on
PROCESSES: web.AppKey[Any] = web.AppKey("processes")  # scheduler.ProcessWatch (which imports keys)
STREAM = web.AppKey("stream", Broadcaster)
