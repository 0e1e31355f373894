"""Trace identity of executions, shared by the exporters (exemplars, log lines, span links)."""

from __future__ import annotations

from collections import OrderedDict

from monitor.model import Execution, Key

MAX_ENDED = 10_000
"""Ended executions whose span context is remembered (revival links, late log lines)."""


class TraceIds:
    """(trace_id, span_id) of each execution's span, as hex: filled by the OTel exporter."""

    def __init__(self) -> None:
        self.open: dict[Key, tuple[str, str]] = {}
        self.ended: OrderedDict[Key, tuple[str, str]] = OrderedDict()

    def started(self, key: Key, trace_id: str, span_id: str) -> None:
        self.open[key] = (trace_id, span_id)
        self.ended.pop(key, None)

    def finished(self, key: Key) -> None:
        ids = self.open.pop(key, None)
        if ids is not None:
            self.ended[key] = ids
            if len(self.ended) > MAX_ENDED:
                self.ended.popitem(last=False)

    def get(self, key: Key) -> tuple[str, str] | None:
        return self.open.get(key) or self.ended.get(key)

    def trace_id(self, key: Key, ex: Execution | None) -> str | None:
        """The execution's trace id: its span's, else its caller's (from `traceparent`)."""
        ids = self.get(key)
        if ids is not None:
            return ids[0]
        if ex is not None and ex.traceparent is not None:
            return ex.traceparent[3:35]
        return None
