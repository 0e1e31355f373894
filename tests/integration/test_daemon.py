"""A real `execwatch serve` subprocess on a loopback port, and the CLI around it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.cli import main

EXECWATCH = [sys.executable, "-m", "monitor.cli"]
LISTENING = re.compile(r"execwatch listening on (http://\S+)")
START_TIMEOUT_S = 30


class Daemon:
    """A real `execwatch serve` on a free loopback port (stdout: its log lines)."""

    def __init__(
        self, *args: str, stdout: int = subprocess.DEVNULL, env: dict[str, str] | None = None
    ) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EXECWATCH_")},
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [*EXECWATCH, "serve", "--listen", "127.0.0.1:0", "--database", ":memory:", *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        assert self.process.stderr is not None
        lines = []
        for line in self.process.stderr:
            lines.append(line)
            match = LISTENING.search(line)
            if match:
                return match[1]
        raise AssertionError(f"the daemon exited before listening: {''.join(lines)}")

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=START_TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    started = Daemon()
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.stop()


def test_the_real_daemon_ingests_serves_and_stops_cleanly(daemon: Daemon) -> None:
    """Events over a real socket are applied, read back, and SIGTERM ends the process with 0."""
    status, answer = daemon.request(
        "POST",
        "/v1/events",
        [
            {"type": "state", "execution_id": "run-42", "agent": "triage", "state": "queued"},
            {"type": "state", "execution_id": "run-42", "state": "in_progress"},
            {"type": "state", "execution_id": "run-42", "state": "starting"},
        ],
    )
    assert (202, 2) == (status, answer["accepted"])
    assert 409 == answer["rejected"][0]["status"]
    status, execution = daemon.request("GET", "/v1/executions/run-42")
    assert (200, "running") == (status, execution["state"])
    assert (200, {"status": "ready"}) == daemon.request("GET", "/readyz")
    assert 0 == daemon.stop()


def test_status_prints_the_live_executions(daemon: Daemon) -> None:
    """`execwatch status` reads the API and prints a table of live executions."""
    daemon.request(
        "POST",
        "/v1/events",
        [
            {
                "type": "state",
                "execution_id": "live-1",
                "agent": "triage",
                "state": "running",
                "phase": "thinking",
            },
            {"type": "state", "execution_id": "gone-1", "agent": "triage", "state": "completed"},
        ],
    )
    result = subprocess.run(
        [*EXECWATCH, "status", "--url", daemon.url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split()[:5] == ["EXECUTION", "TENANT", "AGENT", "KIND", "STATE"]
    assert [["live-1", "default", "triage", "agent", "running", "thinking"]] == [
        row.split()[:6] for row in rows
    ]


def test_status_says_when_the_daemon_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    """No daemon: exit 1 with the URL it tried."""
    assert 1 == main(["status", "--url", "http://127.0.0.1:9"])
    assert "cannot read http://127.0.0.1:9/v1/executions" in capsys.readouterr().err


def test_a_public_address_without_tokens_is_refused(tmp_path: Path) -> None:
    """No non-loopback listen without [auth.tokens] unless --insecure, and it says why."""
    result = subprocess.run(
        [*EXECWATCH, "serve", "--listen", "0.0.0.0:0", "--database", ":memory:"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("EXECWATCH_")},
    )
    assert 2 == result.returncode
    assert "no [auth.tokens] are configured" in result.stderr
    assert "--insecure" in result.stderr


def test_with_tokens_a_public_address_serves_and_demands_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tokens make a public address safe: 401 without one, the token's tenant with one; the
    probes stay open, and `execwatch status` sends EXECWATCH_TOKEN."""
    config = tmp_path / "execwatch.toml"
    config.write_text('[auth.tokens]\n"token-of-team-a" = "team-a"\n')
    daemon = Daemon("--listen", "0.0.0.0:0", "--config", str(config))
    try:
        event = {"type": "state", "execution_id": "r-1", "agent": "triage", "state": "running"}
        assert 401 == daemon.request("POST", "/v1/events", event)[0]
        token = {"Authorization": "Bearer token-of-team-a"}
        assert 202 == daemon.request("POST", "/v1/events", event, token)[0]
        status, listed = daemon.request("GET", "/v1/executions", headers=token)
        assert (200, ["team-a"]) == (status, [ex["tenant"] for ex in listed["executions"]])
        assert 200 == daemon.request("GET", "/readyz")[0]
        assert 200 == daemon.request("GET", "/healthz")[0]

        port = daemon.url.rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"
        assert 1 == main(["status", "--url", url])
        assert "401" in capsys.readouterr().err
        os.environ["EXECWATCH_TOKEN"] = "token-of-team-a"
        try:
            assert 0 == main(["status", "--url", url])
        finally:
            del os.environ["EXECWATCH_TOKEN"]
        assert "r-1" in capsys.readouterr().out
    finally:
        daemon.stop()


def test_a_busy_port_is_a_clear_error(daemon: Daemon) -> None:
    """Listening where another daemon listens: exit 2, naming the address, no traceback."""
    address = daemon.url.removeprefix("http://")
    result = subprocess.run(
        [*EXECWATCH, "serve", "--listen", address, "--database", ":memory:"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 2 == result.returncode
    assert f"cannot listen on {address}" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_accepts_a_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid file: exit 0 and 'ok'."""
    path = tmp_path / "good.toml"
    path.write_text('listen = "127.0.0.1:9478"\n[defaults]\nheartbeat_timeout_s = 5\n')
    assert 0 == main(["check-config", str(path)])
    assert f"{path}: ok" in capsys.readouterr().out


def test_check_config_names_every_bad_key_and_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid file: exit 2 and one line per problem."""
    path = tmp_path / "bad.toml"
    path.write_text('listen = "nowhere"\nlog = 1\n[defaults]\nrun_timeout_s = 0\n')
    assert 2 == main(["check-config", str(path)])
    err = capsys.readouterr().err
    assert "listen = 'nowhere': expected HOST:PORT" in err
    assert "top level: unknown key 'log'" in err
    assert "[defaults].run_timeout_s = 0: expected a number > 0" in err
