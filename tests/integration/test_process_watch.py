"""The daemon's hands on real processes: sampling, and who may never be signalled."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from monitor.config import build_settings
from monitor.detectors.engine import Detectors
from monitor.events import parse_event
from monitor.registry import Registry
from monitor.server.scheduler import ProcessWatch, sample_memory
from monitor.states import StateNames
from monitor.testing import FakeClock, state_event

KEY = ("default", "r")


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_process_the_daemon_never_sampled_is_not_signalled(
    child: subprocess.Popen[bytes],
) -> None:
    """No recorded identity, no signal: a pid named in an event is not enough."""
    assert "not the process the daemon sampled for this execution" == ProcessWatch().check(
        KEY, child.pid
    )


def test_a_sampled_process_may_be_signalled(child: subprocess.Popen[bytes]) -> None:
    """Sampled, same process, same user: it is the one to signal."""
    watch = ProcessWatch()
    rss = watch.sample([(KEY, child.pid)])
    assert (rss[child.pid] or 0) > 0
    assert child.pid == getattr(watch.check(KEY, child.pid), "pid", None)
    assert "not the process the daemon sampled for this execution" == watch.check(
        ("default", "other"), child.pid
    )


@pytest.mark.parametrize(
    ("pid", "why"),
    [(1, "protected pid"), (os.getpid(), "protected pid"),
     (os.getppid(), "an ancestor of the daemon"), (2**22 + 12345, "no such process")],
)  # fmt: skip
def test_protected_processes_are_refused(pid: int, why: str) -> None:
    """pid 1, the daemon, its ancestors and ghosts are never signalled, sampled or not."""
    watch = ProcessWatch()
    watch.sample([(KEY, pid)])
    assert why == watch.check(KEY, pid)


def test_a_recycled_pid_is_not_the_same_process(child: subprocess.Popen[bytes]) -> None:
    """An identity that no longer matches (another creation time) is refused."""
    watch = ProcessWatch()
    watch.sample([(KEY, child.pid)])
    watch._identities[(KEY, child.pid)] -= 100  # as if the pid had been reused since
    assert "not the process the daemon sampled for this execution" == watch.check(KEY, child.pid)
    assert {child.pid: None} == watch.sample([(KEY, child.pid)])


async def test_sampling_feeds_the_memory_detector(child: subprocess.Popen[bytes]) -> None:
    """sample_memory observes the real RSS of executions with a pid, round robin."""
    settings = build_settings({})
    registry = Registry(settings)
    detectors = Detectors(registry, settings)
    clock = FakeClock()
    for i in range(3):
        event = state_event(f"r{i}", "running", agent="a", pid=child.pid if i else None)
        detectors.apply(parse_event(event, clock(), StateNames()), clock())
    watch = ProcessWatch()
    cursor = await sample_memory(detectors, watch, clock, 1, 0)
    cursor = await sample_memory(detectors, watch, clock, 1, cursor)
    sampled = [ex.execution_id for ex in registry if ex.rss_sampled]
    assert ["r1", "r2"] == sampled
    assert all((ex.rss_bytes or 0) > 0 for ex in registry if ex.rss_sampled)
