"""What supervisors see: systemd's notify protocol and watchdog, and /healthz's verdict."""

from __future__ import annotations

import argparse
import configparser
import json
import shlex
import socket
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from monitor.cli import _parser
from monitor.config import DETECTOR_KEYS, build_settings
from monitor.errors import ConfigError
from monitor.server.api import HEALTHZ_STALE_S
from monitor.server.app import ROUTES
from monitor.server.keys import HEALTH
from monitor.server.run import SHUTDOWN_TIMEOUT_S, check_exposure
from tests.conftest import ClientFactory
from tests.integration.test_api import get
from tests.integration.test_daemon import Daemon

REPO = Path(__file__).resolve().parents[2]
DETECTOR_KEYS_MAX_INTERVAL_S = 10.0
"""The largest detectors.interval_s the config accepts (checked below)."""


def messages(sock: socket.socket, until: str, timeout_s: float = 15) -> list[str]:
    """Datagrams received until one contains `until` (or the time runs out)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1]:
            break
    return got


def test_a_daemon_under_systemd_says_ready_pets_the_watchdog_and_says_stopping(
    tmp_path: Path,
) -> None:
    """Type=notify: READY=1 once listening (after the replay), WATCHDOG=1 from the
    detector loop at least twice per WatchdogSec, STOPPING=1 on SIGTERM."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
        daemon = Daemon("--database", str(tmp_path / "execwatch.db"), env=env)
        try:
            first = messages(sock, "READY=1")
            assert any(m.startswith("READY=1") and "STATUS=listening on http://127.0.0.1:" in m
                       for m in first), first  # fmt: skip
            started = time.monotonic()
            pets = [m for m in messages(sock, "never", timeout_s=1.0) if m == "WATCHDOG=1"]
            assert len(pets) >= 2, f"{len(pets)} pets in {time.monotonic() - started:.1f}s"
        finally:
            assert 0 == daemon.stop()
        assert any("STOPPING=1" in m for m in messages(sock, "STOPPING=1")), "no STOPPING=1"


def test_a_watchdog_for_another_pid_is_not_petted(tmp_path: Path) -> None:
    """WATCHDOG_PID names the process the watchdog is for; a child must not pet it."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
        daemon = Daemon(env=env)
        try:
            assert any("READY=1" in m for m in messages(sock, "READY=1"))
            assert "WATCHDOG=1" not in messages(sock, "never", timeout_s=0.6)
        finally:
            daemon.stop()


async def test_healthz_fails_when_the_detector_loop_stops_waking(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    health = client.app[HEALTH]
    health.ticked_at = time.monotonic()
    assert "ok" == (await get(client, "/healthz"))["status"]
    health.ticked_at = time.monotonic() - HEALTHZ_STALE_S - 1
    answer = await get(client, "/healthz", 503)
    assert "detector loop stalled" == answer["status"]
    assert "deaths and timeouts go undetected" in answer["detail"]


# ---- the deployment files ----------------------------------------------------------------


def serve_args(args: list[str]) -> argparse.Namespace:
    """`args` as `execwatch` parses them: a flag the CLI does not know fails here."""
    parsed = _parser().parse_args(args)
    assert "serve" == parsed.command
    return parsed


def test_the_largest_detector_interval_is_what_the_watchdog_assumes() -> None:
    check = DETECTOR_KEYS["interval_s"]
    assert check(DETECTOR_KEYS_MAX_INTERVAL_S) is None
    assert "<= 10" in str(check(DETECTOR_KEYS_MAX_INTERVAL_S + 0.5))


def test_the_systemd_unit_is_notify_with_a_watchdog_the_loop_can_feed() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "deploy" / "systemd" / "execwatch.service")
    service = unit["Service"]
    assert ("notify", "main") == (service["Type"], service["NotifyAccess"])
    # The loop wakes at least every interval_s (10 s at most) and pets at half the timeout.
    assert float(service["WatchdogSec"]) / 2 > DETECTOR_KEYS_MAX_INTERVAL_S
    assert float(service["TimeoutStopSec"]) > SHUTDOWN_TIMEOUT_S
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/execwatch")
    parsed = serve_args(command[1:])
    assert parsed.database.startswith("/var/lib/execwatch/")  # inside StateDirectory=
    assert "execwatch" == service["StateDirectory"]
    assert "multi-user.target" == unit["Install"]["WantedBy"]


def test_the_kubernetes_sidecar_probes_endpoints_that_exist() -> None:
    documents = list(
        yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "sidecar.yaml").read_text())
    )
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert "Always" == sidecar["restartPolicy"]  # a native sidecar, not a one-shot init
    assert pod["terminationGracePeriodSeconds"] > SHUTDOWN_TIMEOUT_S
    parsed = serve_args(sidecar["args"])
    port = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert {"execwatch": int(parsed.listen.rsplit(":", 1)[1])} == port
    paths = {route.path for route in ROUTES if route.method == "GET"}
    probes = {name: sidecar[name]["httpGet"] for name in
              ("startupProbe", "readinessProbe", "livenessProbe")}  # fmt: skip
    assert {"startupProbe": "/readyz", "readinessProbe": "/readyz",
            "livenessProbe": "/healthz"} == {n: p["path"] for n, p in probes.items()}  # fmt: skip
    assert all(p["path"] in paths and p["port"] == "execwatch" for p in probes.values())
    # The liveness verdict (60 s without a detector wake-up) must be able to trip.
    live = sidecar["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] < 120
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert str(port["execwatch"]) == annotations["prometheus.io/port"]
    assert "/metrics" in paths
    (worker,) = pod["containers"]
    env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"] for e in worker["env"]}
    assert f"http://127.0.0.1:{port['execwatch']}" == env["EXECWATCH_URL"]

    # No --insecure: the tokens of the mounted Secret make the pod address safe, and the
    # app's token is one of them.
    assert "--insecure" not in sidecar["args"]
    secret = next(d for d in documents if d["kind"] == "Secret")
    mount = next(m for m in sidecar["volumeMounts"] if parsed.config.startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert secret["metadata"]["name"] == volume["secret"]["secretName"]
    config = secret["stringData"]["execwatch.toml"]
    settings = build_settings(tomllib.loads(config))
    assert secret["metadata"]["name"] == env["EXECWATCH_TOKEN"]["name"]
    app_token = secret["stringData"][env["EXECWATCH_TOKEN"]["key"]]
    assert "agent-worker" == settings.auth.tokens[app_token]
    public = replace(settings, host="0.0.0.0")
    with pytest.raises(ConfigError, match="example token"):  # as shipped: a known token
        check_exposure(public, insecure=False)
    mine = build_settings(tomllib.loads(config.replace(app_token, "9c1e0f7d2b8a4e65")))
    check_exposure(replace(mine, host="0.0.0.0"), insecure=False)  # replaced: it serves
    policy = next(d for d in documents if d["kind"] == "NetworkPolicy")
    assert [{"port": port["execwatch"], "protocol": "TCP"}] == policy["spec"]["ingress"][0]["ports"]


def test_the_image_runs_serve_with_flags_the_cli_knows() -> None:
    lines = (REPO / "deploy" / "Dockerfile").read_text().splitlines()
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT"))[11:])
    cmd = json.loads(next(line for line in lines if line.startswith("CMD"))[4:])
    assert ["execwatch"] == entrypoint
    serve_args(cmd)
