"""The loops around the pure detectors: tick, memory sampling, and process termination."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import psutil
import structlog
from aiohttp import web

from monitor.detectors.engine import Detectors, Terminate
from monitor.server.ingest import Ingestor
from monitor.server.keys import CLOCK, DETECTORS, INGESTOR, SETTINGS, TERMINATOR

log = structlog.get_logger("execwatch.detectors")


class Terminator:
    """Carries out policy `terminate`: SIGTERM to the execution's own pid, SIGKILL after the
    grace if it lives on. Never signals a process group, this daemon, its parent, pid 1, or
    a process created after the execution reported its pid (a recycled pid)."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent: list[tuple[int, str]] = []
        """(pid, signal name) of every signal sent, for the record and for tests."""

    def start(self, action: Terminate) -> None:
        task = asyncio.create_task(self._terminate(action))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _process(self, action: Terminate) -> psutil.Process | None:
        pid = action.pid
        if pid <= 1 or pid in (os.getpid(), os.getppid()):
            log.warning("terminate_refused", pid=pid, reason="protected pid",
                        execution_id=action.execution_id)  # fmt: skip
            return None
        try:
            process = psutil.Process(pid)
            created = process.create_time()
        except psutil.Error:
            log.info("terminate_skipped", pid=pid, reason="no such process",
                     execution_id=action.execution_id)  # fmt: skip
            return None
        # create_time has ~10 ms resolution; a process born after the pid was reported is
        # someone else's (the clock here is wall time, like create_time).
        if created > action.pid_seen_at + 1.0:
            log.warning("terminate_refused", pid=pid, reason="pid reused",
                        execution_id=action.execution_id)  # fmt: skip
            return None
        return process

    async def _terminate(self, action: Terminate) -> None:
        process = self._process(action)
        if process is None:
            return
        try:
            process.send_signal(signal.SIGTERM)  # psutil checks the pid is still that process
            self.sent.append((action.pid, "SIGTERM"))
            log.warning("execution_terminated", pid=action.pid, signal="SIGTERM",
                        execution_id=action.execution_id, tenant=action.tenant)  # fmt: skip
            _, alive = await asyncio.to_thread(psutil.wait_procs, [process], action.grace_s)
            if alive:
                process.send_signal(signal.SIGKILL)
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
    clock, settings, terminator = app[CLOCK], app[SETTINGS].detectors, app[TERMINATOR]
    expected = time.monotonic()
    frozen_at = expected
    while True:
        woke = time.monotonic()
        if woke - frozen_at >= FREEZE_EVERY_S:
            freeze_long_lived()
            frozen_at = woke
        now = clock()
        lag = max(0.0, woke - expected)
        detectors.loop_lag_s = lag
        if lag > settings.blind_lag_s:
            detectors.regain_sight(now)
            log.warning("detector_loop_stalled", lag_s=round(lag, 3))
        await _tick(detectors, ingestor, terminator, now, clock)
        next_due = detectors.next_due()
        sleep = settings.interval_s
        if next_due is not None:
            sleep = min(sleep, max(0.0, next_due - clock()))
        expected = time.monotonic() + sleep
        await asyncio.sleep(sleep)


FREEZE_EVERY_S = 1.0


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


TICK_BUDGET = 1000
"""Due entries handled per slice; between slices the loop commits, yields and re-reads the
clock, so 10k deadlines falling due at once are announced as they are decided."""


async def _tick(
    detectors: Detectors,
    ingestor: Ingestor,
    terminator: Terminator,
    now: float,
    clock: Callable[[], float],
) -> None:
    while True:
        try:
            result = detectors.tick(now, TICK_BUDGET)
            for name, exc in result.failures:
                log.error("detector_failed", detector=name, exc_info=exc)
            for action in result.actions:
                terminator.start(action)
            detectors.registry.evict(now)
            await ingestor.commit(result.records)
        except Exception:
            log.exception("tick_failed")  # the loop never dies
            return
        if not result.more:
            return
        await asyncio.sleep(0)
        now = clock()


async def run_sampler(app: web.Application) -> None:
    """Sample the RSS of executions that gave a pid, a bounded number per interval."""
    detectors, clock = app[DETECTORS], app[CLOCK]
    settings = app[SETTINGS].detectors
    cursor = 0
    while True:
        await asyncio.sleep(settings.memory_sample_interval_s)
        try:
            cursor = sample_memory(detectors, clock(), settings.memory_samples_max, cursor)
        except Exception:
            log.exception("memory_sampling_failed")


def sample_memory(detectors: Detectors, now: float, most: int, cursor: int) -> int:
    """Sample up to `most` unfinished executions with a pid, round robin from the serial
    `cursor`; return where the next round starts. Costs what is sampled, not the fleet."""
    with_pid = sorted(detectors.registry.with_pid.values(), key=lambda ex: ex.serial)
    due = [ex for ex in with_pid if ex.serial > cursor][:most]
    if len(due) < most:
        due += with_pid[: most - len(due)]
    for ex in due:
        assert ex.pid is not None
        try:
            rss = psutil.Process(ex.pid).memory_info().rss
        except psutil.Error:
            continue
        detectors.observe_rss(ex, rss, now)
    return due[-1].serial if due else 0


def detector_tasks(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: run the detector loop and the sampler for the app's lifetime."""
    return _run_tasks(app)


async def _run_tasks(app: web.Application) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(run_ticks(app))]
    if app[SETTINGS].detectors.memory_samples_max:
        tasks.append(asyncio.create_task(run_sampler(app)))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await app[TERMINATOR].close()
