"""execwatch: a sidecar daemon that watches long-running executions."""

__version__ = "0.1.0"
