"""Dashboards: up to date with their generator, linted, and naming only metrics that exist."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from monitor.testing import FakeClock
from tests.conftest import ClientFactory
from tests.integration.test_metrics import CONFIG, scenario, scrape

ROOT = Path(__file__).resolve().parents[2] / "dashboards"
BOARDS = sorted((ROOT / "grafana").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression) of every query."""
    return [
        (path.name, panel["title"], t["expr"])
        for path in BOARDS
        for panel in panels(load(path))
        for t in panel["targets"]
    ]


def test_the_committed_json_is_what_the_generator_writes() -> None:
    """Regenerate (`python dashboards/generate.py`) and commit when this fails."""
    rendered = generator().render()
    assert sorted(rendered) == [path.name for path in BOARDS]
    for path in BOARDS:
        assert rendered[path.name] == path.read_text(), f"{path.name} is stale"


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.name)
def test_dashboards_follow_the_linter_rules(path: Path) -> None:
    """Fixed uid; the datasource/job/instance/agent variables; every panel on the datasource
    variable, with a unit and a description; ids unique and panels not overlapping."""
    board = load(path)
    assert board["uid"].startswith("execwatch-")
    names = [v["name"] for v in board["templating"]["list"]]
    assert ["datasource", "job", "instance", "agent"] == names
    cells: set[tuple[int, int]] = set()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        title = panel["title"]
        assert DATASOURCE == panel["datasource"], title
        assert all(DATASOURCE == t["datasource"] for t in panel["targets"]), title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel.get("description"), f"{title}: no description"
        grid = panel["gridPos"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not cells & area, f"{title} overlaps another panel"
        assert grid["x"] + grid["w"] <= 24
        cells |= area


@pytest.mark.parametrize(("board", "title", "expr"), queries(), ids=lambda v: str(v)[:40])
def test_every_query_selects_job_and_instance_and_uses_the_rate_interval(
    board: str, title: str, expr: str
) -> None:
    """job and instance matchers on every selector (recording rules carry job only, having
    summed instances away); every range is $__rate_interval."""
    selectors = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr)
    assert selectors, expr
    for metric, matchers in selectors:
        assert 'job=~"$job"' in matchers, f"{title}: {metric} without the job matcher"
        if ":" not in metric:
            assert 'instance=~"$instance"' in matchers, f"{title}: {metric} without instance"
    for window in re.findall(r"\[([^\]]+)\]", expr):
        assert "$__rate_interval" == window, f"{title}: a range of {window}"


def named_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b(execwatch_[a-z_]+|[a-z_]+:execwatch_[a-z_]+:[a-z0-9_]+)\b", text))


async def test_every_metric_named_exists_in_a_seeded_scrape(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """A renamed metric fails here, not in front of a dashboard's user."""
    client = await make_client(CONFIG)
    await scenario(client, clock)
    text = await scrape(client)
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}  # fmt: skip
    rules = (ROOT / "prometheus" / "execwatch_rules.yml").read_text()
    recorded = set(re.findall(r"record: (\S+)", rules))
    names = set()
    for path in [*BOARDS, ROOT / "prometheus" / "execwatch_alerts.yml",
                 ROOT / "prometheus" / "execwatch_rules.yml"]:  # fmt: skip
        names |= named_metrics(path.read_text())
    for name in sorted(names):
        assert name in exposed or name in recorded, f"{name} is named but never exposed"
    assert "process_resident_memory_bytes" in exposed


def test_provisioning_points_at_the_dashboards_and_a_prometheus() -> None:
    """Grafana pointed at the provisioning folder shows the dashboards with no clicks."""
    provisioning = ROOT / "grafana" / "provisioning"
    dashboards = (provisioning / "dashboards" / "execwatch.yaml").read_text()
    datasource = (provisioning / "datasources" / "prometheus.yaml").read_text()
    assert "type: file" in dashboards
    assert "path:" in dashboards
    assert "type: prometheus" in datasource
