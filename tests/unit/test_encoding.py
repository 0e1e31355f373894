"""Kept JSON is right-sized."""

from __future__ import annotations

import tracemalloc

import orjson

from monitor.encoding import compact_json


def held_per_object(make: object) -> float:
    tracemalloc.start()
    try:
        kept = [make() for _ in range(200)]  # type: ignore[operator]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 200 == len(kept)
    return held / 200


def test_compact_json_holds_its_size_not_orjsons_buffer() -> None:
    """orjson's bytes hold its whole output buffer; a copy holds the document."""
    doc = [1, 1.5, None, False, "x"]
    assert orjson.dumps(doc) == compact_json(doc)
    assert held_per_object(lambda: compact_json(doc)) < 200  # orjson 3.13's own: ~4,100
