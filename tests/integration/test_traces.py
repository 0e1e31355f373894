"""Traces: one back-dated span per execution, in-memory and over real OTLP/HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from monitor.config import build_settings
from monitor.server.app import make_app
from monitor.server.keys import INGESTOR
from monitor.store.sqlite import SqliteStore
from monitor.testing import EPOCH, FakeClock, heartbeat, state_event
from tests.integration.test_api import post
from tests.integration.test_detectors_api import tick

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


async def traced(aiohttp_client: Any, clock: FakeClock, spans: InMemorySpanExporter,
                 config: dict[str, Any] | None = None) -> Any:  # fmt: skip
    app = make_app(build_settings(config or {}), clock=clock, run_detectors=False,
                   span_exporter=spans)  # fmt: skip
    return await aiohttp_client(app)


def by_name(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans.get_finished_spans()}


async def test_an_execution_is_one_back_dated_span_in_its_callers_trace(
    aiohttp_client: Any, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    """Named by kind, parented on traceparent, dated by the events, with their events."""
    client = await traced(aiohttp_client, clock, spans)
    await post(client, [
        state_event("p", "queued", agent="planner", ts=EPOCH - 10, traceparent=TRACEPARENT,
                    attributes={"gen_ai.request.model": "m-1", "team": "search"}),
        state_event("p", "running", ts=EPOCH - 8),
        state_event("p", "running", phase="thinking", ts=EPOCH - 7),
        state_event("p", "completed", ts=EPOCH - 2),
    ])  # fmt: skip
    span = by_name(spans)["invoke_agent planner"]
    assert (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7) == (
        span.context.trace_id,
        span.parent.span_id if span.parent else None,
    )
    assert (int((EPOCH - 10) * 1e9), int((EPOCH - 2) * 1e9)) == (span.start_time, span.end_time)
    assert StatusCode.UNSET == span.status.status_code
    attributes = dict(span.attributes or {})
    expected = {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner",
        "gen_ai.request.model": "m-1", "execwatch.attributes.team": "search",
        "execwatch.execution.id": "p", "execwatch.tenant": "default",
    }  # fmt: skip
    assert expected.items() <= attributes.items()
    assert ["execwatch.transition", "execwatch.transition", "execwatch.phase",
            "execwatch.transition"] == [e.name for e in span.events]  # fmt: skip


async def test_a_child_execution_is_a_child_span_and_errors_say_why(
    aiohttp_client: Any, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    """parent_id makes a span tree; failed is ERROR with error.type from the error."""
    client = await traced(aiohttp_client, clock, spans)
    await post(client, [
        state_event("wf", "running", agent="pipeline", kind="workflow"),
        state_event("t1", "running", agent="search", kind="tool", parent_id="wf"),
        state_event("t1", "failed", error={"type": "ValueError", "message": "bad query"}),
        state_event("wf", "completed"),
    ])  # fmt: skip
    found = by_name(spans)
    workflow, tool = found["invoke_workflow pipeline"], found["execute_tool search"]
    assert tool.parent is not None
    assert (workflow.context.trace_id, workflow.context.span_id) == (
        tool.context.trace_id,
        tool.parent.span_id,
    )
    assert (StatusCode.ERROR, "bad query", "ValueError") == (
        tool.status.status_code,
        tool.status.description,
        (tool.attributes or {})["error.type"],
    )


async def test_a_death_ends_the_span_and_a_revival_links_a_new_one(
    aiohttp_client: Any, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    """dead: ERROR heartbeat_timeout at the deadline; revived: a new span linked to it."""
    client = await traced(aiohttp_client, clock, spans,
                          {"defaults": {"heartbeat_timeout_s": 5}})  # fmt: skip
    await post(client, state_event("r", "running", agent="a", kind="job"))
    await tick(client, clock, 6)
    dead = spans.get_finished_spans()[0]
    assert ("execution a", StatusCode.ERROR, "heartbeat_timeout") == (
        dead.name,
        dead.status.status_code,
        (dead.attributes or {})["error.type"],
    )
    assert int((EPOCH + 5) * 1e9) == dead.end_time
    await post(client, heartbeat("r"))
    await post(client, state_event("r", "completed"))
    revived = spans.get_finished_spans()[1]
    assert [dead.context.span_id] == [link.context.span_id for link in revived.links]
    assert "revived_from" == (revived.links[0].attributes or {})["execwatch.link.reason"]
    assert ("execution a", StatusCode.UNSET) == (revived.name, revived.status.status_code)


async def test_findings_are_span_events_and_running_spans_are_kept_at_shutdown(
    aiohttp_client: Any, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    """A stall shows on the span; executions still running at shutdown are exported truncated."""
    client = await traced(aiohttp_client, clock, spans,
                          {"defaults": {"stall_timeout_s": 2}})  # fmt: skip
    await post(client, state_event("r", "running", agent="a"))
    clock.advance(1)
    await post(client, heartbeat("r"))
    await tick(client, clock, 1.5)
    await client.close()  # the app's cleanup exports what is still open
    (span,) = spans.get_finished_spans()
    assert (span.attributes or {})["execwatch.span.truncated"] is True
    assert "execwatch.finding" in [e.name for e in span.events]


class Receiver:
    """A real OTLP/HTTP endpoint on loopback that decodes what it receives."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[ExportTraceServiceRequest] = []

    async def handle(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        self.requests.append(message)
        return web.Response(status=self.status, body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[Any]:
        return [span for r in self.requests for rs in r.resource_spans
                for ss in rs.scope_spans for span in ss.spans]  # fmt: skip


@pytest.fixture
async def receiver(aiohttp_server: Any) -> tuple[Receiver, str]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.handle)
    server = await aiohttp_server(app)
    return found, f"http://127.0.0.1:{server.port}/v1/traces"


async def test_spans_arrive_as_a_tree_over_real_otlp_http(
    aiohttp_client: Any, clock: FakeClock, receiver: tuple[Receiver, str]
) -> None:
    """OTLP/HTTP protobuf on a loopback receiver: parent and child, status and events."""
    found, url = receiver
    environ = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    app = make_app(build_settings({}), clock=clock, run_detectors=False, otel_environ=environ)
    client = await aiohttp_client(app)
    await post(client, [
        state_event("parent", "running", agent="planner"),
        state_event("child", "running", agent="search", kind="tool", parent_id="parent"),
        state_event("child", "timeout"),
        state_event("parent", "completed"),
    ])  # fmt: skip
    await client.close()  # shutdown flushes the batch processor
    spans = {span.name: span for span in found.spans()}
    parent, child = spans["invoke_agent planner"], spans["execute_tool search"]
    assert (parent.trace_id, parent.span_id) == (child.trace_id, child.parent_span_id)
    assert 2 == child.status.code  # STATUS_CODE_ERROR
    assert ["execwatch.transition", "execwatch.transition"] == [e.name for e in child.events]
    resource = found.requests[0].resource_spans[0].resource
    assert "execwatch" in [a.value.string_value for a in resource.attributes
                           if a.key == "service.name"]  # fmt: skip


async def test_a_tracing_backend_that_is_down_is_counted_and_ingest_goes_on(
    aiohttp_client: Any, clock: FakeClock
) -> None:
    """Nothing listens on the OTLP port: exports fail, are counted, and ingestion is fine."""
    environ = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces",
               "OTEL_EXPORTER_OTLP_TIMEOUT": "1", "OTEL_BSP_SCHEDULE_DELAY": "50"}  # fmt: skip
    app = make_app(build_settings({}), clock=clock, run_detectors=False, otel_environ=environ)
    client = await aiohttp_client(app)
    for i in range(3):
        await post(client, [state_event(f"r{i}", "running", agent="a"),
                            state_event(f"r{i}", "completed")])  # fmt: skip
    stats = client.app[INGESTOR].stats
    for _ in range(300):
        if stats.exporter_failures["otlp"]:
            break
        await asyncio.sleep(0.02)
    assert stats.exporter_failures["otlp"] >= 1
    assert 202 == (await client.post("/v1/events", json=state_event("r9", "running",
                                                                    agent="a"))).status  # fmt: skip


async def test_an_unsampled_caller_means_no_spans_for_it_or_its_children(
    aiohttp_client: Any, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    """traceparent flags 00: neither the execution nor its child is exported (no orphans)."""
    client = await traced(aiohttp_client, clock, spans)
    unsampled = TRACEPARENT[:-2] + "00"
    await post(client, [
        state_event("p", "running", agent="planner", traceparent=unsampled),
        state_event("c", "running", agent="tool", kind="tool", parent_id="p"),
        state_event("c", "completed"), state_event("p", "completed"),
        state_event("solo", "running", agent="other"), state_event("solo", "completed"),
    ])  # fmt: skip
    assert ["invoke_agent other"] == [s.name for s in spans.get_finished_spans()]


@pytest.mark.parametrize(
    ("environ", "exported"),
    [({"OTEL_TRACES_SAMPLER": "always_off"}, 0),
     ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, 0),
     ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"}, 5)],
)  # fmt: skip
async def test_the_sampler_comes_from_the_environment(
    aiohttp_client: Any, clock: FakeClock, spans: InMemorySpanExporter,
    environ: dict[str, str], exported: int,
) -> None:  # fmt: skip
    """OTEL_TRACES_SAMPLER and its argument decide which roots are kept."""
    app = make_app(build_settings({}), clock=clock, run_detectors=False, span_exporter=spans,
                   otel_environ=environ)  # fmt: skip
    client = await aiohttp_client(app)
    for i in range(5):
        await post(client, [state_event(f"r{i}", "running", agent="a"),
                            state_event(f"r{i}", "completed")])  # fmt: skip
    assert exported == len(spans.get_finished_spans())


async def test_the_final_transition_survives_a_flood_of_phases(
    aiohttp_client: Any, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    """Past 128 events, phases give way: the end is always on the span, drops counted."""
    client = await traced(aiohttp_client, clock, spans)
    await post(client, [state_event("r", "running", agent="a"),
                        *[state_event("r", "running", phase=f"p{i}") for i in range(200)],
                        state_event("r", "failed", attributes={"huge": 2**63 + 5})])  # fmt: skip
    (span,) = spans.get_finished_spans()
    assert 128 == len(span.events)
    assert ("execwatch.transition", "failed") == (
        span.events[-1].name,
        (span.events[-1].attributes or {})["execwatch.state.to"],
    )
    attributes = span.attributes or {}
    assert (74, str(2**63 + 5)) == (
        attributes["execwatch.events.dropped"],
        attributes["execwatch.attributes.huge"],
    )


def test_otlp_settings_follow_the_sdk() -> None:
    """Headers are percent-decoded; a protocol other than http/protobuf turns tracing off."""
    from exporters.otel import _headers, make_span_pipeline
    from monitor.stats import IngestStats

    assert {"authorization": "Basic abc"} == _headers(
        {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Basic%20abc"}
    )
    grpc = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}  # fmt: skip
    assert make_span_pipeline(grpc, IngestStats()) is None


async def test_a_restart_continues_the_executions_trace(
    aiohttp_client: Any, clock: FakeClock, tmp_path: Path
) -> None:
    """The span context is in the SQLite file: after a restart, an execution's next span
    is in the same trace, under the same parent, linked to the span cut by the restart."""
    before, after = InMemorySpanExporter(), InMemorySpanExporter()

    def app(exporter: InMemorySpanExporter) -> web.Application:
        return make_app(build_settings({}), clock=clock, run_detectors=False,
                        span_exporter=exporter, store=SqliteStore(tmp_path / "x.db"))  # fmt: skip

    client = await aiohttp_client(app(before))
    await post(client, state_event("r", "running", agent="a", traceparent=TRACEPARENT))
    await post(client, state_event("s", "running", agent="a"))  # no caller: its own trace
    clock.advance(5)
    await client.close()  # shutdown: the spans of r and s are exported truncated
    cut = {s.attributes["execwatch.execution.id"]: s for s in before.get_finished_spans()}

    clock.advance(10)
    restarted_at = clock()
    client = await aiohttp_client(app(after))
    clock.advance(3)
    await post(client, [state_event("r", "completed"), state_event("s", "completed")])
    ended = {s.attributes["execwatch.execution.id"]: s for s in after.get_finished_spans()}
    for name in ("r", "s"):
        span, previous = ended[name], cut[name]
        assert previous.attributes["execwatch.span.truncated"] is True
        assert previous.context.trace_id == span.context.trace_id, name
        assert previous.context.span_id != span.context.span_id
        assert (previous.parent and previous.parent.span_id) == (
            span.parent and span.parent.span_id
        )
        assert [(previous.context.span_id, "continued_from")] == [
            (link.context.span_id, link.attributes["execwatch.link.reason"]) for link in span.links
        ]
        assert span.attributes["execwatch.span.continued"] is True
        assert restarted_at * 1e9 == span.start_time
        assert "completed" == span.attributes["execwatch.state"]
    assert int(TRACEPARENT[3:35], 16) == ended["r"].context.trace_id
