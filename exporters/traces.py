"""Trace identity of executions, shared by the exporters (exemplars, log lines, span links)."""

from __future__ import annotations

from collections import OrderedDict

from monitor.model import Execution, Key

MAX_ENDED = 100_000
"""Ended executions whose span context is remembered (revival links, late log lines)."""


class TraceIds:
    """(trace_id, span_id) of each execution's span, as hex: filled by the OTel exporter."""

    def __init__(self) -> None:
        self.open: dict[Key, tuple[str, str]] = {}
        self.ended: OrderedDict[Key, tuple[str, str]] = OrderedDict()
        self.unsampled: set[Key] = set()
        """Executions whose trace is not sampled: their spans are never exported."""
        self.unsaved: dict[Key, tuple[str, str, bool]] = {}
        """Span contexts started since the store last took them."""
        self.restored: dict[Key, float] = {}
        """Executions replayed from the store with their span context, and when: their
        next span continues the trace instead of starting a new one."""

    def started(self, key: Key, trace_id: str, span_id: str, sampled: bool = True) -> None:
        self.unsaved[key] = (trace_id, span_id, sampled)
        self._open(key, trace_id, span_id, sampled)

    def take_unsaved(self) -> list[tuple[Key, tuple[str, str, bool]]]:
        """Hand the new span contexts to the store (it keeps those of live executions)."""
        unsaved, self.unsaved = self.unsaved, {}
        return list(unsaved.items())

    def return_unsaved(self, contexts: list[tuple[Key, tuple[str, str, bool]]]) -> None:
        """The commit failed: the contexts are owed to the next one."""
        for key, context in contexts:
            self.unsaved.setdefault(key, context)

    def restore(self, contexts: list[tuple[Key, tuple[str, str, bool]]], now: float) -> int:
        """Put back the span contexts of a replay; return how many."""
        for key, (trace_id, span_id, sampled) in contexts:
            self._open(key, trace_id, span_id, sampled)
            self.restored[key] = now
        return len(contexts)

    def _open(self, key: Key, trace_id: str, span_id: str, sampled: bool) -> None:
        self.open[key] = (trace_id, span_id)
        self.ended.pop(key, None)
        if sampled:
            self.unsampled.discard(key)
        else:
            self.unsampled.add(key)

    def finished(self, key: Key) -> None:
        self.restored.pop(key, None)
        ids = self.open.pop(key, None)
        if ids is not None:
            self.ended[key] = ids
            if len(self.ended) > MAX_ENDED:
                gone, _ = self.ended.popitem(last=False)
                self.unsampled.discard(gone)

    def get(self, key: Key) -> tuple[str, str] | None:
        return self.open.get(key) or self.ended.get(key)

    def sampled(self, key: Key) -> bool:
        return key not in self.unsampled

    def trace_id(self, key: Key, ex: Execution | None) -> str | None:
        """The execution's trace id: its span's, else its caller's (from `traceparent`)."""
        ids = self.get(key)
        if ids is not None:
            return ids[0]
        if ex is not None and ex.traceparent is not None:
            return ex.traceparent[3:35]
        return None

    def exemplar_trace_id(self, key: Key, ex: Execution | None) -> str | None:
        """The trace id worth linking from a metric: only a trace that is being recorded."""
        if not (self.open or self.ended) and (ex is None or ex.traceparent is None):
            return None  # no tracing, no caller's trace: the common case, answered at once
        if key in self.unsampled:
            return None
        if self.get(key) is None and ex is not None and ex.traceparent is not None:
            sampled = int(ex.traceparent[-2:], 16) & 1
            return ex.traceparent[3:35] if sampled else None
        return self.trace_id(key, ex)
