"""Run the daemon: bind, serve until SIGTERM/SIGINT, then shut down within a bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys

import structlog
from aiohttp import web

from exporters.logs import AccessLogger, configure_logging
from exporters.otel import tracing_environ
from monitor.config import Settings
from monitor.errors import ConfigError
from monitor.server.app import make_app
from monitor.server.systemd import Notifier
from monitor.store import Store
from monitor.store.memory import NullStore
from monitor.store.sqlite import SqliteStore

log = structlog.get_logger("execwatch.server")

SHUTDOWN_TIMEOUT_S = 10.0
"""Below Kubernetes' default 30 s grace period, so a drain finishes before SIGKILL."""


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


PLACEHOLDERS = ("change-me", "replace-me")
"""Tokens of the examples (DESIGN.md, the Kubernetes manifest): known to everyone."""


def check_exposure(settings: Settings, insecure: bool) -> None:
    """Refuse a non-loopback address without [auth.tokens] (unless told --insecure), or
    with a token copied from an example."""
    if is_loopback(settings.host):
        return
    examples = [t for t in settings.auth.tokens if any(p in t.lower() for p in PLACEHOLDERS)]
    if examples and not insecure:
        raise ConfigError(
            [
                f"listen = {settings.listen!r} accepts connections from other machines, and "
                f"[auth.tokens] still holds the example token ending {examples[0][-6:]!r}, "
                "which anyone can read; replace it (e.g. openssl rand -hex 32)"
            ]
        )
    if insecure or settings.auth.tokens:
        return
    raise ConfigError(
        [
            f"listen = {settings.listen!r} accepts connections from other machines, and no "
            "[auth.tokens] are configured, so anyone who can reach it could write and read "
            "every tenant's executions; configure [auth.tokens], listen on 127.0.0.1, or "
            "pass --insecure if the network is trusted"
        ]
    )


def open_store(database: str) -> Store:
    """SQLite at `database`, or nothing kept for ":memory:"."""
    if database == ":memory:":
        return NullStore()
    return SqliteStore(database)


async def run(settings: Settings) -> None:
    """Serve `settings` until a signal asks to stop."""
    notifier = Notifier.from_environ(os.environ)
    app = make_app(
        settings,
        store=open_store(settings.database),
        otel_environ=tracing_environ(),
        notifier=notifier,
    )
    # The signals are ours, not aiohttp's: its handler raises GracefulExit out of the
    # event loop, and asyncio.run then cancels every request still in flight. Ours only
    # wakes the main task, so the drain below runs with the handlers still alive.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("aiohttp.access"),
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                [f"cannot listen on {settings.listen}: {exc.strerror}; pick another --listen"]
            ) from None
        urls = []
        for host, port, *_ in runner.addresses:
            shown = f"[{host}]" if ":" in host else host
            urls.append(f"http://{shown}:{port}")
            # One plain line a supervisor or a test can wait for.
            print(f"execwatch listening on {urls[-1]}", file=sys.stderr, flush=True)
        log.info("daemon_started", listen=urls, database=settings.database)
        notifier.ready(f"listening on {', '.join(urls)}")
        await stop.wait()
        log.info("daemon_stopping", signal="SIGTERM or SIGINT")
    finally:
        # Close the listener, wait up to SHUTDOWN_TIMEOUT_S for requests in flight, then
        # the app's cleanup: the last checkpoint and the store's close.
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        notifier.close()
        log.info("daemon_stopped")


def serve(settings: Settings, *, insecure: bool = False) -> None:
    """Check the exposure, then run until SIGTERM or SIGINT (a clean exit, status 0)."""
    check_exposure(settings, insecure)
    writer = configure_logging(settings.log_level, settings.log_format)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(settings))
    finally:
        writer.close()
