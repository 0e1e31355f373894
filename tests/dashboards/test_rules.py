"""The alert and recording rules: promtool checks them and runs their unit tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "dashboards" / "prometheus"
RUNBOOKS = Path(__file__).resolve().parents[2] / "dashboards" / "runbooks.md"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: `make test` installs Debian's prometheus package")
        pytest.skip("promtool is not installed (make test installs it)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False, cwd=RULES
    )


def test_every_rule_file_is_valid() -> None:
    """promtool check rules: every expression parses, no duplicate rules."""
    result = run("check", "rules", "execwatch_rules.yml", "execwatch_alerts.yml")
    assert 0 == result.returncode, result.stdout + result.stderr


def test_every_alert_fires_and_stays_silent_as_its_tests_say() -> None:
    """promtool test rules passes."""
    result = run("test", "rules", "execwatch_alerts_test.yml")
    assert 0 == result.returncode, result.stdout + result.stderr


def alerts() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", (RULES / "execwatch_alerts.yml").read_text(), re.M)


def test_every_alert_is_tested_both_ways() -> None:
    """Each alert has a firing case and a silent case in the unit tests."""
    tests = (RULES / "execwatch_alerts_test.yml").read_text()
    for alert in alerts():
        pattern = rf"alertname: {alert}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n\s*\n|$)"
        cases = re.findall(pattern, tests, re.S)
        assert any(case.strip() == "[]" for case in cases), f"{alert} never stays silent"
        assert any(case.strip() != "[]" for case in cases), f"{alert} never fires"


def test_every_alert_has_its_labels_annotations_and_runbook() -> None:
    """severity, summary, description and a runbook_url whose anchor exists."""
    text = (RULES / "execwatch_alerts.yml").read_text()
    runbooks = RUNBOOKS.read_text().lower()
    for block in text.split("- alert: ")[1:]:
        name = block.split("\n", 1)[0]
        for field in ("severity:", "summary:", "description:", "runbook_url:"):
            assert field in block, f"{name} has no {field}"
        assert f"## {name.lower()}" in runbooks, f"{name} has no runbook section"
        assert f"runbooks.md#{name.lower()}" in block
