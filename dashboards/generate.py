"""Generate the Grafana dashboards (classic JSON) into dashboards/grafana/.

    .venv/bin/python dashboards/generate.py

The output is committed; a test fails when it is stale. Every panel names its
datasource through the `datasource` variable, every query selects job and instance,
every rate uses $__rate_interval, and every panel has a unit and a description (the
dashboard linter's essential rules, checked by tests/dashboards).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "grafana"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
AGENT = f'{SEL}, agent=~"$agent"'
ONE_AGENT = f'{SEL}, agent="$agent"'
"""The drill-down picks one agent: matched exactly, since agent names are not regexes."""
RI = "$__rate_interval"
FAILED = f'{AGENT}, state=~"failed|timeout|dead"'


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


class Board:
    """Lays panels out on Grafana's 24-column grid, left to right, top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": len(self.panels) + 1,
                "collapsed": False,
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        self.y += 1

    def panel(
        self,
        title: str,
        description: str,
        unit: str,
        targets: list[tuple[str, str]],
        kind: str = "timeseries",
        width: int = 12,
        height: int = 8,
        stack: bool = False,
        max_value: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if self.x + width > 24:
            self._newline()
        defaults: dict[str, Any] = {"unit": unit, **(extra or {})}
        if max_value is not None:
            defaults["max"] = max_value
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "fillOpacity": 10,
                "lineWidth": 1,
                "stacking": {"mode": "normal" if stack else "none"},
            }
        panel: dict[str, Any] = {
            "type": kind,
            "id": len(self.panels) + 1,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"x": self.x, "y": self.y, "w": width, "h": height},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
            "targets": [
                target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "stat":
            panel["options"] = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "area",
            }
        self.panels.append(panel)
        self.x += width
        self.row_height = max(self.row_height, height)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
        self.x = 0
        self.row_height = 0


def variables(agent_multi: bool) -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str, multi: bool = True) -> dict[str, Any]:
        return {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": DS,
            "query": {"query": expr, "refId": f"{name}-query"},
            "definition": expr,
            "refresh": 2,
            "includeAll": multi,
            "multi": multi,
            "allValue": ".+" if multi else None,
            "current": {},
            "sort": 1,
            "hide": 0,
        }

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
        },
        query("job", "Job", "label_values(execwatch_build_info, job)"),
        query("instance", "Instance", 'label_values(execwatch_build_info{job=~"$job"}, instance)'),
        query("agent", "Agent", f"label_values(execwatch_executions{{{SEL}}}, agent)", agent_multi),
    ]


def dashboard(
    uid: str, title: str, description: str, board: Board, agent_multi: bool
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["execwatch"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables(agent_multi)},
        "annotations": {"list": []},
        "links": [
            {
                "title": "execwatch dashboards",
                "type": "dashboards",
                "tags": ["execwatch"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "panels": board.panels,
    }


def overview() -> dict[str, Any]:
    b = Board()
    b.row("Executions")
    b.panel(
        "Executions by state",
        "Executions held now, by state (live states and dead).",
        "short",
        [(f"sum by (state) (execwatch_executions{{{AGENT}}})", "{{state}}")],
        stack=False,  # dead is not a live state: it does not belong on top of them
    )
    b.panel(
        "Starts and finishes",
        "Executions registered and finished per second, by final state.",
        "ops",
        [
            (f"sum(rate(execwatch_executions_started_total{{{AGENT}}}[{RI}]))", "started"),
            (
                f"sum by (state) (rate(execwatch_executions_finished_total{{{AGENT}}}[{RI}]))",
                "{{state}}",
            ),
        ],
    )
    b.panel(
        "Failure ratio",
        "Share of finishes that failed, timed out or died.",
        "percentunit",
        [
            (
                f"sum(rate(execwatch_executions_finished_total{{{FAILED}}}[{RI}]))"
                f" / sum(rate(execwatch_executions_finished_total{{{AGENT}}}[{RI}]))",
                "failure ratio",
            )
        ],
        max_value=1,
    )
    b.panel(
        "Failure ratio by agent (5m)",
        "The recorded failure ratio per agent and instance (recording rule "
        "job_instance_agent:execwatch_executions_failed_per_finished:ratio_rate5m).",
        "percentunit",
        [
            (
                "job_instance_agent:execwatch_executions_failed_per_finished:ratio_rate5m"
                f"{{{AGENT}}}",
                "{{agent}} {{instance}}",
            )
        ],
        max_value=1,
    )
    b.row("Detections")
    b.panel(
        "Detections by detector and reason",
        "Timeouts, deaths, stalls, memory findings and breakers opening, per second.",
        "ops",
        [
            (
                f"sum by (detector, reason) (rate(execwatch_detections_total{{{AGENT}}}[{RI}]))",
                "{{detector}}/{{reason}}",
            )
        ],
        stack=True,
    )
    b.panel(
        "Active findings",
        "Stalled executions and memory findings standing now.",
        "short",
        [(f"sum by (finding) (execwatch_findings{{{AGENT}}})", "{{finding}}")],
    )
    b.panel(
        "Oldest heartbeat age",
        "Seconds since the oldest last heartbeat among each agent's live executions.",
        "s",
        [
            (
                "time() - min by (agent) "
                f"(execwatch_oldest_heartbeat_timestamp_seconds{{{AGENT}}})",
                "{{agent}}",
            )
        ],
    )
    b.panel(
        "Detection lag (p99)",
        "How long after a deadline its detection came, 99th percentile.",
        "s",
        [
            (
                f"histogram_quantile(0.99, sum by (le, detector) "
                f"(rate(execwatch_detection_lag_seconds_bucket{{{SEL}}}[{RI}])))",
                "{{detector}}",
            )
        ],
    )
    b.row("Circuit breakers")
    b.panel(
        "Breakers by state",
        "How many agents' breakers are closed, open or half open.",
        "short",
        [(f"sum by (state) (execwatch_circuit_breaker_state{{{AGENT}}})", "{{state}}")],
    )
    b.panel(
        "Open breakers",
        "Agents whose breaker is open (1) over time.",
        "short",
        [
            (
                f'max by (agent) (execwatch_circuit_breaker_state{{{AGENT}, state="open"}})',
                "{{agent}}",
            )
        ],
    )
    b.row("Ingest")
    b.panel(
        "Events received",
        "Events per second, by type.",
        "ops",
        [(f"sum by (type) (rate(execwatch_events_received_total{{{SEL}}}[{RI}]))", "{{type}}")],
    )
    b.panel(
        "Events rejected",
        "Rejected events per second, by reason.",
        "ops",
        [(f"sum by (reason) (rate(execwatch_events_rejected_total{{{SEL}}}[{RI}]))", "{{reason}}")],
    )
    b.row("Daemon health")
    b.panel(
        "Up",
        "Whether Prometheus can scrape execwatch: 1 up, 0 down.",
        "none",
        [(f"up{{{SEL}}}", "{{instance}}")],
        kind="stat",
        width=6,
        extra={
            "mappings": [
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "down", "color": "red"},
                        "1": {"text": "up", "color": "green"},
                    },
                }
            ],
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
            },
        },
    )
    b.panel(
        "Detector loop",
        "Seconds since the last detector sweep, and how late the loop woke.",
        "s",
        [
            (
                f"time() - execwatch_detector_last_tick_timestamp_seconds{{{SEL}}}",
                "since last tick {{instance}}",
            ),
            (f"execwatch_detector_loop_lag_seconds{{{SEL}}}", "loop lag {{instance}}"),
        ],
        width=6,
    )
    b.panel(
        "Scrape cost",
        "Seconds the last scrape spent reading the state.",
        "s",
        [(f"execwatch_collect_duration_seconds{{{SEL}}}", "collect {{instance}}")],
        width=6,
    )
    b.panel(
        "Memory",
        "Resident memory of the execwatch process.",
        "bytes",
        [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")],
        width=6,
    )
    return dashboard(
        "execwatch-overview",
        "execwatch / Fleet overview",
        "Executions, detections, breakers and ingest across every agent.",
        b,
        True,
    )


def agent() -> dict[str, Any]:
    b = Board()
    b.row("$agent")
    b.panel(
        "Executions by state",
        "This agent's executions held now, by state.",
        "short",
        [(f"sum by (state) (execwatch_executions{{{ONE_AGENT}}})", "{{state}}")],
        stack=False,
    )
    b.panel(
        "Finishes by state",
        "This agent's finishes per second, by final state.",
        "ops",
        [
            (
                f"sum by (state) (rate(execwatch_executions_finished_total{{{ONE_AGENT}}}[{RI}]))",
                "{{state}}",
            )
        ],
    )
    b.panel(
        "Duration (p50, p95)",
        "Seconds from first event to final state.",
        "s",
        [
            (
                f"histogram_quantile(0.5, sum by (le) "
                f"(rate(execwatch_execution_duration_seconds_bucket{{{ONE_AGENT}}}[{RI}])))",
                "p50",
            ),
            (
                f"histogram_quantile(0.95, sum by (le) "
                f"(rate(execwatch_execution_duration_seconds_bucket{{{ONE_AGENT}}}[{RI}])))",
                "p95",
            ),
        ],
    )
    b.panel(
        "Detections",
        "This agent's detections per second, by reason.",
        "ops",
        [
            (
                f"sum by (reason) (rate(execwatch_detections_total{{{ONE_AGENT}}}[{RI}]))",
                "{{reason}}",
            )
        ],
    )
    b.panel(
        "Findings",
        "This agent's active findings.",
        "short",
        [(f"sum by (finding) (execwatch_findings{{{ONE_AGENT}}})", "{{finding}}")],
    )
    b.panel(
        "Breaker",
        "This agent's breaker: 1 for its current state.",
        "short",
        [(f"max by (state) (execwatch_circuit_breaker_state{{{ONE_AGENT}}})", "{{state}}")],
    )
    b.panel(
        "Breaker failure rate",
        "Failure rate over the breaker's sliding window.",
        "percentunit",
        [(f"max(execwatch_circuit_breaker_failure_rate{{{ONE_AGENT}}})", "failure rate")],
        max_value=1,
    )
    b.panel(
        "Refused executions",
        "Executions refused by the open breaker, per second.",
        "ops",
        [
            (
                f"sum(rate(execwatch_circuit_breaker_not_permitted_calls_total{{{ONE_AGENT}}}[{RI}]))",
                "refused",
            )
        ],
    )
    b.panel(
        "Heartbeats",
        "Heartbeats per second.",
        "ops",
        [(f"sum(rate(execwatch_heartbeats_total{{{ONE_AGENT}}}[{RI}]))", "heartbeats")],
    )
    b.panel(
        "Oldest heartbeat age",
        "Seconds since the oldest last heartbeat of a live execution.",
        "s",
        [(f"time() - min(execwatch_oldest_heartbeat_timestamp_seconds{{{ONE_AGENT}}})", "age")],
    )
    b.panel(
        "Revivals",
        "Executions declared dead that showed proof of life (false deaths).",
        "ops",
        [(f"sum(rate(execwatch_revivals_total{{{ONE_AGENT}}}[{RI}]))", "revivals")],
    )
    return dashboard(
        "execwatch-agent",
        "execwatch / Agent",
        "One agent: its executions, durations, detections and breaker.",
        b,
        False,
    )


DASHBOARDS = {"execwatch-overview.json": overview, "execwatch-agent.json": agent}


def render() -> dict[str, str]:
    """File name -> JSON text, exactly as committed."""
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
