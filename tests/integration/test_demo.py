"""`execwatch demo`: the README's first command shows every detector work."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from rich.console import Console

from monitor.demo import EXPECTED, Detection, Seen, live_view
from tests.integration.test_daemon import EXECWATCH


def test_the_demo_detects_every_kind_of_trouble_and_exits_0() -> None:
    """A short run, as CI can afford it: every expected detection, then the summary."""
    result = subprocess.run(
        [*EXECWATCH, "demo", "--duration", "20", "--no-live", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    out = result.stdout
    for kind in EXPECTED:
        assert f"✓ {kind}" in out, out
    assert "✗" not in out
    assert "/metrics" in out
    assert "dashboards" in out
    assert "Traceback" not in result.stderr, result.stderr
    assert "process" in out  # the leaking worker, terminated by the daemon
    assert out.count("detected ") >= len(EXPECTED)  # one line as each one happened


def test_the_live_view_renders_detections_and_the_checklist() -> None:
    seen = Seen()
    seen.add(Detection("death", "sleeper", "sleeper-1", "running -> dead", time.time()))
    console = Console(record=True, width=140, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(live_view("http://127.0.0.1:9", seen, 60))  # no daemon: no agents table rows
    text = console.export_text()
    assert "sleeper-1" in text
    assert "✓ death" in text
    assert "· stalled" in text


def running(marker: str) -> list[int]:
    """Pids of processes whose command line holds `marker` (not this test's own)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if marker in cmdline and process.info["pid"] != os.getpid():
            found.append(process.info["pid"])
    return found


def test_sigterm_stops_the_demo_and_everything_it_started() -> None:
    """SIGTERM (a CI cancel, `timeout`): the daemon, the worker processes and the
    temporary directory go with the demo."""
    demo = subprocess.Popen(
        [*EXECWATCH, "demo", "--duration", "60", "--no-live", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo.stdout is not None
    first = demo.stdout.readline()  # "execwatch demo: daemon at URL (SQLite file PATH) ..."
    workdir = Path(first.split("SQLite file ")[1].split(")")[0]).parent
    for line in demo.stdout:  # wait for the leaking worker to be running: it is detected
        if "memory" in line:
            break
    demo.send_signal(signal.SIGTERM)
    assert 130 == demo.wait(timeout=30)
    assert [] == running(f"--config {workdir}")  # the daemon went with it
    deadline = time.monotonic() + 5
    while running("from monitor.demo import child") and time.monotonic() < deadline:
        time.sleep(0.2)  # an orphaned worker notices within 0.5 s
    assert [] == running("from monitor.demo import child")
    assert not workdir.exists()
