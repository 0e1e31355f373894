"""Shared fixtures: an app on a fake clock behind pytest-aiohttp's test client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from monitor import model
from monitor.config import build_settings
from monitor.server.app import make_app
from monitor.server.ingest import Sink
from monitor.store import Store
from monitor.testing import FakeClock

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture(autouse=True)
def _shared_empties_stay_empty() -> Iterator[None]:
    """Executions share these until they need their own: a write into one would show up
    in every other execution. Whatever a test did, they must still be empty."""
    yield
    assert ({}, {}, ()) == (model.NO_ATTRIBUTES, model.NO_FINDINGS, model.NO_SAMPLES)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(aiohttp_client: Any, clock: FakeClock) -> ClientFactory:
    """Build an app from a raw config mapping and return a client for it."""

    async def factory(
        config: dict[str, Any] | None = None,
        *,
        store: Store | None = None,
        sinks: Sequence[Sink] = (),
        run_detectors: bool = False,
    ) -> TestClient[Any, Any]:
        """Without the detector loop unless asked: tests tick it themselves, on `clock`."""
        app = make_app(
            build_settings(config or {}),
            store=store,
            clock=clock,
            sinks=sinks,
            run_detectors=run_detectors,
        )
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return factory
