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
from monitor.encoding import compact_json
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
    return _FRAME % (event_id, event.encode(), orjson.dumps(data))


_FRAME = b"id: %d\nevent: %s\ndata: %s\n\n"


class Entry:
    """One stream event in the ring: its id in the daemon-wide sequence (`every`) and in
    its tenant's (`own`); its data is serialised once, when first sent."""

    __slots__ = ("_data", "every", "own", "record")

    def __init__(self, every: int, own: int, record: Record) -> None:
        self.every = every
        self.own = own
        self.record = record
        self._data: tuple[bytes, bytes] | None = None

    def frame(self, scoped: bool) -> bytes:
        """The event with the id of a one-tenant stream (`scoped`) or of an all-tenants one."""
        data = self._data
        if data is None:
            event, fields = payload(self.record)
            data = self._data = (event.encode(), compact_json(fields))  # kept in the ring
        return _FRAME % (self.own if scoped else self.every, data[0], data[1])


class Consumer:
    """One open stream: what waits to be written to it, and whether it was dropped."""

    __slots__ = ("abort", "dropped", "pending", "reset", "reset_id", "tenant", "wake", "writing")

    def __init__(self, tenant: str | None, abort: Callable[[], None]) -> None:
        self.tenant = tenant
        """Its scope: one tenant (ids of that tenant's sequence), or None for every tenant."""
        self.abort = abort
        self.pending: deque[Entry] = deque()
        self.wake = asyncio.Event()
        self.writing = False
        """True while a write to its socket has not returned: it is not keeping up."""
        self.dropped = False
        self.reset_id = 0
        self.reset = False
        """Events were lost before publication: it must be told to re-list."""


class Broadcaster:
    """The ring and the open streams; fed each commit's records (it never blocks).

    Two id sequences: one daemon-wide, for all-tenants streams, and one per tenant, for
    streams of one tenant, so a tenant's ids say nothing about the others' traffic. Both
    start at the daemon's start time in microseconds.
    """

    name = "stream"

    def __init__(self, settings: StreamSettings, first_id: int, stats: StreamStats) -> None:
        self.settings = settings
        self.stats = stats
        self.first_id = first_id
        self.next_id = first_id
        """The next id of the daemon-wide sequence."""
        self.tenant_next: dict[str, int] = {}
        """The next id of each tenant's sequence (a tenant not here starts at `floor`)."""
        self.floor = first_id
        self.ring: deque[Entry] = deque()
        self.evicted_any = first_id - 1
        """The newest daemon-wide id that left the ring."""
        self.evicted: dict[str, int] = {}
        """Per tenant, the newest of its own ids that left the ring: a client of that
        tenant that saw at least this far can resume, however busy the others were."""
        self.evicted_floor = first_id - 1
        """The watermark of a tenant not in `evicted`."""
        self.scoped: dict[str | None, set[Consumer]] = {}
        """Open consumers by scope (None: all tenants)."""
        self.closing = False

    @property
    def consumers(self) -> int:
        return sum(len(group) for group in self.scoped.values())

    def newest(self, tenant: str | None) -> int:
        """The newest id sent in a scope (one before its first when there is none yet)."""
        if tenant is None:
            return self.next_id - 1
        return self.tenant_next.get(tenant, self.floor) - 1

    # ---- the ingest side -----------------------------------------------------------------

    def __call__(self, records: Sequence[Record]) -> None:
        ring, size, limit = self.ring, self.settings.ring_size, self.settings.queue_size
        scoped, tenant_next = self.scoped, self.tenant_next
        every_scope = scoped.get(None)
        for record in records:
            tenant = record.tenant
            own = tenant_next.get(tenant, self.floor)
            entry = Entry(self.next_id, own, record)
            self.next_id += 1
            tenant_next[tenant] = own + 1
            if len(ring) >= size:
                self._evict(ring.popleft())
            ring.append(entry)
            for group in (every_scope, scoped.get(tenant)):
                if not group:
                    continue
                for consumer in group:
                    if consumer.dropped:
                        continue
                    waiting = len(consumer.pending)
                    # A burst may outgrow the queue while the consumer waits its turn on
                    # the loop; it may not outgrow the ring, which could not resume it.
                    if waiting >= limit and (consumer.writing or waiting >= size):
                        self._drop(consumer)
                        continue
                    consumer.pending.append(entry)
                    consumer.wake.set()
        self.stats.published += len(records)
        if len(tenant_next) > MAX_TENANTS_TRACKED:
            self._forget_tenants()

    def _evict(self, old: Entry) -> None:
        self.evicted_any = old.every
        self.evicted[old.record.tenant] = old.own

    def _forget_tenants(self) -> None:
        """Tenant names come from clients: past MAX_TENANTS_TRACKED the per-tenant state
        starts over from floors above every id issued so far. Ids keep increasing; a
        resume from before this point gets a reset."""
        self.tenant_next.clear()
        self.evicted.clear()
        self.floor = self.next_id
        self.evicted_floor = self.next_id - 1

    def gap(self) -> None:
        """Events were lost before they could be published (the store failed for too
        long): every open stream gets a reset, and no resume may cross this point."""
        self._forget_tenants()
        self.evicted_any = self.next_id - 1
        self.ring.clear()
        for group in self.scoped.values():
            for consumer in group:
                consumer.pending.clear()
                consumer.reset = True
                consumer.reset_id = self.newest(consumer.tenant)
                consumer.wake.set()

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

    def full(self, tenant: str | None) -> str | None:
        """Why one more stream of this scope may not open, or None."""
        if self.consumers >= self.settings.max_consumers:
            return "the daemon's stream limit ([stream] max_consumers) is reached"
        if (
            tenant is not None
            and len(self.scoped.get(tenant, ())) >= self.settings.max_consumers_per_tenant
        ):
            return "this tenant's stream limit ([stream] max_consumers_per_tenant) is reached"
        return None

    def subscribe(
        self, tenant: str | None, last_id: int | None, abort: Callable[[], None]
    ) -> tuple[Consumer, bytes]:
        """Open a consumer of scope `tenant` (None: all) and say what to send first: the
        events it missed since `last_id`, or a `reset`, or (without `last_id`) the id to
        resume from should it lose the connection before its first event."""
        consumer = Consumer(tenant, abort)
        self.scoped.setdefault(tenant, set()).add(consumer)  # from here on, it misses nothing
        self.stats.consumers = self.consumers
        newest, scoped = self.newest(tenant), tenant is not None
        if last_id is None:
            return consumer, b"id: %d\n\n" % newest  # sets lastEventId, dispatches nothing
        watermark = (
            self.evicted_any if tenant is None else self.evicted.get(tenant, self.evicted_floor)
        )
        if last_id < self.first_id - 1 or last_id > newest:
            why = (
                "that id is not one this stream sent: the daemon restarted since, or it "
                "came from a stream of another scope"
            )
        elif last_id < watermark:
            why = "events after that id have left the ring (ring_size); it fell too far behind"
        else:
            if scoped:
                missed = [e for e in self.ring if e.record.tenant == tenant and e.own > last_id]
            else:
                start = max(0, last_id + 1 - self.ring[0].every) if self.ring else 0
                missed = [self.ring[i] for i in range(start, len(self.ring))]
            return consumer, b"".join([entry.frame(scoped) for entry in missed])
        self.stats.resets += 1
        return consumer, self.reset_frame(tenant, why, last_id)

    def reset_frame(
        self, tenant: str | None, why: str, last_id: int | None, event_id: int | None = None
    ) -> bytes:
        return frame(
            "reset",
            self.newest(tenant) if event_id is None else event_id,
            {
                "reason": why,
                "last_event_id": last_id,
                "detail": "re-list with GET /v1/executions (and /v1/findings), then follow "
                "on from this event",
            },
        )

    def unsubscribe(self, consumer: Consumer) -> None:
        group = self.scoped.get(consumer.tenant)
        if group is not None:
            group.discard(consumer)
            if not group:
                del self.scoped[consumer.tenant]
        self.stats.consumers = self.consumers

    def close(self) -> None:
        """Shutdown: every stream ends cleanly (its client reconnects with Last-Event-ID)."""
        self.closing = True
        for group in self.scoped.values():
            for consumer in group:
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
            async with asyncio.timeout(timeout):
                await response.write(data)
        except TimeoutError:
            broadcaster._drop(consumer)
        finally:
            consumer.writing = False

    scoped = tenant is not None
    try:
        await write(b"retry: %d\n\n%s" % (RETRY_MS, first))
        while not (consumer.dropped or broadcaster.closing):
            if consumer.reset:
                consumer.reset = False
                broadcaster.stats.resets += 1
                why = "events were lost before they could be sent (the store failed too long)"
                await write(broadcaster.reset_frame(tenant, why, None, consumer.reset_id))
                continue
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
            chunk = b"".join([entry.frame(scoped) for entry in consumer.pending])
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
