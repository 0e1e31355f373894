"""The execwatch SDK: an application reports its executions with two lines of code.

    from monitor.client import Client

    client = Client()                                  # EXECWATCH_URL, EXECWATCH_TOKEN
    with client.track("triage", run_timeout_s=300) as run:
        run.phase("thinking")
        ...
        run.progress()                                 # "I moved forward"

`track()` registers the execution (after asking the agent's breaker whether it may
start: `BreakerOpen` carries `retry_after_s` when not), sends heartbeats in the
background at a third of the agent's heartbeat timeout, and reports `completed` on a
clean exit, `failed` with the error on an exception, and `cancelled` on cancellation.
It is also a decorator (`@client.track("triage")`), and `async with` works the same in
asyncio code, where a cancel directive from the daemon cancels the task. In sync code,
the next `progress()`, `phase()` or `check()` raises `ExecutionCancelled`.

Events leave through one background thread, batched. When the daemon is down or
slow, they wait in a bounded buffer (the oldest heartbeats are dropped first, and
counted), sending is retried with backoff, one warning is logged, and nothing ever
raises into the application's code path: an application never fails because its
monitor did. The SDK needs only the standard library.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import http.client
import inspect
import json
import logging
import multiprocessing.util
import numbers
import os
import random
import threading
import time
import urllib.parse
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from monitor.errors import BreakerOpen, ExecutionCancelled

log = logging.getLogger("execwatch.client")

DEFAULT_URL = "http://127.0.0.1:9478"
DEFAULT_HEARTBEAT_TIMEOUT_S = 30.0
"""The daemon's default; the SDK asks for the agent's effective one after registering."""
HEARTBEAT_FRACTION = 1 / 3
"""Heartbeats go out at this fraction of the heartbeat timeout: two may be lost."""
MIN_HEARTBEAT_INTERVAL_S = 0.1
MAX_BATCH = 500
BREAKER_TIMEOUT_S = 1.0
"""A breaker check waits this long at most before the run starts without an answer."""
BREAKER_CACHE_S = 1.0
LATE_REASONS = frozenset({"final_state", "evicted"})
"""Rejections of reports that arrive after the daemon ended the execution itself."""
MAX_STOPPED = 10_000
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 30.0
LIMIT_FIELDS = frozenset(
    {
        "start_timeout_s",
        "run_timeout_s",
        "timeout_s",
        "heartbeat_timeout_s",
        "stall_timeout_s",
        "memory_limit_bytes",
    }
)
"""What `track(**limits)` passes on; anything else is a mistake named at once."""

EXIT_FLUSH_S = 2.0
"""At interpreter exit, each client sends what it holds for this long at most."""
_LIVE_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _flush_at_exit() -> None:
    """Every open client sends what it holds, within EXIT_FLUSH_S for all of them; one
    that knows its daemon is down does not wait at all."""
    deadline = time.monotonic() + EXIT_FLUSH_S
    for client in list(_LIVE_CLIENTS):
        with contextlib.suppress(Exception):
            client.close(max(0.0, deadline - time.monotonic()))


def _restart_after_fork() -> None:
    for client in list(_LIVE_CLIENTS):
        with contextlib.suppress(Exception):
            client._after_fork()


def _flush_at_process_exit(_: object) -> None:
    """In a multiprocessing child: it ends with os._exit, which skips atexit, but runs
    the finalizers registered after its start."""
    multiprocessing.util.Finalize(None, _flush_at_exit, exitpriority=100)


class _Anchor:
    """Something multiprocessing can hold a weak reference to."""


_ANCHOR = _Anchor()
atexit.register(_flush_at_exit)
os.register_at_fork(after_in_child=_restart_after_fork)
multiprocessing.util.register_after_fork(_ANCHOR, _flush_at_process_exit)

_CURRENT: contextvars.ContextVar[Run | None] = contextvars.ContextVar("execwatch_run", default=None)
F = TypeVar("F", bound=Callable[..., Any])


def current() -> Run | None:
    """The run the calling code is inside (set by `track` as a context manager or
    decorator), so deep code can report progress without passing it around."""
    return _CURRENT.get()


@dataclass
class ClientStats:
    """What the SDK did, for tests and for an application's own metrics."""

    sent: int = 0
    """Events the daemon acknowledged (accepted or duplicate)."""
    rejected: int = 0
    """Events the daemon refused (by index in an answer)."""
    dropped: int = 0
    """Events dropped because the buffer was full (the daemon down too long)."""
    failed_posts: int = 0
    """Requests that failed (daemon down, 503, timeouts) and were retried."""
    breaker_checks: int = 0
    """Breaker questions asked of the daemon (answers are reused for a second)."""
    buffered: int = 0
    """Events waiting now."""


_RESET = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)  # fmt: skip
"""What a kept-alive connection the daemon closed in the meantime fails with."""


class _Http:
    """One keep-alive HTTP/1.1 connection to the daemon (used by one thread at a time)."""

    def __init__(self, url: str, token: str | None, timeout_s: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"execwatch url {url!r}: expected http://HOST:PORT")
        self.https = parsed.scheme == "https"
        self.host = parsed.hostname
        self.port = parsed.port or (443 if self.https else 80)
        self.prefix = parsed.path.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """(status, headers, decoded JSON or None). Raises OSError/HTTPException when the
        daemon cannot be reached. Only a reused connection that the daemon had closed is
        tried once more: a timeout is never doubled."""
        reused = self._conn is not None
        try:
            return self._once(method, path, body)
        except _RESET:
            self.close()
            if not reused:
                raise
            return self._once(method, path, body)
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, dict[str, str], Any]:
        conn = self._conn
        if conn is None:
            factory = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = self._conn = factory(self.host, self.port, timeout=self.timeout_s)
        conn.request(method, self.prefix + path, body=body, headers=self.headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Item:
    """One queued event, already serialised (so a value JSON cannot carry fails at once,
    alone, and never takes a batch of other runs' events with it)."""

    __slots__ = ("body", "execution_id", "heartbeat", "registers")

    def __init__(self, event: dict[str, Any], body: bytes) -> None:
        self.body = body
        self.execution_id: str = event["execution_id"]
        self.heartbeat = event["type"] == "heartbeat"
        self.registers = event["type"] == "state" and "agent" in event


def _jsonable(value: object) -> object:
    """What json cannot write: numbers as numbers (Decimal, numpy), the rest as text."""
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return float(value)  # type: ignore[arg-type]
    return str(value)


class _Sender:
    """The background thread: batches events, adds heartbeats, retries with backoff.

    The queue holds the application's own events, bounded by `max_buffer`. Background
    heartbeats are not queued: they are built when a batch leaves, for the runs that are
    due, so a daemon that is down for an hour costs no more memory than one down for a
    second. They carry no seq, so they can never make a state event look stale.
    """

    def __init__(self, client: Client, max_buffer: int) -> None:
        self.client = client
        self.max_buffer = max_buffer
        self.cond = threading.Condition()
        self.queue: deque[_Item] = deque()
        self.in_flight = 0
        self.beating: dict[tuple[str | None, str], Run] = {}
        self.lookups: dict[str, Run] = {}
        """Runs whose registration is not sent yet: then their limits are looked up."""
        self.retry_at = 0.0
        self.failures = 0
        self.down_since: float | None = None
        self.warned_trouble = False
        self.warned_reasons: set[str] = set()
        self.stopping = False
        self.abandon_at = float("inf")
        """After stop(): past this, what is still queued is dropped, not sent."""
        self.http = _Http(client.url, client.token, client.timeout_s)
        self.thread = threading.Thread(target=self._loop, name="execwatch-client", daemon=True)
        self.thread.start()

    # ---- the application's side (never raises, never blocks for long) --------------------

    def put(self, event: dict[str, Any], run: Run | None = None) -> None:
        """Queue `event`; a run's events get their seq here, under the lock that orders
        the queue, so they reach the daemon in the order they were numbered."""
        stats = self.client.stats
        with self.cond:
            if run is not None:
                run.number(event)
            try:
                body = json.dumps(event, default=_jsonable, separators=(",", ":")).encode()
            except (TypeError, ValueError) as exc:
                stats.rejected += 1
                self._warn_once("unencodable", "execwatch client: an event of %s could not be "
                                "encoded as JSON (%s) and is dropped", event.get("execution_id"),
                                exc)  # fmt: skip
                return
            if len(self.queue) >= self.max_buffer:
                self._drop_one()
                self._trouble(
                    "execwatch buffer full (%d events): dropping the oldest heartbeats first "
                    "while %s does not take them; the application is not affected",
                    self.max_buffer,
                    self.client.url,
                )
            self.queue.append(_Item(event, body))
            stats.buffered = len(self.queue)
            self.cond.notify()

    def _drop_one(self) -> None:
        """Drop one event, counted: a heartbeat near the front if there is one (a state
        event matters more), else the oldest. Bounded work: it runs on the app's thread."""
        self.client.stats.dropped += 1
        for index in range(min(64, len(self.queue))):
            if self.queue[index].heartbeat:
                del self.queue[index]
                return
        self.queue.popleft()

    def beat(self, run: Run) -> None:
        with self.cond:
            self.beating[run.key] = run
            if not run.explicit_heartbeat:
                self.lookups[run.execution_id] = run
            self.cond.notify()

    def unbeat(self, run: Run, forget: bool = True) -> None:
        with self.cond:
            self.beating.pop(run.key, None)
            if forget:
                self.lookups.pop(run.execution_id, None)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every event put so far is sent (or `timeout_s` passed)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self.cond.notify()
            while self.queue or self.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.05))
        return True

    def stop(self, timeout_s: float) -> None:
        """Send what is queued for `timeout_s` at most, in all; then drop the rest."""
        deadline = time.monotonic() + timeout_s
        down = self.down_since is not None
        if not down:
            self.flush(timeout_s)
        with self.cond:
            self.stopping = True
            self.abandon_at = time.monotonic() if down else deadline  # no waiting on the dead
            self.cond.notify()
        # The thread may be in a send: give it that send's timeout to notice, no longer.
        self.thread.join(max(0.0, deadline - time.monotonic()) + self.client.timeout_s)
        self.http.close()

    def mark_down(self, why: str) -> None:
        """Something other than a send found the daemon unreachable (a breaker check)."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            self._trouble(
                "execwatch at %s is unreachable (%s): events are kept (up to %d) and sent "
                "when it is back; the application is not affected",
                self.client.url,
                why,
                self.max_buffer,
            )

    # ---- the thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                batch = self._next()
                if batch is None:
                    return
                self.in_flight = len(batch[0])
            try:
                self._send(*batch)
            except Exception:  # a bug of ours must not kill the thread
                log.exception("execwatch client: unexpected error; continuing")
            finally:
                with self.cond:
                    self.in_flight = 0
                    self.cond.notify_all()

    def _next(self) -> tuple[list[_Item], list[bytes]] | None:
        """Wait (holding the condition) for the next batch: queued events, then heartbeats
        of the runs that are due and have nothing in it. None: stop."""
        while True:
            now = time.monotonic()
            if self.stopping and (not self.queue or now >= self.abandon_at):
                self.client.stats.dropped += len(self.queue)
                self.queue.clear()
                return None
            if now >= self.retry_at:
                items = [self.queue.popleft() for _ in range(min(MAX_BATCH, len(self.queue)))]
                self.client.stats.buffered = len(self.queue)
                named = {item.execution_id for item in items}
                beats: list[bytes] = []
                for run in self.beating.values():
                    if run.next_beat_at <= now and len(items) + len(beats) < MAX_BATCH:
                        run.next_beat_at = now + run.interval_s
                        if run.execution_id not in named:  # its events are proof of life
                            beats.append(run.heartbeat_body())
                if items or beats:
                    return items, beats
            due = min((r.next_beat_at for r in self.beating.values()), default=now + 1.0)
            wake = max(due, self.retry_at) if now < self.retry_at else due
            if self.stopping:
                wake = min(wake, self.abandon_at)
            self.cond.wait(max(0.0, min(wake - now, 1.0)))

    def _send(self, items: list[_Item], beats: list[bytes]) -> None:
        body = b"[" + b",".join([*(item.body for item in items), *beats]) + b"]"
        try:
            status, headers, answer = self.http.request("POST", "/v1/events", body)
        except (OSError, http.client.HTTPException) as exc:
            self._failed(items, f"{type(exc).__name__}: {exc}", None)
            return
        if status in (429, 503) or status >= 500:
            self._failed(items, f"answered {status}", headers.get("retry-after"))
            return
        self._recovered()
        stats = self.client.stats
        if not isinstance(answer, dict) or "accepted" not in answer:  # the request as a whole
            hint = "check EXECWATCH_TOKEN" if status in (401, 403) else "see the daemon's log"
            error = answer.get("error") if isinstance(answer, dict) else None
            self._warn_once(f"status-{status}", "execwatch answered %s (%s) to %d events, "
                            "which are dropped: %s", status, error, len(items), hint)  # fmt: skip
            stats.rejected += len(items)
            return
        stats.sent += answer.get("accepted", 0) + answer.get("duplicates", 0)
        for directive in answer.get("directives", ()):  # first: they explain rejections
            if directive.get("action") == "cancel":
                self.client._directive(str(directive["execution_id"]), str(directive["reason"]))
        for rejection in answer.get("rejected", ()):
            stats.rejected += 1
            self._rejected(items, rejection)
        stats.rejected += answer.get("rejected_omitted", 0)
        for item in items:  # registered: now learn the agent's effective heartbeat timeout
            if item.registers:
                with self.cond:
                    run = self.lookups.pop(item.execution_id, None)
                if run is not None:
                    self._look_up(run)

    def _rejected(self, items: list[_Item], rejection: dict[str, Any]) -> None:
        index = rejection.get("index")
        known = isinstance(index, int) and 0 <= index < len(items)
        execution_id = items[index].execution_id if known else None  # type: ignore[index]
        reason = str(rejection.get("reason"))
        if execution_id in self.client._stopped and reason in LATE_REASONS:
            return  # the daemon ended it (timeout, death): its late reports bounce, as expected
        self._warn_once(
            reason, "execwatch rejected an event (%s): %s", reason, rejection.get("error")
        )

    def _failed(self, items: list[_Item], why: str, retry_after: str | None) -> None:
        self.client.stats.failed_posts += 1
        self.failures += 1
        backoff = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(self.failures - 1, 10))
        with contextlib.suppress(TypeError, ValueError):
            backoff = max(backoff, min(BACKOFF_MAX_S, float(retry_after)))  # type: ignore[arg-type]
        backoff *= random.uniform(0.8, 1.2)  # many clients must not retry in step
        with self.cond:
            self.queue.extendleft(reversed(items))
            while len(self.queue) > self.max_buffer:
                self._drop_one()
            self.client.stats.buffered = len(self.queue)
            self.retry_at = time.monotonic() + backoff
        self.mark_down(why)

    def _trouble(self, message: str, *args: object) -> None:
        """One warning per spell of trouble (unreachable, buffer full); the rest at info."""
        (log.info if self.warned_trouble else log.warning)(message, *args)
        self.warned_trouble = True

    def _recovered(self) -> None:
        self.failures = 0
        if self.down_since is not None:
            log.info(
                "execwatch at %s is reachable again after %.1fs (%d events dropped so far)",
                self.client.url,
                time.monotonic() - self.down_since,
                self.client.stats.dropped,
            )
            self.down_since = None
            self.warned_trouble = False

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key in self.warned_reasons:
            log.debug(message, *args)
            return
        self.warned_reasons.add(key)
        log.warning(message, *args)

    def _look_up(self, run: Run) -> None:
        """After registering, learn the agent's effective heartbeat timeout, so heartbeats
        go out fast enough for a daemon configured tighter than the default."""
        path = f"/v1/executions/{urllib.parse.quote(run.execution_id, safe='')}"
        if run.tenant is not None:
            path += "?" + urllib.parse.urlencode({"tenant": run.tenant})
        try:
            status, _, answer = self.http.request("GET", path)
        except (OSError, http.client.HTTPException):
            return
        if status == 200 and isinstance(answer, dict):
            timeout = (answer.get("limits") or {}).get("heartbeat_timeout_s")
            if isinstance(timeout, int | float) and timeout > 0:
                run.set_heartbeat_timeout(float(timeout))


class Client:
    """Reports executions to one execwatch daemon. Thread-safe; one per process is enough.

    `url` defaults to EXECWATCH_URL (else http://127.0.0.1:9478), `token` to
    EXECWATCH_TOKEN. `tenant` is only for an all-tenants token (a tenant's token
    implies its tenant).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        tenant: str | None = None,
        max_buffer: int = 10_000,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = (url or os.environ.get("EXECWATCH_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("EXECWATCH_TOKEN")
        self.tenant = tenant
        self.timeout_s = timeout_s
        self.stats = ClientStats()
        self._runs: dict[str, Run] = {}
        self._runs_lock = threading.Lock()
        self._stopped: dict[str, str] = {}
        """Executions the daemon asked to stop (bounded): their late reports bounce."""
        self._breakers: dict[str, tuple[float, dict[str, Any]]] = {}
        """Breaker answers by agent, with when they expire."""
        self.max_buffer = max_buffer
        self._sender = _Sender(self, max_buffer)
        self._closed = False
        _LIVE_CLIENTS.add(self)

    # ---- tracking ------------------------------------------------------------------------

    def track(
        self,
        agent: str,
        *,
        execution_id: str | None = None,
        kind: str = "agent",
        parent_id: str | None = None,
        attributes: dict[str, str | int | float | bool] | None = None,
        pid: int | None = None,
        check_breaker: bool = True,
        **limits: float,
    ) -> Run:
        """A run of `agent`: use it as `with`, `async with`, or a decorator. `limits` are
        the detector limits of the event contract (run_timeout_s=..., ...); `pid` lets
        the daemon sample (and under policy terminate, signal) that process."""
        unknown = set(limits) - LIMIT_FIELDS
        if unknown:
            raise TypeError(
                f"track() got unknown limits {sorted(unknown)}; allowed: {sorted(LIMIT_FIELDS)}"
            )
        return Run(self, agent, execution_id, kind, parent_id, attributes, pid,
                   check_breaker, limits)  # fmt: skip

    def state(self, execution_id: str, state: str, **fields: Any) -> None:
        """Report one state event as it is (any vocabulary the daemon knows): for engines
        that drive their own lifecycle. Never raises."""
        self._put({"type": "state", "execution_id": execution_id, "state": state, **fields})

    def heartbeat(self, execution_id: str, **fields: Any) -> None:
        """Report one heartbeat as it is. Never raises."""
        self._put({"type": "heartbeat", "execution_id": execution_id, **fields})

    def breaker(self, agent: str) -> dict[str, Any] | None:
        """The agent's breaker as the daemon sees it, or None when it cannot say. One
        attempt of BREAKER_TIMEOUT_S at most; an answer is reused for BREAKER_CACHE_S; a
        daemon that does not answer is marked down, so later runs do not wait on it."""
        if self._sender.down_since is not None:
            return None  # do not hold the application up on a daemon known to be down
        now = time.monotonic()
        cached = self._breakers.get(agent)
        if cached is not None and cached[0] > now:
            return cached[1]
        path = f"/v1/breakers/{urllib.parse.quote(agent, safe='')}"
        if self.tenant is not None:
            path += "?" + urllib.parse.urlencode({"tenant": self.tenant})
        self.stats.breaker_checks += 1
        conn = _Http(self.url, self.token, BREAKER_TIMEOUT_S)
        try:
            status, _, answer = conn._once("GET", path, None)
        except (OSError, http.client.HTTPException) as exc:
            self._sender.mark_down(f"{type(exc).__name__}: {exc}")
            return None
        finally:
            conn.close()
        if status != 200 or not isinstance(answer, dict):
            return None
        if len(self._breakers) > MAX_STOPPED:
            self._breakers.clear()
        self._breakers[agent] = (now + BREAKER_CACHE_S, answer)
        return answer

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until what was reported so far is sent; False if `timeout_s` ran out."""
        return self._sender.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is buffered (for `timeout_s` at most) and stop the sender."""
        if not self._closed:
            self._closed = True
            _LIVE_CLIENTS.discard(self)
            self._sender.stop(timeout_s)

    def _after_fork(self) -> None:
        """In a forked child: the sender thread did not survive the fork, and what the
        parent had queued is the parent's to send. Start over with a sender of our own."""
        self._runs = {}
        self._runs_lock = threading.Lock()
        self._sender = _Sender(self, self.max_buffer)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------

    def _put(self, event: dict[str, Any], run: Run | None = None) -> None:
        try:
            if self.tenant is not None:
                event.setdefault("tenant", self.tenant)
            event.setdefault("ts", time.time())
            self._sender.put(event, run)
        except Exception:
            log.exception("execwatch client: could not queue an event; continuing")

    def _directive(self, execution_id: str, reason: str) -> None:
        self._stopped[execution_id] = reason
        if len(self._stopped) > MAX_STOPPED:
            del self._stopped[next(iter(self._stopped))]
        run = self._runs.get(execution_id)
        if run is not None:
            run._cancel(reason)

    def _register(self, run: Run) -> None:
        with self._runs_lock:
            self._runs[run.execution_id] = run
        self._sender.beat(run)

    def _unregister(self, run: Run) -> None:
        self._sender.unbeat(run)
        with self._runs_lock:
            self._runs.pop(run.execution_id, None)


class AsyncClient(Client):
    """The same client for asyncio code: the calls that wait are coroutines, and runs
    are used with `async with` (or as decorators of coroutine functions)."""

    async def breaker_async(self, agent: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.breaker, agent)

    async def aflush(self, timeout_s: float = 5.0) -> bool:
        return await asyncio.to_thread(self.flush, timeout_s)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        await asyncio.to_thread(self.close, timeout_s)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Run:
    """One execution being tracked. Made by Client.track()."""

    def __init__(
        self,
        client: Client,
        agent: str,
        execution_id: str | None,
        kind: str,
        parent_id: str | None,
        attributes: dict[str, Any] | None,
        pid: int | None,
        check_breaker: bool,
        limits: dict[str, float],
    ) -> None:
        self.client = client
        self.agent = agent
        self.execution_id = execution_id or f"{agent}-{uuid.uuid4().hex[:16]}"
        self.given_id = execution_id is not None
        self.kind = kind
        self.parent_id = parent_id
        self.attributes = attributes
        self.pid = pid
        self.check_breaker = check_breaker
        self.limits = limits
        self.tenant = client.tenant
        self.key = (self.tenant, self.execution_id)
        self.explicit_heartbeat = "heartbeat_timeout_s" in limits
        timeout_s = limits.get("heartbeat_timeout_s", DEFAULT_HEARTBEAT_TIMEOUT_S)
        self.interval_s = max(MIN_HEARTBEAT_INTERVAL_S, timeout_s * HEARTBEAT_FRACTION)
        self.next_beat_at = time.monotonic() + self.interval_s
        self.seq = 0
        self.progress_value: float = 0
        self.cancel_reason: str | None = None
        self.started = False
        self.ended = False
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: contextvars.Token[Run | None] | None = None

    # ---- reporting -----------------------------------------------------------------------

    def progress(self, value: float | None = None, **fields: Any) -> None:
        """A heartbeat that says the run moved forward (by one, or to `value`). Raises
        ExecutionCancelled if the daemon asked this run to stop (sync code)."""
        self.check()
        self.progress_value = value if value is not None else self.progress_value + 1
        self._send({"type": "heartbeat", "progress": self.progress_value, **fields})

    def phase(self, name: str) -> None:
        """The run entered a phase (thinking, tool_executing, compensating, ...)."""
        self.check()
        self._send({"type": "state", "state": "running", "phase": name})

    def pause(self, phase: str | None = None) -> None:
        """The run waits (for a human, a yield): paused time counts against no timeout."""
        self._send({"type": "state", "state": "paused", **({"phase": phase} if phase else {})})

    def resume(self, phase: str | None = None) -> None:
        self._send({"type": "state", "state": "running", **({"phase": phase} if phase else {})})

    def check(self) -> None:
        """Raise ExecutionCancelled if the daemon asked this run to stop."""
        if self.cancel_reason is not None and self._task is None:
            raise ExecutionCancelled(self.execution_id, self.cancel_reason)

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    # ---- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Run:
        if self.check_breaker:
            self._admit(self.client.breaker(self.agent))
        self._start()
        self._token = _CURRENT.set(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._end(exc)

    async def __aenter__(self) -> Run:
        if self.check_breaker:
            self._admit(await asyncio.to_thread(self.client.breaker, self.agent))
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._start()
        self._token = _CURRENT.set(self)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._end(exc)

    def __call__(self, fn: F) -> F:
        """Decorate a function: every call is a new run of this agent, with these limits."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with self._fresh():
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run_sync(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return fn(*args, **kwargs)

        return run_sync  # type: ignore[return-value]

    def _fresh(self) -> Run:
        return Run(self.client, self.agent, None, self.kind, self.parent_id, self.attributes,
                   self.pid, self.check_breaker, self.limits)  # fmt: skip

    def _admit(self, breaker: dict[str, Any] | None) -> None:
        if breaker is not None and breaker.get("allow") is False:
            raise BreakerOpen(
                self.agent, str(breaker.get("state")), float(breaker.get("retry_after_s") or 0)
            )

    def _start(self) -> None:
        if self.started:
            raise RuntimeError(f"run {self.execution_id!r} was already started; track() again")
        self.started = True
        event: dict[str, Any] = {
            "type": "state",
            "state": "running",
            "agent": self.agent,
            "kind": self.kind,
            **self.limits,
        }
        if self.parent_id is not None:
            event["parent_id"] = self.parent_id
        if self.attributes:
            event["attributes"] = self.attributes
        if self.pid is not None:
            event["pid"] = self.pid
        self.client._register(self)
        self._send(event)

    def _end(self, exc: BaseException | None) -> None:
        self.ended = True
        try:
            self.client._unregister(self)
            if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
                self._send({"type": "state", "state": "completed"})
            elif isinstance(
                exc,
                ExecutionCancelled | asyncio.CancelledError | KeyboardInterrupt | GeneratorExit,
            ):
                reason = self.cancel_reason or type(exc).__name__
                self._send({"type": "state", "state": "cancelled", "error": reason})
            else:
                error = {"type": type(exc).__qualname__, "message": str(exc)[:1000]}
                self._send({"type": "state", "state": "failed", "error": error})
                self.client._breakers.pop(self.agent, None)  # a failure may open it
        finally:
            if self._token is not None:
                with contextlib.suppress(ValueError):  # another context (a thread) reset it
                    _CURRENT.reset(self._token)
                self._token = None

    def _send(self, event: dict[str, Any]) -> None:
        event["execution_id"] = self.execution_id
        self.client._put(event, self)

    def number(self, event: dict[str, Any]) -> None:
        """Give `event` this run's next seq (called under the sender's lock, in queue order)."""
        self.seq += 1
        event["seq"] = self.seq
        if event["type"] == "state":
            event["event_id"] = f"{self.execution_id}:{self.seq}"  # retries are duplicates

    def heartbeat_body(self) -> bytes:
        """A background heartbeat, built as its batch leaves: no seq (it can never make a
        state event look stale), no progress (it says "alive", not "moved")."""
        event: dict[str, Any] = {"type": "heartbeat", "execution_id": self.execution_id}
        if self.tenant is not None:
            event["tenant"] = self.tenant
        return json.dumps(event, separators=(",", ":")).encode()

    def set_heartbeat_timeout(self, timeout_s: float) -> None:
        """The agent's effective timeout, learnt after registering: beat fast enough."""
        self.interval_s = max(MIN_HEARTBEAT_INTERVAL_S, timeout_s * HEARTBEAT_FRACTION)
        self.next_beat_at = min(self.next_beat_at, time.monotonic() + self.interval_s)

    def _cancel(self, reason: str) -> None:
        """A cancel directive arrived (on the sender thread)."""
        if self.cancel_reason is not None or self.ended:
            return
        self.cancel_reason = reason
        log.info("execwatch asked run %s to stop (%s)", self.execution_id, reason)
        self.client._sender.unbeat(self, forget=False)  # it ended for the daemon: no beats
        if self._task is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to cancel
                self._loop.call_soon_threadsafe(self._cancel_task, reason)

    def _cancel_task(self, reason: str) -> None:
        """On the run's loop: cancel its task, unless the run ended in the meantime (the
        task has moved on to the application's other work)."""
        if not self.ended and self._task is not None:
            self._task.cancel(f"execwatch: {reason}")
