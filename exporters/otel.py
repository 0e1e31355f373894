"""OpenTelemetry: one span per execution, from its first event to its final state.

A live execution holds no SDK span: its ids are chosen when it registers (so logs,
exemplars and child executions can use them at once) and its span events wait in a
small record. When it ends, its finished span is built as a ReadableSpan, back-dated
to its first event, and handed to a BatchSpanProcessor (the public SpanProcessor
interface). Building it directly costs ~3 us; going through the SDK's live Span and
its attribute checks cost ~60 us per execution (measured), which ingest would feel.
Sampling follows the SDK default, ParentBased(ALWAYS_ON). At shutdown, executions
still running are exported as truncated spans.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.re import parse_env_headers

from exporters.traces import TraceIds
from monitor import __version__
from monitor.detectors.engine import Record
from monitor.events import Kind
from monitor.model import Execution, FindingChange, Key, Transition
from monitor.states import TERMINAL, ExecState
from monitor.stats import IngestStats

log = structlog.get_logger("execwatch.otel")

MAX_EVENTS = 128
"""Span events kept per execution (the SDK's default limit): heartbeats never add one."""
_OPERATION = {
    Kind.AGENT: "invoke_agent",
    Kind.TOOL: "execute_tool",
    Kind.WORKFLOW: "invoke_workflow",
    Kind.JOB: "execution",
}
_NAME_ATTRIBUTE = {
    Kind.AGENT: "gen_ai.agent.name",
    Kind.TOOL: "gen_ai.tool.name",
    Kind.WORKFLOW: "gen_ai.workflow.name",
}
_ERRORS = frozenset({ExecState.FAILED, ExecState.TIMEOUT, ExecState.DEAD})
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class CountingExporter(SpanExporter):
    """Counts (and logs) failed exports: a backend that is down must show in /metrics."""

    def __init__(self, inner: SpanExporter, stats: IngestStats, name: str) -> None:
        self.inner = inner
        self.stats = stats
        self.name = name
        stats.exporter_failures.setdefault(name, 0)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("span_export_failed", exporter=self.name, spans=len(spans))
            result = SpanExportResult.FAILURE
        else:
            if result is SpanExportResult.FAILURE:
                log.warning("span_export_failed", exporter=self.name, spans=len(spans))
        if result is SpanExportResult.FAILURE:
            self.stats.exporter_failures[self.name] += 1
        else:
            self.stats.spans_exported += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class SpanPipeline:
    """Where finished spans go: the resource they carry and the processor that exports."""

    SHUTDOWN_S = 5.0
    """Flushing at exit waits this long at most (a hung backend must not outlast the
    orchestrator's grace period); what is still queued then is lost, and counted."""

    def __init__(
        self,
        resource: Resource,
        processor: SpanProcessor,
        stats: IngestStats,
        sampler: tuple[str, float] = ("parentbased", 1.0),
    ) -> None:
        self.resource = resource
        self.processor = processor
        self.stats = stats
        self.policy, ratio = sampler
        self.bound = int(ratio * (1 << 64))

    def samples(self, trace_id: int, parent: SpanContext | None) -> bool:
        """The sampling decision for a span of trace `trace_id` under `parent`."""
        if parent is not None and self.policy == "parentbased":
            return bool(parent.trace_flags.sampled)
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < self.bound

    def emit(self, span: ReadableSpan) -> None:
        self.stats.spans_finished += 1
        self.processor.on_end(span)

    def shutdown(self) -> None:
        """Flush what is queued and stop, within SHUTDOWN_S."""
        self.processor.force_flush(int(self.SHUTDOWN_S * 1000))
        worker = threading.Thread(target=self.processor.shutdown, daemon=True)
        worker.start()
        worker.join(self.SHUTDOWN_S)


def make_span_pipeline(
    environ: Mapping[str, str],
    stats: IngestStats,
    exporter: SpanExporter | None = None,
) -> SpanPipeline | None:
    """A span pipeline when the standard OTEL_* variables ask for traces (or `exporter` is
    given, as tests do: exported synchronously), else None: OTLP/HTTP protobuf through a
    BatchSpanProcessor, configured from the OTEL_EXPORTER_OTLP_*, OTEL_BSP_*,
    OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES variables in `environ`."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    configured = any(
        name in environ
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    choice = environ.get("OTEL_TRACES_EXPORTER", "otlp" if configured else "none")
    if exporter is None and choice == "none":
        return None
    resource = Resource.create(_resource_attributes(environ))
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "execwatch"}))
    sampler = sampler_from(environ)
    if exporter is not None:
        processor: SpanProcessor = SimpleSpanProcessor(CountingExporter(exporter, stats, "test"))
        return SpanPipeline(resource, processor, stats, sampler)
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    )
    if choice == "otlp" and protocol != "http/protobuf":
        log.error(
            "otel_protocol_unsupported", protocol=protocol,
            detail="execwatch exports OTLP over http/protobuf only (port 4318); "
            "set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf. Tracing is off.",
        )  # fmt: skip
        return None
    if choice == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        inner: SpanExporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        inner = OTLPSpanExporter(
            endpoint=_endpoint(environ),
            timeout=_number(
                environ, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"
            ),
            headers=_headers(environ),
        )
    processor = BatchSpanProcessor(
        CountingExporter(inner, stats, choice),
        schedule_delay_millis=_number(environ, "OTEL_BSP_SCHEDULE_DELAY"),
        max_queue_size=_integer(environ, "OTEL_BSP_MAX_QUEUE_SIZE"),
        max_export_batch_size=_integer(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
        export_timeout_millis=_number(environ, "OTEL_BSP_EXPORT_TIMEOUT"),
    )
    return SpanPipeline(resource, processor, stats, sampler)


# The SDK reads these from os.environ itself; reading them from the mapping we are given
# keeps make_app free of the process environment (and lets tests point it at a receiver).


def _endpoint(environ: Mapping[str, str]) -> str | None:
    if "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in environ:
        return environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]  # used as it is
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return None if base is None else base.rstrip("/") + "/v1/traces"


def _number(environ: Mapping[str, str], *names: str) -> Any:
    for name in names:
        if name in environ:
            try:
                return float(environ[name])
            except ValueError:
                log.warning("otel_setting_ignored", variable=name, value=environ[name])
    return None


def _integer(environ: Mapping[str, str], name: str) -> int | None:
    value = _number(environ, name)
    return None if value is None else int(value)


def _headers(environ: Mapping[str, str]) -> dict[str, str] | None:
    text = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS", environ.get("OTEL_EXPORTER_OTLP_HEADERS")
    )
    return dict(parse_env_headers(text, liberal=True)) if text else None  # percent-decoded


def sampler_from(environ: Mapping[str, str]) -> tuple[str, float]:
    """(policy, ratio) from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG; the SDK default is
    parentbased_always_on. Root spans are kept when trace_id's low 64 bits fall under the
    ratio (the SDK's TraceIdRatioBased rule); children follow their parent when parentbased."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    ratio = 1.0
    if name.endswith("always_off"):
        ratio = 0.0
    elif name.endswith("traceidratio"):
        ratio = _number(environ, "OTEL_TRACES_SAMPLER_ARG")
        ratio = 1.0 if ratio is None else min(1.0, max(0.0, ratio))
    elif not name.endswith("always_on"):
        log.warning("otel_sampler_unsupported", sampler=name, using="parentbased_always_on")
        name = "parentbased_always_on"
    return ("parentbased" if name.startswith("parentbased") else "root"), ratio


def _resource_attributes(environ: Mapping[str, str]) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        if "=" in item:
            key, value = item.split("=", 1)
            attributes[key.strip()] = value.strip()
    if "OTEL_SERVICE_NAME" in environ:
        attributes["service.name"] = environ["OTEL_SERVICE_NAME"]
    return attributes


class Pending:
    """An execution's span before it ends: its identity and its events so far."""

    __slots__ = (
        "attributes",
        "dropped",
        "events",
        "links",
        "name",
        "parent",
        "sampled",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(
        self, name: str, start_ns: int, parent: SpanContext | None, trace_id: int, span_id: int
    ) -> None:
        self.name = name
        self.start_ns = start_ns
        self.parent = parent
        self.trace_id = trace_id
        self.span_id = span_id
        self.attributes: dict[str, Any] = {}
        self.events: list[Event] = []
        self.links: list[Link] = []
        self.sampled = True
        self.dropped = 0


class SpanSink:
    """Turns the records of every batch into spans (a sink of the ingest path)."""

    name = "otel"

    def __init__(
        self,
        pipeline: SpanPipeline,
        traces: TraceIds,
        lookup: Callable[[Key], Execution | None],
    ) -> None:
        self.pipeline = pipeline
        self.scope = InstrumentationScope("execwatch", __version__)
        self.random = RandomIdGenerator()
        self.traces = traces
        self.lookup = lookup
        self.pending: dict[Key, Pending] = {}

    def __call__(self, records: Sequence[Record]) -> None:
        for record in records:
            if type(record) is Transition:
                self._transition(record)
            elif type(record) is FindingChange:
                pending = self.pending.get(record.key)
                if pending is not None:
                    self._event(pending, "execwatch.finding", {
                        "execwatch.finding.name": record.finding,
                        "execwatch.finding.raised": record.raised,
                        "execwatch.finding.detail": record.detail,
                    }, record.since if record.raised else record.detected_at)  # fmt: skip

    def _transition(self, t: Transition) -> None:
        key = t.key
        pending = self.pending.get(key)
        if pending is None:  # registration, a revival, or an execution from before a restart
            pending = self._start(t)
        if t.old == t.new:
            self._event(pending, "execwatch.phase", {"execwatch.phase": t.phase or ""}, t.at)
        else:
            attributes: dict[str, Any] = {"execwatch.state.to": t.new.value}
            if t.old is not None:
                attributes["execwatch.state.from"] = t.old.value
            if t.reason is not None:
                attributes["execwatch.reason"] = t.reason
            if t.phase is not None:
                attributes["execwatch.phase"] = t.phase
            self._event(pending, "execwatch.transition", attributes, t.at)
        if t.new in TERMINAL:
            self._end(key, t)

    def _start(self, t: Transition) -> Pending:
        ex = self.lookup(t.key)
        parent = self._parent(ex, t)
        restored_at = self.traces.restored.pop(t.key, None)
        previous_ids = self.traces.get(t.key) if restored_at is not None else None
        if previous_ids is not None and not t.revived:
            # Replayed after a restart: the span before it was exported truncated (or lost
            # with the process); this one continues the same trace from the restart.
            trace_id = int(previous_ids[0], 16)
            sampled = self.traces.sampled(t.key)
            start = min(restored_at or t.at, t.at)
        else:
            previous_ids = None
            trace_id = parent.trace_id if parent is not None else self.random.generate_trace_id()
            sampled = self.pipeline.samples(trace_id, parent)
            start = ex.created_at if ex is not None and t.old is None else t.at
        span_id = self.random.generate_span_id()
        operation = _OPERATION[t.kind]
        pending = Pending(f"{operation} {t.agent}", _ns(start), parent, trace_id, span_id)
        pending.sampled = sampled
        pending.attributes = self._attributes(ex, t)
        if previous_ids is not None:
            pending.attributes["execwatch.span.continued"] = True
            pending.links.append(
                Link(_context(*previous_ids), {"execwatch.link.reason": "continued_from"})
            )
        if t.revived:
            previous = self.traces.get(t.key)
            if previous is not None:
                pending.links.append(
                    Link(_context(*previous), {"execwatch.link.reason": "revived_from"})
                )
        self.traces.started(t.key, f"{trace_id:032x}", f"{span_id:016x}", sampled)
        self.pending[t.key] = pending
        return pending

    def _parent(self, ex: Execution | None, t: Transition) -> SpanContext | None:
        """The caller's span (traceparent, validated at the edge), else the span of the
        execution that spawned this one."""
        if ex is not None and ex.traceparent is not None:
            _, trace_hex, span_hex, flags = ex.traceparent.split("-")
            return SpanContext(
                int(trace_hex, 16), int(span_hex, 16), is_remote=True,
                trace_flags=TraceFlags(int(flags, 16) & TraceFlags.SAMPLED),
            )  # fmt: skip
        if ex is not None and ex.parent_id is not None:
            parent_key = (t.tenant, ex.parent_id)
            ids = self.traces.get(parent_key)
            if ids is not None:
                return _context(*ids, sampled=self.traces.sampled(parent_key))
        return None

    @classmethod
    def _attributes(cls, ex: Execution | None, t: Transition) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "execwatch.execution.id": t.execution_id,
            "execwatch.tenant": t.tenant,
            "execwatch.agent": t.agent,
            "execwatch.kind": t.kind.value,
        }
        if t.kind is not Kind.JOB:
            attributes["gen_ai.operation.name"] = _OPERATION[t.kind]
            attributes[_NAME_ATTRIBUTE[t.kind]] = t.agent
        attributes.update(cls._detail(ex))
        return attributes

    @staticmethod
    def _detail(ex: Execution | None) -> dict[str, Any]:
        """What the execution told about itself; `gen_ai.*` keys pass through as they are."""
        attributes: dict[str, Any] = {}
        if ex is not None:
            if ex.parent_id is not None:
                attributes["execwatch.parent.id"] = ex.parent_id
            for name, value in ex.attributes.items():
                if value is not None:
                    key = name if name.startswith("gen_ai.") else f"execwatch.attributes.{name}"
                    # OTLP integers are 64-bit: a larger one is kept as a string.
                    big = type(value) is int and not -(2**63) <= value < 2**63
                    attributes[key] = str(value) if big else value
        return attributes

    @staticmethod
    def _event(pending: Pending, name: str, attributes: dict[str, Any], at: float) -> None:
        """Keep at most MAX_EVENTS; when full, phases give way to transitions and findings
        (the final transition must never be the one lost)."""
        events = pending.events
        if len(events) >= MAX_EVENTS:
            pending.dropped += 1
            if name == "execwatch.phase":
                return
            for index, event in enumerate(events):
                if event.name == "execwatch.phase":
                    del events[index]
                    break
            else:
                return
        events.append(Event(name, attributes, _ns(at)))

    def _end(self, key: Key, t: Transition | None, truncated_at: float | None = None) -> None:
        pending = self.pending.pop(key)
        self.traces.finished(key)
        if not pending.sampled:
            return  # the caller's trace is not sampled: neither is this part of it
        attributes = pending.attributes
        attributes.update(self._detail(self.lookup(key)))  # attributes sent later
        if pending.dropped:
            attributes["execwatch.events.dropped"] = pending.dropped
        status = _OK
        if t is None:
            attributes["execwatch.span.truncated"] = True
            end = truncated_at if truncated_at is not None else time.time()
        else:
            attributes["execwatch.state"] = t.new.value
            if t.new in _ERRORS:
                error_type, description = self._error(key, t)
                attributes["error.type"] = error_type
                status = Status(StatusCode.ERROR, description)
            end = t.at
        self.pipeline.emit(
            ReadableSpan(
                name=pending.name,
                context=SpanContext(
                    pending.trace_id, pending.span_id, is_remote=False, trace_flags=_SAMPLED
                ),
                parent=pending.parent,
                resource=self.pipeline.resource,
                attributes=attributes,
                events=pending.events,
                links=pending.links,
                kind=SpanKind.INTERNAL,
                status=status,
                start_time=pending.start_ns,
                end_time=max(_ns(end), pending.start_ns),
                instrumentation_scope=self.scope,
            )
        )

    def _error(self, key: Key, t: Transition) -> tuple[str, str]:
        """A low-cardinality error.type and a short description."""
        if t.new is ExecState.DEAD:
            return "heartbeat_timeout", "no heartbeat within heartbeat_timeout_s"
        if t.new is ExecState.TIMEOUT:
            return t.reason or "timeout", f"timed out ({t.reason or 'reported'})"
        if t.reason is not None:
            return t.reason, t.reason.replace("_", " ")
        ex = self.lookup(key)
        error = None if ex is None else ex.error
        if isinstance(error, dict):
            kind = error.get("type")
            message = error.get("message")
            return (str(kind) if kind else "failed"), str(message or kind or "failed")[:256]
        if isinstance(error, str):
            return "failed", error[:256]
        return "failed", "failed"

    def close(self) -> None:
        """Export the spans of executions still running (truncated), then flush."""
        now = time.time()
        for key in list(self.pending):
            self._end(key, None, now)
        self.pipeline.shutdown()


def _context(trace_hex: str, span_hex: str, sampled: bool = True) -> SpanContext:
    flags = _SAMPLED if sampled else TraceFlags(0)
    return SpanContext(int(trace_hex, 16), int(span_hex, 16), is_remote=False, trace_flags=flags)


def tracing_environ() -> Mapping[str, str]:
    """The OTEL_* variables: the SDK reads them itself, so they bypass execwatch's settings."""
    return {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
