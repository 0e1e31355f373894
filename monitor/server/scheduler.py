"""The loops around the pure detectors: tick, memory sampling, and process termination."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence

import psutil
import structlog
from aiohttp import web

from monitor.detectors.engine import Detectors, Record, Terminate
from monitor.server.ingest import Ingestor
from monitor.server.keys import (
    CLOCK,
    DETECTORS,
    HEALTH,
    INGESTOR,
    NOTIFIER,
    PROCESSES,
    SETTINGS,
)

log = structlog.get_logger("execwatch.detectors")


class ProcessWatch:
    """The daemon's hands on real processes: samples the RSS of executions that gave a pid,
    and carries out policy `terminate` (SIGTERM, then SIGKILL after the grace).

    A process is only ever signalled when all of these hold: the daemon sampled it itself
    and recorded its identity (pid + creation time) then, it is still that process, it runs
    under the daemon's own uid, and it is not pid 1, the daemon or one of its ancestors.
    Never a process group.
    """

    def __init__(self) -> None:
        self._identities: dict[tuple[tuple[str, str], int], float] = {}
        """(execution key, pid) -> process creation time seen at the first sample."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent: list[tuple[int, str]] = []
        """(pid, signal name) of every signal sent, for the record and for tests."""
        self.refused: list[tuple[int, str]] = []
        """(pid, why) of every termination refused."""

    # ---- sampling ------------------------------------------------------------------------

    def sample(self, targets: list[tuple[tuple[str, str], int]]) -> dict[int, int | None]:
        """RSS of each distinct pid (None when it is gone or no longer the same process).
        Runs in a worker thread: psutil calls block."""
        rss: dict[int, int | None] = {}
        for key, pid in targets:
            if pid in rss:
                continue
            try:
                process = psutil.Process(pid)
                created = process.create_time()
                seen = self._identities.setdefault((key, pid), created)
                rss[pid] = process.memory_info().rss if seen == created else None
            except psutil.Error:
                rss[pid] = None
        return rss

    def forget(self, live: set[tuple[str, str]]) -> None:
        """Drop the identities of executions that are no longer sampled."""
        for ident in [i for i in self._identities if i[0] not in live]:
            del self._identities[ident]

    # ---- termination ---------------------------------------------------------------------

    def start(self, action: Terminate) -> None:
        task = asyncio.create_task(self._terminate(action))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def check(self, key: tuple[str, str], pid: int) -> psutil.Process | str:
        """The process to signal, or why it must not be."""
        if pid <= 1 or pid == os.getpid():
            return "protected pid"
        try:
            me = psutil.Process()
            if pid in {parent.pid for parent in me.parents()}:
                return "an ancestor of the daemon"
            process = psutil.Process(pid)
            created = process.create_time()
            if self._identities.get((key, pid)) != created:
                return "not the process the daemon sampled for this execution"
            if process.uids().real != me.uids().real:
                return "runs under another user"
        except psutil.Error:
            return "no such process"
        return process

    async def _terminate(self, action: Terminate) -> None:
        key = (action.tenant, action.execution_id)
        found = self.check(key, action.pid)
        if isinstance(found, str):
            self.refused.append((action.pid, found))
            log.warning("terminate_refused", pid=action.pid, reason=found,
                        execution_id=action.execution_id, tenant=action.tenant)  # fmt: skip
            return
        try:
            found.send_signal(signal.SIGTERM)  # psutil re-checks it is still that process
            self.sent.append((action.pid, "SIGTERM"))
            log.warning("execution_terminated", pid=action.pid, signal="SIGTERM",
                        execution_id=action.execution_id, tenant=action.tenant)  # fmt: skip
            _, alive = await asyncio.to_thread(psutil.wait_procs, [found], action.grace_s)
            if alive:
                found.send_signal(signal.SIGKILL)
                self.sent.append((action.pid, "SIGKILL"))
                log.warning("execution_killed", pid=action.pid, signal="SIGKILL",
                            execution_id=action.execution_id, tenant=action.tenant)  # fmt: skip
        except psutil.Error:
            pass  # it went away by itself

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def run_ticks(app: web.Application) -> None:
    """The detector loop: one tick per wake-up, waking for the next deadline.

    Loop lag is measured on the monotonic clock: if the loop woke `blind_lag_s` late,
    the daemon was blind for that long and every execution gets a fresh heartbeat grace.
    """
    detectors, ingestor = app[DETECTORS], app[INGESTOR]
    clock, settings, terminator = app[CLOCK], app[SETTINGS].detectors, app[PROCESSES]
    expected = time.monotonic()
    frozen_at = expected
    last_wall, last_mono = clock(), expected
    checkpointed_at = expected
    health, notifier = app[HEALTH], app[NOTIFIER]
    while True:
        woke = time.monotonic()
        health.ticked_at = woke
        notifier.pet()  # systemd's watchdog: fed by this loop, so a stalled loop restarts
        if woke - frozen_at >= FREEZE_EVERY_S:
            freeze_long_lived()
            frozen_at = woke
        now = clock()
        lag = max(0.0, woke - expected)
        # The wall clock jumped ahead of the monotonic one (an NTP step, a suspended host):
        # deadlines are on the wall clock, so the daemon was as blind as if it had stalled.
        jump = (now - last_wall) - (woke - last_mono)
        last_wall, last_mono = now, woke
        detectors.loop_lag_s = lag
        if lag > settings.blind_lag_s or jump > settings.blind_lag_s:
            detectors.regain_sight(now)
            log.warning("detector_was_blind", loop_lag_s=round(lag, 3), clock_jump_s=round(jump, 3))
        await _tick(detectors, ingestor, terminator, now, clock)
        if time.monotonic() - checkpointed_at >= CHECKPOINT_EVERY_S:
            checkpointed_at = time.monotonic()
            try:
                await ingestor.commit(checkpoint=True)
            except Exception:
                log.exception("checkpoint_failed")  # owed to the next one; the loop goes on
        next_due = detectors.next_due()
        sleep = settings.interval_s
        if next_due is not None:
            sleep = min(sleep, max(0.0, next_due - clock()))
        expected = time.monotonic() + sleep
        await asyncio.sleep(sleep)


FREEZE_EVERY_S = 1.0
CHECKPOINT_EVERY_S = 5.0
"""Heartbeats' liveness facts are written this often (state changes: before each ack)."""


def freeze_long_lived() -> None:
    """Keep long-lived objects out of the cyclic GC's full collections.

    Each live execution holds a few GC-tracked objects; at 100k of them a full collection
    took 179 ms (measured), which stalls the loop and makes every deadline in that window
    late. Collecting the young generations and then freezing the survivors (CPython's
    gc.freeze) leaves full collections only the objects made since. The registry's data
    is acyclic and freed by reference counting, frozen or not.
    """
    gc.collect(1)
    gc.freeze()


GC_THRESHOLD = (10_000, 10, 10)
"""The cyclic GC's allocation thresholds while the daemon runs (CPython's default: 700).

A sweep that ends 10k executions at once allocates ~10 objects per death that live until
its slice is committed and handed to the sinks: at 700, young collections ran ~50 times in
one such sweep and re-scanned those survivors, 10-15% of it (measured with gc.callbacks).
Short-lived objects die by reference counting before a collection at 10,000 ever sees
them. Long-lived ones are frozen (freeze_long_lived) either way."""


def tune_gc() -> tuple[int, int, int]:
    """Set GC_THRESHOLD; return the thresholds it replaced."""
    previous = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    return previous


TICK_BUDGET = 1000
"""Due entries handled per slice; between slices the loop commits, yields and re-reads the
clock, so 10k deadlines falling due at once are announced as they are decided."""


async def _tick(
    detectors: Detectors,
    ingestor: Ingestor,
    terminator: ProcessWatch,
    now: float,
    clock: Callable[[], float],
) -> None:
    """Sweep in slices of TICK_BUDGET, each under the write lock and committed at once."""
    more = [True]

    def step() -> Sequence[Record]:
        at = max(now, clock())  # the lock may have been waited for: now is later
        result = detectors.tick(at, TICK_BUDGET)
        for name, exc in result.failures:
            log.error("detector_failed", detector=name, exc_info=exc)
        for action in result.actions:  # whether or not the store then keeps up
            terminator.start(action)
        detectors.registry.evict(at)
        more[0] = result.more
        return result.records

    try:
        while more[0]:
            try:
                await ingestor.sweep(step)
            except Exception:
                log.exception("tick_failed")  # the loop never dies
                return
            if more[0]:
                await asyncio.sleep(0)
    finally:
        ingestor.settle()  # the metrics count the sweep once every slice is announced


async def run_sampler(app: web.Application) -> None:
    """Sample the RSS of executions that gave a pid, a bounded number per interval."""
    detectors, clock, watch = app[DETECTORS], app[CLOCK], app[PROCESSES]
    settings = app[SETTINGS].detectors
    cursor = 0
    while True:
        await asyncio.sleep(settings.memory_sample_interval_s)
        try:
            cursor = await sample_memory(detectors, watch, clock, settings.memory_samples_max,
                                         cursor)  # fmt: skip
        except Exception:
            log.exception("memory_sampling_failed")


async def sample_memory(
    detectors: Detectors,
    watch: ProcessWatch,
    clock: Callable[[], float],
    most: int,
    cursor: int,
) -> int:
    """Sample up to `most` unfinished executions with a pid, round robin from position
    `cursor`; return where the next round starts. psutil runs off the event loop."""
    with_pid = detectors.registry.with_pid
    keys = list(with_pid)
    if not keys:
        return 0
    start = cursor % len(keys)
    chosen = (keys[start:] + keys[:start])[:most]
    targets = [(key, pid) for key in chosen if (pid := with_pid[key].pid) is not None]
    rss = await asyncio.to_thread(watch.sample, targets)
    now = clock()
    for key, pid in targets:
        ex = with_pid.get(key)
        value = rss.get(pid)
        if ex is not None and ex.pid == pid and value is not None:
            detectors.observe_rss(ex, value, now)
    watch.forget(set(with_pid))
    return start + len(chosen)


def detector_tasks(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: run the detector loop and the sampler for the app's lifetime."""
    return _run_tasks(app)


async def _run_tasks(app: web.Application) -> AsyncIterator[None]:
    previous = tune_gc()
    tasks = [asyncio.create_task(run_ticks(app))]
    if app[SETTINGS].detectors.memory_samples_max:
        tasks.append(asyncio.create_task(run_sampler(app)))
    yield
    if gc.get_threshold() == GC_THRESHOLD:  # another app may have set its own since
        gc.set_threshold(*previous)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await app[PROCESSES].close()
