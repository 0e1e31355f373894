"""The README's vocabulary examples, run as written against a real daemon."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.client import Client
from tests.integration.test_client import execution
from tests.integration.test_daemon import Daemon

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = re.compile(r"^### Your own vocabulary\n(.*?)^## ", re.S | re.M)
BLOCK = re.compile(r"```python\n(.*?)```", re.S)

EXPECTED = [
    ("6 states", [("pending", None), ("running", None), ("timeout", None)]),
    ("9 states", [("pending", None), ("starting", None), ("running", None),
                  ("completing", None), ("completed", None)]),
    ("uppercase registry", [("pending", None), ("starting", None), ("running", None),
                            ("running", "recovering"), ("cancelled", None)]),
    ("job engine", [("pending", None), ("running", None), ("paused", "waiting_for_approval"),
                    ("running", None), ("completed", None)]),
    ("workflow", [("running", None), ("running", "reserve_stock"),
                  ("paused", "awaiting_payment"), ("running", "charge_card"),
                  ("running", "compensating"), ("failed", None)]),
]  # fmt: skip
"""The history each README block leaves, in order: (state, phase where one is named)."""


def blocks() -> list[str]:
    section = SECTION.search(README.read_text())
    assert section is not None, "README: no '### Your own vocabulary' section"
    return BLOCK.findall(section[1])


def test_every_readme_block_is_checked() -> None:
    assert len(EXPECTED) == len(blocks())


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    started = Daemon()
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.parametrize(("index", "name"), [(i, name) for i, (name, _) in enumerate(EXPECTED)])
def test_a_vocabulary_reports_as_written(daemon: Daemon, index: int, name: str) -> None:
    run_id = f"vocab-{index}-{uuid.uuid4().hex[:8]}"
    with Client(daemon.url) as client:
        exec(blocks()[index], {"client": client, "run_id": run_id})  # the README's own code
        assert client.flush()
        assert 0 == client.stats.rejected, f"{name}: the daemon refused an event"
    history = execution(daemon, run_id)["history"]
    got = [(h["to"], h.get("phase")) for h in history]
    assert EXPECTED[index][1] == got, name
