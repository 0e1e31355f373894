"""GET /v1/stream: the transitions, findings and breaker changes of a tenant, as
Server-Sent Events, in commit order, resumable.

Every record the ingest path fans out (after its commit) gets the next id of one
daemon-wide sequence and goes into a bounded ring. Ids start at the daemon's start time
in microseconds, so they increase across restarts too, and an id from before a restart
is older than anything the new ring holds.

A reconnecting client sends `Last-Event-ID` (or `?last_event_id=`): it is sent every
event of its scope after that id from the ring, then the live ones. When the ring no
longer holds everything it missed (it was too far behind, or the daemon restarted), it
gets one `reset` event instead: re-list with GET /v1/executions, then follow on.

A consumer whose socket stops taking data while events keep coming has a bounded queue:
past `queue_size` waiting events it is dropped (its connection aborted, counted), and the
ingest path never waits for it. A burst may outgrow the queue of a consumer that is only
waiting for its turn on the event loop, but never the ring. Its reconnect resumes from
the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import structlog
from aiohttp import web

from monitor.config import StreamSettings
from monitor.detectors.breaker import BreakerTransition
from monitor.detectors.engine import Record
from monitor.model import FindingChange, Transition
from monitor.stats import StreamStats

log = structlog.get_logger("execwatch.stream")

RETRY_MS = 2000
"""How long an EventSource waits before it reconnects (the `retry:` field)."""
SEND_BUFFER_BYTES = 256 * 1024
"""A stream socket's kernel send buffer: ample for events at LAN speed, and bounding what
the kernel holds for a consumer that stopped reading."""
MAX_TENANTS_TRACKED = 10_000
"""Tenants whose ring watermark is kept apart (then all share one, conservatively)."""
MIN_WRITE_TIMEOUT_S = 30.0
"""A write that has not finished in max(this, 2 x keepalive_s) means a consumer that
stopped reading while nothing else came: it is dropped too, not held open forever."""


def payload(record: Record) -> tuple[str, dict[str, Any]]:
    """A record as the stream shows it: (event name, data)."""
    if type(record) is Transition:
        data: dict[str, Any] = {
            "execution_id": record.execution_id,
            "tenant": record.tenant,
            "agent": record.agent,
            "kind": record.kind,
            "from": record.old,
            "to": record.new,
            "at": record.at,
            "phase": record.phase,
            "reason": record.reason,
        }
        if record.detected_at is not None:
            data["detected_at"] = record.detected_at
        if record.revived:
            data["revived"] = True
        return "transition", data
    if type(record) is FindingChange:
        return "finding", {
            "execution_id": record.execution_id,
            "tenant": record.tenant,
            "agent": record.agent,
            "kind": record.kind,
            "finding": record.finding,
            "raised": record.raised,
            "since": record.since,
            "detail": record.detail,
            "detected_at": record.detected_at,
        }
    assert type(record) is BreakerTransition
    return "breaker", {
        "tenant": record.tenant,
        "agent": record.agent,
        "from": record.old,
        "to": record.new,
        "at": record.at,
        "failure_rate": round(record.failure_rate, 4),
        "detected_at": record.detected_at,
    }


def frame(event: str, event_id: int, data: object) -> bytes:
    """One SSE event (orjson never writes a newline, so the data is one `data:` line)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, event.encode(), orjson.dumps(data))


class Entry:
    """One stream event in the ring; its bytes are built once, when first sent."""

    __slots__ = ("_frame", "id", "record", "tenant")

    def __init__(self, event_id: int, record: Record) -> None:
        self.id = event_id
        self.record = record
        self.tenant = record.tenant
        self._frame: bytes | None = None

    def frame(self) -> bytes:
        if self._frame is None:
            event, data = payload(self.record)
            self._frame = frame(event, self.id, data)
        return self._frame


class Consumer:
    """One open stream: what waits to be written to it, and whether it was dropped."""

    __slots__ = ("abort", "dropped", "pending", "tenant", "wake", "writing")

    def __init__(self, tenant: str | None, abort: Callable[[], None]) -> None:
        self.tenant = tenant
        """Its scope: one tenant, or None for every tenant."""
        self.abort = abort
        self.pending: deque[Entry] = deque()
        self.wake = asyncio.Event()
        self.writing = False
        """True while a write to its socket has not returned: it is not keeping up."""
        self.dropped = False


class Broadcaster:
    """The ring and the open streams; a sink of the ingest path (it never blocks)."""

    name = "stream"

    def __init__(self, settings: StreamSettings, first_id: int, stats: StreamStats) -> None:
        self.settings = settings
        self.stats = stats
        self.first_id = first_id
        self.next_id = first_id
        self.ring: deque[Entry] = deque()
        self.evicted_any = first_id - 1
        """The newest id that left the ring."""
        self.evicted: dict[str, int] = {}
        """Per tenant, the newest of its ids that left the ring: a client of that tenant
        that saw at least this far can resume, however busy the other tenants were."""
        self.evicted_floor = first_id - 1
        """For a tenant not in `evicted`: it is cleared past MAX_TENANTS_TRACKED (tenant
        names come from clients), and then every tenant is judged by this, conservatively."""
        self.consumers: set[Consumer] = set()
        self.closing = False

    # ---- the ingest side -----------------------------------------------------------------

    def __call__(self, records: Sequence[Record]) -> None:
        ring, size, consumers = self.ring, self.settings.ring_size, self.consumers
        limit = self.settings.queue_size
        for record in records:
            entry = Entry(self.next_id, record)
            self.next_id += 1
            if len(ring) >= size:
                old = ring.popleft()
                self.evicted_any = self.evicted[old.tenant] = old.id
                if len(self.evicted) > MAX_TENANTS_TRACKED:
                    self.evicted.clear()
                    self.evicted_floor = old.id
            ring.append(entry)
            for consumer in consumers:
                if consumer.dropped or (
                    consumer.tenant is not None and consumer.tenant != entry.tenant
                ):
                    continue
                waiting = len(consumer.pending)
                # A burst may outgrow the queue while the consumer waits its turn on the
                # loop; it may not outgrow the ring, which could not resume it anyway.
                if waiting >= limit and (consumer.writing or waiting >= size):
                    self._drop(consumer)
                    continue
                consumer.pending.append(entry)
                consumer.wake.set()
        self.stats.published += len(records)

    def _drop(self, consumer: Consumer) -> None:
        """Its socket is not taking data and its queue is full: let it go, never wait."""
        if consumer.dropped:
            return
        consumer.dropped = True
        consumer.pending.clear()
        consumer.wake.set()
        self.stats.dropped += 1
        log.warning(
            "stream_consumer_dropped",
            tenant=consumer.tenant,
            queue_size=self.settings.queue_size,
            detail="its socket stopped taking data; it can reconnect with Last-Event-ID",
        )
        consumer.abort()

    # ---- the consumer side ---------------------------------------------------------------

    def subscribe(
        self, tenant: str | None, last_id: int | None, abort: Callable[[], None]
    ) -> tuple[Consumer, list[Entry] | dict[str, Any]]:
        """Open a consumer and say what to send first: the entries it missed since
        `last_id` (nothing without one), or the data of a `reset` event."""
        consumer = Consumer(tenant, abort)
        self.consumers.add(consumer)  # from here on, it misses nothing
        self.stats.consumers = len(self.consumers)
        if last_id is None:
            return consumer, []
        newest = self.next_id - 1
        seen_all = (
            self.evicted_any if tenant is None else self.evicted.get(tenant, self.evicted_floor)
        )
        if last_id < self.first_id - 1 or last_id > newest:
            why = "the daemon restarted since that id; what happened meanwhile is not kept"
        elif last_id < seen_all:
            why = "events after that id have left the ring (ring_size); it fell too far behind"
        else:
            start = max(0, last_id + 1 - self.ring[0].id) if self.ring else 0
            missed = [
                self.ring[i]
                for i in range(start, len(self.ring))
                if tenant is None or self.ring[i].tenant == tenant
            ]
            return consumer, missed
        self.stats.resets += 1
        return consumer, {
            "reason": why,
            "last_event_id": last_id,
            "detail": "re-list with GET /v1/executions (and /v1/findings), then follow on "
            "from this event",
        }

    def unsubscribe(self, consumer: Consumer) -> None:
        self.consumers.discard(consumer)
        self.stats.consumers = len(self.consumers)

    def close(self) -> None:
        """Shutdown: every stream ends cleanly (its client reconnects with Last-Event-ID)."""
        self.closing = True
        for consumer in self.consumers:
            consumer.wake.set()


def last_event_id(request: web.Request) -> int | None:
    """The id to resume after: the Last-Event-ID header, else `?last_event_id=`."""
    text = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or ""
    text = text.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise web.HTTPBadRequest(
            text=f"Last-Event-ID {text[:40]!r}: expected the id of an event this stream sent "
            "(an integer)"
        )
    return int(text)


async def serve(
    request: web.Request, broadcaster: Broadcaster, tenant: str | None
) -> web.StreamResponse:
    """Run one stream until the client goes, it is dropped, or the daemon stops."""
    last_id = last_event_id(request)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on as it comes
        }
    )
    await response.prepare(request)
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A fixed send buffer: autotuned, the kernel holds megabytes for a consumer
            # that stopped reading before its queue even starts to fill.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

    def abort() -> None:
        if transport is not None:
            transport.abort()

    consumer, first = broadcaster.subscribe(tenant, last_id, abort)
    keepalive = broadcaster.settings.keepalive_s
    timeout = max(MIN_WRITE_TIMEOUT_S, 2 * keepalive)

    async def write(data: bytes) -> None:
        consumer.writing = True
        try:
            await asyncio.wait_for(response.write(data), timeout)
        except TimeoutError:
            broadcaster._drop(consumer)
        finally:
            consumer.writing = False

    try:
        head = b"retry: %d\n\n" % RETRY_MS
        if isinstance(first, dict):
            head += frame("reset", broadcaster.next_id - 1, first)
        else:
            head += b"".join(entry.frame() for entry in first)
        await write(head)
        while not (consumer.dropped or broadcaster.closing):
            if not consumer.pending:
                consumer.wake.clear()
                try:
                    async with asyncio.timeout(keepalive):  # no task per wait, unlike wait_for
                        await consumer.wake.wait()
                except TimeoutError:
                    await write(b": keep-alive\n\n")
                    continue
                await asyncio.sleep(0)  # let the requests finishing this turn add theirs
                continue
            chunk = b"".join([entry.frame() for entry in consumer.pending])
            consumer.pending.clear()
            await write(chunk)
    except ConnectionError:
        consumer.dropped = True  # the client went (or was let go): nothing more to say
    finally:
        broadcaster.unsubscribe(consumer)
    if not consumer.dropped:
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    return response
