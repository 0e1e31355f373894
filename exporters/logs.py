"""Logs: structlog JSON lines on stdout (a console renderer on a TTY), one per record.

Every transition, finding and breaker change is one line with its execution, agent,
tenant and trace ids. stdlib logging (libraries, aiohttp) and the access log go
through the same renderer. A stdout that is closed or that nobody reads never
takes the daemon down or stalls it: lines leave through a bounded queue and a writer
thread, and what cannot be written is dropped and counted.
"""

from __future__ import annotations

import datetime
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
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
_NO_IDS: dict[str, str] = {}
"""Spread into a line, never changed."""
_QUIET_PATHS = frozenset({"/v1/events", "/metrics", "/healthz", "/readyz"})
"""High-volume requests logged at debug when they succeed (a line per heartbeat batch would
cost more than the batch)."""


class LineWriter:
    """Every log line leaves through here: a bounded queue drained by a writer thread, so a
    stdout nobody reads (a stuck pipe, a full disk) costs dropped lines, counted, never a
    blocked event loop. A closed stdout (`execwatch serve | head`) likewise."""

    MAX_BYTES = 4 * 1024 * 1024
    """Lines waiting at most; past it new lines are dropped (and counted)."""
    active: ClassVar[LineWriter | None] = None

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.dropped = 0
        self._pending = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="execwatch-log-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes, lines: int = 1) -> None:
        with self._lock:
            if self._pending + len(data) > self.MAX_BYTES:
                self.dropped += lines
                return
            self._pending += len(data)
        self._queue.put(data)

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):
                with self._lock:
                    self.dropped += data.count(b"\n")
            with self._lock:
                self._pending -= len(data)

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (for `timeout_s` at most), then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)


class QueuedLogger:
    """A structlog logger that hands its rendered line to the LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: str | bytes) -> None:
        data = message.encode() if isinstance(message, str) else message
        self._writer.write(data + b"\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class QueuedHandler(logging.Handler):
    """The stdlib side: library and aiohttp records, formatted, into the same writer."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.write(self.format(record).encode() + b"\n")
        except Exception:
            self.handleError(record)


class JsonLines:
    """The fast path for record lines in JSON mode: the same keys and timestamp format as
    structlog's JSON lines, one write and flush per batch of records. structlog's processor
    chain costs ~7 us a line (measured); a line per transition is on the ingest path."""

    active: ClassVar[JsonLines | None] = None
    """Set by configure_logging in JSON mode; None sends record lines through structlog."""

    def __init__(self, writer: LineWriter, level: int) -> None:
        self.writer = writer
        self.level = level

    def write(self, lines: Iterable[dict[str, Any]]) -> None:
        """Write the lines at or above the level, in one piece."""
        stamp = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        body = bytearray()
        written, level, dumps = 0, self.level, orjson.dumps
        for fields in lines:
            if _LEVELS[fields["level"]] >= level:
                fields["timestamp"] = stamp
                body += dumps(fields)
                body += b"\n"
                written += 1
        if written:
            self.writer.write(bytes(body), written)


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: IO[str] | None = None
) -> LineWriter:
    """Route structlog and stdlib logging to `stream` (stdout) through one LineWriter: JSON
    lines, or a readable console rendering when `fmt` is "console" (or "auto" on a
    terminal). Returns the writer (its `dropped` count is exported; close it at exit)."""
    stream = stream if stream is not None else sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    writer = LineWriter(getattr(stream, "buffer", sys.stdout.buffer))
    LineWriter.active = writer
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if console:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    numeric = getattr(logging, level.upper())
    JsonLines.active = None if console else JsonLines(writer, numeric)
    AccessLogger.level = numeric
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: QueuedLogger(writer),
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
    handler = QueuedHandler(writer)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    return writer


def dropped_lines() -> int:
    """Log lines dropped since start-up (stdout stuck or gone)."""
    writer = LineWriter.active
    return 0 if writer is None else writer.dropped


class LogSink:
    """One log line per record, with the ids an operator searches by."""

    name = "logs"

    def __init__(
        self,
        traces: TraceIds,
        lookup: Callable[[Key], Execution | None],
        traced: Callable[[], bool] = lambda: True,
    ) -> None:
        """`traced` says whether any execution may have a trace (a span, or a caller's
        traceparent): when not, no line looks its execution up."""
        self.traces = traces
        self.lookup = lookup
        self._traced = traced
        self.log = structlog.get_logger("execwatch.records")

    def __call__(self, records: Sequence[Record]) -> None:
        fast = JsonLines.active
        if fast is not None:
            fast.write(self._lines(records))
            return
        for line in self._lines(records):
            fields = dict(line)
            level, event = fields.pop("level"), fields.pop("event")
            getattr(self.log, level)(event, **fields)

    def _lines(self, records: Sequence[Record]) -> Iterator[dict[str, Any]]:
        """The line of each record, made as it is written: one line's dict alive at a time
        stays in the allocator's hot memory, where a list of 1,000 of them cost twice as much
        on a fragmented heap (measured in a 10k-death sweep at 100k live)."""
        ids = self._ids if self._traced() else None
        for record in records:
            if type(record) is Transition:
                yield self._transition(record, ids)
            elif type(record) is FindingChange:
                yield self._finding(record, ids)
            elif type(record) is BreakerTransition:
                yield self._breaker(record)

    def _ids(self, key: Key) -> dict[str, str]:
        traces = self.traces
        if traces.open or traces.ended:
            ids = traces.open.get(key) or traces.ended.get(key)
            if ids is not None:
                return {"trace_id": ids[0], "span_id": ids[1]}
        ex = self.lookup(key)
        if ex is None or ex.traceparent is None:
            return _NO_IDS  # no span and no caller's trace: the common case, at once
        trace_id = traces.trace_id(key, ex)  # the caller's trace
        return {} if trace_id is None else {"trace_id": trace_id}

    def _transition(
        self, t: Transition, ids: Callable[[Key], dict[str, str]] | None
    ) -> dict[str, Any]:
        # The states and kind are StrEnums: they render as their strings without `.value`,
        # which costs ~0.3 us a lookup on Python 3.11 (a line per transition feels it). One
        # unpacking instead of a dozen NamedTuple attribute reads: a sweep of 10k deaths
        # writes 10k lines before its next slice reads the clock.
        tenant, execution_id, agent, kind, old, new, at, phase, reason, revived, detected_at, \
            _ = t  # fmt: skip
        fields: dict[str, Any] = {
            "execution_id": execution_id,
            "tenant": tenant,
            "agent": agent,
            "kind": kind,
            "from": old,
            "to": new,
            "at": at,
            **(_NO_IDS if ids is None else ids((tenant, execution_id))),
        }
        if phase is not None:
            fields["phase"] = phase
        if reason is not None:
            fields["reason"] = reason
        if detected_at is not None:
            # To the microsecond; round(x, 6) costs ~0.3 us (a decimal conversion), this ~0.05.
            fields["detection_lag_s"] = round((detected_at - at) * 1e6) / 1e6
        if revived:
            fields["revived"] = True
        fields["event"] = "execution_transitioned"
        fields["level"] = "warning" if new in _TROUBLE and old is not new else "info"
        return fields

    def _finding(
        self, f: FindingChange, ids: Callable[[Key], dict[str, str]] | None
    ) -> dict[str, Any]:
        return {
            "execution_id": f.execution_id,
            "tenant": f.tenant,
            "agent": f.agent,
            "finding": f.finding,
            "since": f.since,
            "detail": f.detail,
            **(_NO_IDS if ids is None else ids(f.key)),
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

    level: ClassVar[int] = logging.INFO
    """The configured level (set by configure_logging)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        quiet = request.path in _QUIET_PATHS and response.status < 400
        if quiet and AccessLogger.level > logging.DEBUG:
            # Decided before any field is read: a filtered line cost ~9 us a request
            # (a logger built per call, the peer address looked up), 10% of a heartbeat.
            return
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
