"""The ingest benchmark's baseline: a bare aiohttp app that only parses the JSON it is sent.

`POST /v1/events` reads the body, decodes it with orjson and answers 202 with
`{"accepted": n}` (n = the array's length, or 1 for a single object). No
validation, no state, no middleware, no access log: the cost of HTTP plus JSON
on the same aiohttp and orjson as the daemon, which is what bench/ingest.py
divides execwatch's rate by.

    python bench/bare_server.py --listen 127.0.0.1:9479
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import orjson
from aiohttp import web


async def post_events(request: web.Request) -> web.Response:
    """Parse the body and say how many events it held; nothing else."""
    doc = orjson.loads(await request.read())
    accepted = len(doc) if type(doc) is list else 1
    return web.Response(
        body=orjson.dumps({"accepted": accepted}),
        status=202,
        content_type="application/json",
    )


def make_app() -> web.Application:
    """The one-route app."""
    app = web.Application()
    app.router.add_post("/v1/events", post_events)
    return app


def parse_listen(text: str) -> tuple[str, int]:
    """Split HOST:PORT (port 0 picks a free one; the printed line shows it)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, set up like `execwatch serve` (no access log)."""
    runner = web.AppRunner(make_app(), handle_signals=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
        for bound_host, bound_port, *_ in runner.addresses:
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            # The same plain line as `execwatch serve`, for whoever waits for it.
            print(f"bare listening on http://{shown}:{bound_port}", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Parse --listen and serve; a signal is a clean exit."""
    parser = argparse.ArgumentParser(description="bare aiohttp + orjson ingest baseline")
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 9479),
        help="HOST:PORT to listen on (default 127.0.0.1:9479)",
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        asyncio.run(serve(*args.listen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
