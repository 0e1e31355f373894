"""Parsing at the edge: every error names the field, the bad value and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from monitor import events
from monitor.errors import BodyError, EventError
from monitor.events import Event, EventType, Kind, decode_body, parse_event, parse_ts, to_wire
from monitor.states import ExecState, StateNames
from monitor.testing import EPOCH, heartbeat, state_event

NAMES = StateNames()


def parse(obj: Any, tenant: str | None = None) -> Event:
    return parse_event(obj, EPOCH, NAMES, tenant)


def rejects(obj: Any) -> EventError:
    with pytest.raises(EventError) as caught:
        parse(obj)
    return caught.value


def test_a_minimal_heartbeat_parses_with_defaults() -> None:
    """Tenant defaults to 'default' and the time to the time received."""
    event = parse(heartbeat("run-1"))
    assert EventType.HEARTBEAT == event.type
    assert ("run-1", "default", EPOCH, EPOCH) == (
        event.execution_id,
        event.tenant,
        event.at,
        event.received_at,
    )


def test_a_full_state_event_keeps_every_field() -> None:
    """Every documented field survives parsing with its type."""
    event = parse(
        state_event(
            "run-1",
            "RECOVERING",
            agent="triage",
            tenant="team-a",
            ts=EPOCH - 5,
            event_id="e-1",
            seq=7,
            kind="workflow",
            parent_id="run-0",
            run_timeout_s=300,
            heartbeat_timeout_s=2.5,
            memory_limit_bytes=1024,
            pid=42,
            rss_bytes=0,
            progress="step-3",
            error={"type": "ValueError"},
            attributes={"model": "x", "n": 1},
            traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
    )
    assert ExecState.RUNNING == event.state
    assert "recovering" == event.phase  # the alias implies the phase
    assert Kind.WORKFLOW == event.kind
    assert {"run_timeout_s": 300.0, "heartbeat_timeout_s": 2.5} == event.limits
    assert (EPOCH - 5, 7, 42, 0, "step-3") == (
        event.at,
        event.seq,
        event.pid,
        event.rss_bytes,
        event.progress,
    )


def test_an_explicit_phase_wins_over_the_alias_phase() -> None:
    """`recovering` implies a phase, but the sender's own phase is kept."""
    assert "replaying" == parse(state_event("r", "recovering", agent="a", phase="replaying")).phase


def test_tenant_defaults_to_the_one_given_by_the_caller() -> None:
    """The token's tenant is assumed when the event names none."""
    assert "team-b" == parse(heartbeat("r"), tenant="team-b").tenant


@pytest.mark.parametrize(
    ("obj", "field", "reason", "words"),
    [
        ([], "event", "invalid_event", "must be a JSON object, got array"),
        ({"execution_id": "r"}, "type", "missing_field", "'state' or 'heartbeat'"),
        ({"type": "ping", "execution_id": "r"}, "type", "invalid_field", "got string 'ping'"),
        ({"type": "heartbeat"}, "execution_id", "missing_field", "is required"),
        (heartbeat("has space"), "execution_id", "invalid_field", "[A-Za-z0-9._:-]"),
        (heartbeat("x" * 129), "execution_id", "invalid_field", "1-128"),
        (heartbeat(""), "execution_id", "invalid_field", "1-128"),
        (heartbeat(7), "execution_id", "invalid_field", "got number 7"),
        ({"type": "state", "execution_id": "r"}, "state", "missing_field", "canonical states"),
        (
            state_event("r", "exploded"),
            "state",
            "unknown_state",
            "canonical states: pending, starting, running, paused, completing, completed, failed, "
            "timeout, cancelled, dead",
        ),
        (state_event("r", 3), "state", "unknown_state", "unknown state number 3;"),
        (heartbeat("r", state="running"), "state", "invalid_field", "belongs on state events"),
        (heartbeat("r", agent=""), "agent", "invalid_field", "1-128 printable"),
        (heartbeat("r", agent="a" * 129), "agent", "invalid_field", "1-128 printable"),
        (heartbeat("r", agent="a\nb"), "agent", "invalid_field", "printable"),
        (heartbeat("r", tenant="t/1"), "tenant", "invalid_field", "[A-Za-z0-9._:-]"),
        (heartbeat("r", ts="yesterday"), "ts", "invalid_field", "RFC 3339"),
        (heartbeat("r", ts="2026-11-21T10:00:00"), "ts", "invalid_field", "RFC 3339"),
        (heartbeat("r", ts="0001-01-01T00:00:00Z"), "ts", "invalid_field", "from 0 to"),
        (heartbeat("r", pid="12"), "pid", "invalid_field", "got string '12'"),
        (heartbeat("r", error={"k" * 20000: 1}), "error", "invalid_field", "16384 characters"),
        (
            heartbeat("r", error={f"k{i}": "v" * 4000 for i in range(5)}),
            "error",
            "invalid_field",
            "16384 characters",
        ),
        (heartbeat("r", ts=-1), "ts", "invalid_field", "epoch seconds"),
        (heartbeat("r", ts=True), "ts", "invalid_field", "got boolean True"),
        (heartbeat("r", ts=1e300), "ts", "invalid_field", "253402300799"),
        (heartbeat("r", seq=-1), "seq", "invalid_field", "integer >= 0"),
        (heartbeat("r", seq=1.5), "seq", "invalid_field", "integer >= 0"),
        (heartbeat("r", seq=True), "seq", "invalid_field", "got boolean True"),
        (heartbeat("r", seq=2**63), "seq", "invalid_field", "<= 9223372036854775807"),
        (heartbeat("r", kind="daemon"), "kind", "invalid_field", "agent, job, workflow, tool"),
        (heartbeat("r", parent_id="a b"), "parent_id", "invalid_field", "[A-Za-z0-9._:-]"),
        (heartbeat("r", run_timeout_s=0), "run_timeout_s", "invalid_field", "> 0"),
        (heartbeat("r", stall_timeout_s="5"), "stall_timeout_s", "invalid_field", "> 0"),
        (
            heartbeat("r", heartbeat_timeout_s=float("inf")),
            "heartbeat_timeout_s",
            "invalid_field",
            "finite",
        ),
        (heartbeat("r", memory_limit_bytes=0), "memory_limit_bytes", "invalid_field", ">= 1"),
        (heartbeat("r", pid=0), "pid", "invalid_field", ">= 1"),
        (heartbeat("r", rss_bytes=-5), "rss_bytes", "invalid_field", ">= 0"),
        (heartbeat("r", progress=[1]), "progress", "invalid_field", "number or a string"),
        (heartbeat("r", progress=float("nan")), "progress", "invalid_field", "finite"),
        (heartbeat("r", error=5), "error", "invalid_field", "string or an object"),
        (heartbeat("r", error="e" * 5000), "error", "invalid_field", "4096"),
        (heartbeat("r", error={"a": [[[[[[[[[[1]]]]]]]]]]}), "error", "invalid_field", "nested"),
        (heartbeat("r", attributes=[1]), "attributes", "invalid_field", "must be an object"),
        (
            heartbeat("r", attributes={"k": {"nested": 1}}),
            "attributes",
            "invalid_field",
            "string, number, boolean or null",
        ),
        (
            heartbeat("r", attributes={f"k{i}": i for i in range(65)}),
            "attributes",
            "invalid_field",
            "at most 64",
        ),
        (heartbeat("r", attributes={"k": "v" * 2000}), "attributes", "invalid_field", "1024"),
        (heartbeat("r", traceparent="00-abc"), "traceparent", "invalid_field", "W3C"),
        (
            heartbeat("r", traceparent="00-" + "0" * 32 + "-00f067aa0ba902b7-01"),
            "traceparent",
            "invalid_field",
            "W3C",
        ),
        (heartbeat("r", colour="red"), "colour", "unknown_field", "allowed fields: agent,"),
    ],
)
def test_each_bad_field_is_named_with_its_value_and_what_is_allowed(
    obj: Any, field: str, reason: str, words: str
) -> None:
    """The error names the field, carries a metric reason and says what was allowed."""
    error = rejects(obj)
    assert (field, reason, 422) == (error.field, error.reason, error.status)
    assert words in error.message


def test_names_are_shared_once_valid_and_still_checked_when_many() -> None:
    """Agents and phases are kept as one shared string each; past the remembered count they
    are still checked, and a bad one is refused wherever it comes."""
    events._known_names.clear()  # other tests may have filled it
    first = parse(heartbeat("r1", agent="".join(["plan", "ner"]), phase="sea" + "rch"))
    second = parse(heartbeat("r2", agent="".join(["plan", "ner"]), phase="sea" + "rch"))
    assert (first.agent, first.phase) == ("planner", "search")
    assert second.agent is first.agent
    assert second.phase is first.phase
    try:
        for i in range(events.MAX_KNOWN_NAMES + 10):
            assert f"agent-{i}" == parse(heartbeat("r", agent=f"agent-{i}")).agent
        assert events.MAX_KNOWN_NAMES == len(events._known_names)
        for bad in ("", "tab\there", ["planner"], {"a": 1}, 7):
            error = rejects(heartbeat("r", agent=bad))
            assert ("agent", 422) == (error.field, error.status)
    finally:
        events._known_names.clear()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-21T10:00:00Z", 1795255200.0),
        ("2026-11-21t10:00:00z", 1795255200.0),
        ("2026-11-21T12:00:00+02:00", 1795255200.0),
        ("2026-11-21T10:00:00.5Z", 1795255200.5),
        ("2026-11-21 10:00:00.123456789Z", 1795255200.123456),
        (1795255200, 1795255200.0),
        (1795255200.25, 1795255200.25),
    ],
)
def test_timestamps_are_epoch_seconds_or_rfc3339(text: object, expected: float) -> None:
    """Both timestamp forms give epoch seconds."""
    assert expected == pytest.approx(parse_ts(text))


def test_a_wire_round_trip_gives_the_same_event() -> None:
    """to_wire writes canonical spellings that parse back to an equal event."""
    event = parse(state_event("r", "Succeeded", agent="a", seq=3, run_timeout_s=5, kind="job"))
    again = parse(to_wire(event))
    assert event == again
    assert "completed" == to_wire(event)["state"]


@pytest.mark.parametrize(
    ("body", "content_type", "count", "single"),
    [
        (b'{"type":"heartbeat"}', "application/json", 1, True),
        (b'[{"a":1},{"b":2}]', "application/json", 2, False),
        (b"[]", "application/json", 0, False),
        (b'{"a":1}\n\n{"b":2}\n', "application/x-ndjson", 2, False),
        (b'{"a":1}\nnot json\n', "application/x-ndjson", 2, False),
    ],
)
def test_bodies_decode_as_object_array_or_ndjson(
    body: bytes, content_type: str, count: int, single: bool
) -> None:
    """One object, an array, or NDJSON lines; a bad NDJSON line stays in place as an error."""
    decoded = decode_body(body, content_type)
    assert (count, single) == (len(decoded.items), decoded.single)


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        (b"", "application/json", "empty"),
        (b"   ", "application/json", "empty"),
        (b"nope", "application/json", "not JSON"),
        (b"NaN", "application/json", "not JSON"),
        (b'{"a": NaN}', "application/json", "not JSON"),
        (b"\xff\xfe{}", "application/json", "not JSON"),
        (b"42", "application/json", "JSON number"),
        (b'"event"', "application/json", "JSON string"),
        (b"[" * 5000, "application/json", "not JSON"),
        (b"12345678901234567890123", "application/json", "JSON number"),
        (b"", "application/x-ndjson", "empty"),
        (b"x\ny\n", "application/x-ndjson", "no NDJSON line"),
    ],
)
def test_bodies_that_are_not_json_at_all_are_body_errors(
    body: bytes, content_type: str, words: str
) -> None:
    """Whatever the junk, the answer is a BodyError (400) with a message, never a crash."""
    with pytest.raises(BodyError) as caught:
        decode_body(body, content_type)
    assert 400 == caught.value.status
    assert words in caught.value.message
