"""schemathesis against the daemon's own /openapi.json: no 5xx, every answer matches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from monitor.server.openapi import document
from tests.integration.test_daemon import Daemon

schema = schemathesis.openapi.from_dict(document()).exclude(path="/v1/stream")
"""The stream never ends, so it is not a case here: tests/integration/test_stream.py reads it."""


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: object, value: object) -> bytes:
    """The schema gives NDJSON bodies as strings: send them as they are."""
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One durable daemon for every generated case."""
    path: Path = tmp_path_factory.mktemp("schema") / "execwatch.db"
    started = Daemon("--database", str(path))
    try:
        yield started
    finally:
        assert 0 == started.stop()


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_matches_its_schema(case: schemathesis.Case, daemon: Daemon) -> None:
    """Every default check but two that contradict the wire contract: a batch answers 202
    and rejects its bad events by index (so schema-violating data is "accepted"), and a
    valid-looking event may still be refused by the state machine (404, 409)."""
    case.call_and_validate(
        base_url=daemon.url, excluded_checks=[negative_data_rejection, positive_data_acceptance]
    )
