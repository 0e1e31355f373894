"""Logs: structlog JSON lines on stdout (a console renderer on a TTY), one per record.

Every transition, finding and breaker change is one line with its execution, agent,
tenant and trace ids. stdlib logging (libraries, aiohttp) and the access log go
through the same renderer. A closed stdout (`execwatch serve | head`) never takes
the daemon down: lines that cannot be written are dropped and counted.
"""

from __future__ import annotations

import datetime
import logging
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, ClassVar

import orjson
import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from exporters.traces import TraceIds
from monitor.detectors.breaker import BreakerState, BreakerTransition
from monitor.detectors.engine import Record
from monitor.model import Execution, FindingChange, Key, Transition
from monitor.states import ExecState

LEVELS = ("debug", "info", "warning", "error")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_TROUBLE = frozenset({ExecState.FAILED, ExecState.TIMEOUT, ExecState.DEAD})
_QUIET_PATHS = frozenset({"/v1/events", "/metrics", "/healthz", "/readyz"})
"""High-volume requests logged at debug when they succeed (a line per heartbeat batch would
cost more than the batch)."""


class SafeBytesLogger(structlog.BytesLogger):
    """structlog's BytesLogger that drops a line rather than raise when the pipe is gone."""

    dropped = 0

    def msg(self, message: bytes) -> None:
        try:
            super().msg(message)
        except (BrokenPipeError, OSError, ValueError):
            SafeBytesLogger.dropped += 1

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class SafeStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib side of the same promise."""

    def handleError(self, record: logging.LogRecord) -> None:
        SafeBytesLogger.dropped += 1


class JsonLines:
    """The fast path for record lines in JSON mode: the same keys and timestamp format as
    structlog's JSON lines, one write and flush per batch of records. structlog's processor
    chain costs ~7 us a line (measured); a line per transition is on the ingest path."""

    active: ClassVar[JsonLines | None] = None
    """Set by configure_logging in JSON mode; None sends record lines through structlog."""

    def __init__(self, out: IO[bytes], level: int) -> None:
        self.out = out
        self.level = level

    def write(self, lines: list[dict[str, Any]]) -> None:
        stamp = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        body = bytearray()
        for fields in lines:
            fields["timestamp"] = stamp
            body += orjson.dumps(fields)
            body += b"\n"
        try:
            self.out.write(body)
            self.out.flush()
        except (BrokenPipeError, OSError, ValueError):
            SafeBytesLogger.dropped += len(lines)


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: IO[str] | None = None
) -> None:
    """Route structlog and stdlib logging to `stream` (stdout): JSON lines, or a readable
    console rendering when `fmt` is "console" (or "auto" on a terminal)."""
    stream = stream if stream is not None else sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if console:
        renderer = structlog.dev.ConsoleRenderer()
        factory: Any = structlog.PrintLoggerFactory(stream)  # type: ignore[arg-type]
    else:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = _bytes_factory(stream)
    JsonLines.active = (
        None
        if console
        else JsonLines(
            getattr(stream, "buffer", sys.stdout.buffer), getattr(logging, level.upper())
        )
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer()
            if console
            else structlog.processors.JSONRenderer(
                serializer=lambda v, **_: orjson.dumps(v).decode()
            ),
        ],
    )
    handler = SafeStreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def _bytes_factory(stream: IO[str]) -> Any:
    buffer = getattr(stream, "buffer", None)

    def factory(*_: Any) -> SafeBytesLogger:
        return SafeBytesLogger(buffer if buffer is not None else sys.stdout.buffer)

    return factory


class LogSink:
    """One log line per record, with the ids an operator searches by."""

    name = "logs"

    def __init__(self, traces: TraceIds, lookup: Callable[[Key], Execution | None]) -> None:
        self.traces = traces
        self.lookup = lookup
        self.log = structlog.get_logger("execwatch.records")

    def __call__(self, records: Sequence[Record]) -> None:
        lines: list[dict[str, Any]] = []
        for record in records:
            if type(record) is Transition:
                lines.append(self._transition(record))
            elif type(record) is FindingChange:
                lines.append(self._finding(record))
            elif type(record) is BreakerTransition:
                lines.append(self._breaker(record))
        fast = JsonLines.active
        if fast is not None:
            fast.write([line for line in lines if _LEVELS[line["level"]] >= fast.level])
            return
        for line in lines:
            fields = dict(line)
            level, event = fields.pop("level"), fields.pop("event")
            getattr(self.log, level)(event, **fields)

    def _ids(self, key: Key) -> dict[str, str]:
        ids = self.traces.open.get(key) or self.traces.ended.get(key)
        if ids is not None:
            return {"trace_id": ids[0], "span_id": ids[1]}
        trace_id = self.traces.trace_id(key, self.lookup(key))  # the caller's trace
        return {} if trace_id is None else {"trace_id": trace_id}

    def _transition(self, t: Transition) -> dict[str, Any]:
        # The states and kind are StrEnums: they render as their strings without `.value`,
        # which costs ~0.3 us a lookup on Python 3.11 (a line per transition feels it).
        fields: dict[str, Any] = {
            "execution_id": t.execution_id,
            "tenant": t.tenant,
            "agent": t.agent,
            "kind": t.kind,
            "from": t.old,
            "to": t.new,
            "at": t.at,
            **self._ids(t.key),
        }
        if t.phase is not None:
            fields["phase"] = t.phase
        if t.reason is not None:
            fields["reason"] = t.reason
        if t.detected_at is not None:
            fields["detection_lag_s"] = round(t.detected_at - t.at, 6)
        if t.revived:
            fields["revived"] = True
        fields["event"] = "execution_transitioned"
        fields["level"] = "warning" if t.new in _TROUBLE and t.old is not t.new else "info"
        return fields

    def _finding(self, f: FindingChange) -> dict[str, Any]:
        return {
            "execution_id": f.execution_id,
            "tenant": f.tenant,
            "agent": f.agent,
            "finding": f.finding,
            "since": f.since,
            "detail": f.detail,
            **self._ids(f.key),
            "event": "finding_raised" if f.raised else "finding_cleared",
            "level": "warning" if f.raised else "info",
        }

    @staticmethod
    def _breaker(b: BreakerTransition) -> dict[str, Any]:
        return {
            "tenant": b.tenant,
            "agent": b.agent,
            "from": b.old,
            "to": b.new,
            "at": b.at,
            "failure_rate": round(b.failure_rate, 4),
            "event": "breaker_transitioned",
            "level": "warning" if b.new is BreakerState.OPEN else "info",
        }


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log as structlog lines (ingest and probes at debug when they succeed)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        quiet = request.path in _QUIET_PATHS and response.status < 400
        logger = structlog.get_logger("execwatch.access")
        (logger.debug if quiet else logger.info)(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_s=round(time, 6),
            remote=request.remote,
            bytes=response.body_length,
        )
