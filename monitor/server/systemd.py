"""systemd's notify protocol (sd_notify), without libsystemd: READY, WATCHDOG, STOPPING.

Under `Type=notify` systemd passes NOTIFY_SOCKET; with `WatchdogSec=` it also passes
WATCHDOG_USEC (and WATCHDOG_PID). The detector loop pets the watchdog, so a loop that
stalls gets the daemon restarted even though its HTTP socket may still answer.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("execwatch.systemd")


class Notifier:
    """Sends notify messages to systemd; does nothing when not started by it."""

    def __init__(self, address: str | None, watchdog_s: float | None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        """systemd's watchdog timeout; the loop pets at least twice per timeout."""
        self._socket: socket.socket | None = None
        self._petted_at = float("-inf")
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """The notifier systemd's variables describe (a no-op one without them)."""
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # an abstract socket
        watchdog_s = None
        usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                watchdog_s = int(usec) / 1e6 or None
            except ValueError:
                log.warning("watchdog_usec_invalid", value=usec)
        return cls(address, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> None:
        """Send one message; a failure is logged once and never raised."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("systemd_notify_failed", address=self.address, error=str(exc))
                self._failed = True

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1\nSTATUS=draining")

    def pet(self) -> None:
        """WATCHDOG=1, at most once per half the watchdog timeout (cheap to call per tick)."""
        if self.watchdog_s is None or self.address is None:
            return
        now = time.monotonic()
        if now - self._petted_at >= self.watchdog_s / 2:
            self._petted_at = now
            self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
