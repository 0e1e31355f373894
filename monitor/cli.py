"""The `execwatch` command: serve | demo | status | check-config."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from monitor import __version__
from monitor.config import load_settings, read_file
from monitor.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:9478"
LIVE_STATES = ("pending", "starting", "running", "paused", "completing", "dead")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="execwatch", description="Watch long-running executions; export what you see."
    )
    parser.add_argument("--version", action="version", version=f"execwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="TOML config file (default: $EXECWATCH_CONFIG)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:9478)")
    serve.add_argument("--database", help='SQLite file, or ":memory:" to keep nothing')
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without [auth.tokens]",
    )

    demo = commands.add_parser(
        "demo", help="run a daemon and a simulated fleet, and show what execwatch detects"
    )
    demo.add_argument(
        "--duration", type=float, default=60.0, help="seconds the fleet runs (default 60)"
    )
    demo.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:9478 if free, else any)")
    demo.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the live terminal view (default: when stdout is a terminal)",
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary SQLite file and log")

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file", help="the TOML file to check")

    status = commands.add_parser(
        "status", help="print the live executions (and dead ones, which may yet revive)"
    )
    status.add_argument("--url", help=f"daemon URL (default: $EXECWATCH_URL or {DEFAULT_URL})")
    status.add_argument("--tenant", help="only this tenant")
    status.add_argument("--agent", help="only this agent")
    status.add_argument("--all", action="store_true", help="finished executions too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = os.environ
    try:
        if args.command == "serve":
            return _serve(args, environ)
        if args.command == "demo":
            from monitor.demo import main as demo  # rich loads only for the demo

            return demo(args)
        if args.command == "check-config":
            return _check_config(args.file, environ)
        return _status(args, environ)
    except ConfigError as exc:
        print("execwatch: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from monitor.server.run import serve  # the server's dependencies load only when needed

    path = args.config or environ.get("EXECWATCH_CONFIG")
    settings = load_settings(path, environ, {"listen": args.listen, "database": args.database})
    serve(settings, insecure=args.insecure)
    return 0


def _check_config(path: str, environ: Mapping[str, str]) -> int:
    read_file(path)
    # Only the file is judged: the environment of the machine checking it is not its.
    load_settings(path, {})
    print(f"{path}: ok")
    return 0


def _get(url: str, token: str | None) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _status(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    base = (args.url or environ.get("EXECWATCH_URL") or DEFAULT_URL).rstrip("/")
    token = environ.get("EXECWATCH_TOKEN")
    query: dict[str, str] = {"limit": "1000"}
    if args.tenant:
        query["tenant"] = args.tenant
    if args.agent:
        query["agent"] = args.agent
    executions: list[dict[str, Any]] = []
    cursor: str | None = None
    try:
        while True:
            page_query = {**query, **({"cursor": cursor} if cursor else {})}
            page = _get(f"{base}/v1/executions?{urllib.parse.urlencode(page_query)}", token)
            executions.extend(page["executions"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    except urllib.error.HTTPError as exc:
        hint = (
            "set EXECWATCH_TOKEN to a token of the daemon's [auth.tokens]"
            if exc.code == 401
            else "this token may not read that tenant"
            if exc.code == 403
            else "see the daemon's log"
        )
        print(f"execwatch: {base}/v1/executions answered {exc.code}: {hint}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(
            f"execwatch: cannot read {base}/v1/executions: {exc}; is the daemon running "
            "(execwatch serve), and is --url or EXECWATCH_URL right?",
            file=sys.stderr,
        )
        return 1
    if not args.all:
        executions = [ex for ex in executions if ex["state"] in LIVE_STATES]
    print(render_table(executions, time.time()))
    return 0


def render_table(executions: Sequence[Mapping[str, Any]], now: float) -> str:
    """A plain aligned table of executions, newest first."""
    header = ("EXECUTION", "TENANT", "AGENT", "KIND", "STATE", "PHASE", "AGE", "LAST SEEN")
    rows = [header]
    for ex in sorted(executions, key=lambda e: e["created_at"], reverse=True):
        rows.append(
            (
                ex["execution_id"],
                ex["tenant"],
                ex["agent"],
                ex["kind"],
                ex["state"],
                ex["phase"] or "-",
                _age(now - ex["created_at"]),
                _age(now - ex["last_heartbeat_at"]) + " ago",
            )
        )
    if len(rows) == 1:
        return "no executions"
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


if __name__ == "__main__":
    sys.exit(main())
