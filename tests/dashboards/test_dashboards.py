"""Dashboards: up to date with their generator, linted, and naming only metrics that exist."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from exporters.prometheus import DETECTOR, FINDINGS
from monitor.detectors.breaker import BreakerState
from monitor.states import ExecState
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


SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\[[^\]]*\])?")
FUNCTIONS = {"sum", "max", "min", "by", "rate", "increase", "histogram_quantile", "time", "le",
             "avg", "count", "without"}  # fmt: skip
UNITS = {"short", "ops", "percentunit", "s", "bytes", "none"}


@pytest.mark.parametrize(("board", "title", "expr"), queries(), ids=lambda v: str(v)[:40])
def test_every_query_selects_job_and_instance_and_uses_the_rate_interval(
    board: str, title: str, expr: str
) -> None:
    """Every metric carries job and instance matchers; counters and histogram buckets appear
    only under rate()/increase() over $__rate_interval, gauges never do."""

    # Mask label values and grouping labels (same length, so offsets still match `expr`).
    def mask(m: re.Match[str]) -> str:
        return "#" * len(m.group())

    text = re.sub(r'"[^"]*"', mask, expr)
    text = re.sub(r"\b(by|without) \([^)]*\)", mask, text)
    metrics = 0
    for match in SELECTOR.finditer(text):
        name, matchers, window = match.groups()
        if name in FUNCTIONS or name.isdigit() or (name == "state" and matchers is None):
            continue
        metrics += 1
        original = expr[match.start() :]
        assert matchers is not None, f"{title}: {name} has no matchers"
        assert original.startswith(f'{name}{{job=~"$job", instance=~"$instance"'), (
            f"{title}: {name} without the job and instance matchers first"
        )
        counter = name.endswith(("_total", "_bucket"))
        wrapped = re.search(r"(rate|increase)\($", text[: match.start()]) is not None
        assert counter == wrapped, (
            f"{title}: {name} {'needs' if counter else 'must not be in'} rate()"
        )
        if counter:
            assert "[$__rate_interval]" == window, f"{title}: {name} over {window}"
        else:
            assert window is None, f"{title}: a range on the gauge {name}"
    assert metrics, expr


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.name)
def test_variables_and_units_follow_the_conventions(path: Path) -> None:
    """Query variables refresh on time-range change, multi ones allow All as .+; known units."""
    board = load(path)
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert 2 == variable["refresh"], variable["name"]
            assert DATASOURCE == variable["datasource"]
            if variable["multi"]:
                assert (True, ".+") == (variable["includeAll"], variable["allValue"])
    for panel in panels(board):
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]


def test_every_dashboard_expression_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses them all (variables given example values), without a Prometheus."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs it)")
    values = {"$job": "execwatch", "$instance": ".+", "$agent": "a", "$__rate_interval": "1m"}
    lines = ["groups:", "  - name: dashboards", "    rules:"]
    for index, (_, _, template) in enumerate(queries()):
        expr = template
        for name, value in values.items():
            expr = expr.replace(name, value)
        lines += [f"      - record: dashboard_query_{index}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "queries.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert 0 == result.returncode, result.stdout + result.stderr


def test_every_label_value_named_is_one_execwatch_exports() -> None:
    """A typo in a reason, detector, finding or state would silently disable an alert."""
    known = {
        "reason": set(DETECTOR),
        "detector": set(DETECTOR.values()),
        "finding": set(FINDINGS),
        "state": {s.value for s in ExecState} | {s.value for s in BreakerState},
        "type": {"state", "heartbeat", "invalid"},
    }
    texts = [path.read_text() for path in BOARDS]
    texts += [(ROOT / "prometheus" / name).read_text()
              for name in ("execwatch_rules.yml", "execwatch_alerts.yml")]  # fmt: skip
    found = 0
    for raw in texts:
        text = raw.replace('\\"', '"')
        for label, operator, value in re.findall(
            r'\b(reason|detector|finding|state|type)(=~?)"([^"]*)"', text
        ):
            for one in value.split("|") if operator == "=~" else [value]:
                found += 1
                assert one in known[label], f'{label}="{one}" is not a value execwatch exports'
    assert found > 10


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
