"""The one exception tree of execwatch.

    ExecwatchError
    ├── ConfigError              a config file, variable or flag is wrong (names every problem)
    ├── BreakerOpen              SDK: the agent's breaker refuses new executions (retry_after_s)
    ├── ExecutionCancelled       SDK: the daemon asked this execution to stop
    └── Rejection                an event the daemon will not apply; carries status and reason
        ├── BodyError            400: the body is not JSON or NDJSON at all
        ├── EventError           422: a field is missing, of the wrong type or out of range
        ├── OtherTenant          403: the event names a tenant its token may not write
        ├── ForbiddenField       403: the event carries a field its token may not set
        ├── UnknownExecution     404: the execution is not known and the event cannot register it
        ├── InvalidTransition    409: the state machine forbids the move (rule 7)
        │   └── FinalState       409: the execution already ended (rule 6)
        ├── EvictedExecution     409: the execution ended and was evicted (rule 6 still holds)
        └── StaleSeq             409: the event's seq is lower than the last applied one
    DuplicateEvent               not an error: an event_id seen before, acknowledged, not applied

Messages name the field or the states involved and what was allowed, so a
sender can fix its event from the message alone.
"""

from __future__ import annotations

from collections.abc import Iterable


class ExecwatchError(Exception):
    """Base of every error execwatch raises on purpose."""


class ConfigError(ExecwatchError):
    """A configuration is invalid; `problems` lists every bad key or value."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class BreakerOpen(ExecwatchError):
    """The SDK was asked to start a run of `agent` while its breaker refuses new ones."""

    def __init__(self, agent: str, state: str, retry_after_s: float) -> None:
        self.agent = agent
        self.state = state
        self.retry_after_s = retry_after_s
        super().__init__(
            f"agent {agent!r}: its circuit breaker is {state} and refuses new executions; "
            f"retry in {retry_after_s:.1f}s"
        )


class ExecutionCancelled(ExecwatchError):
    """The daemon asked this execution to stop (timed out, declared dead, cancelled, or
    registered while its breaker was open): raised at the run's next check."""

    def __init__(self, execution_id: str, reason: str) -> None:
        self.execution_id = execution_id
        self.reason = reason
        super().__init__(f"execution {execution_id!r} was asked to stop: {reason}")


class Rejection(ExecwatchError):
    """An event that is not applied; `status` is the HTTP answer, `reason` the metric label."""

    status: int = 422
    reason: str = "invalid"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BodyError(Rejection):
    """The request body is not JSON or NDJSON."""

    status = 400
    reason = "invalid_body"


class EventError(Rejection):
    """One field of an event is wrong; the message names it, its value and what is allowed."""

    status = 422

    def __init__(self, field: str, message: str, reason: str = "invalid_field") -> None:
        self.field = field
        self.reason = reason
        super().__init__(message)


class OtherTenant(Rejection):
    """An event names a tenant other than the one its token is bound to."""

    status = 403
    reason = "forbidden_tenant"

    def __init__(self, own: str, named: str) -> None:
        super().__init__(
            f"field 'tenant' is {named!r}, but this token writes only tenant {own!r}; leave "
            f"'tenant' out or set it to {own!r}"
        )


class ForbiddenField(Rejection):
    """An event from a one-tenant token carries a field only all-tenants tokens may set."""

    status = 403
    reason = "forbidden_field"

    def __init__(self, field: str, why: str) -> None:
        self.field = field
        super().__init__(f"field {field!r} is accepted only from an all-tenants token: {why}")


class UnknownExecution(Rejection):
    """An event names an execution that is not known and does not register it."""

    status = 404
    reason = "unknown_execution"

    def __init__(self, execution_id: str, tenant: str, hint: str = "") -> None:
        self.execution_id = execution_id
        self.tenant = tenant
        message = f"execution {execution_id!r} (tenant {tenant!r}) is not known"
        super().__init__(f"{message}; {hint}" if hint else message)


class InvalidTransition(Rejection):
    """The state machine forbids moving `execution_id` from `current` to `target`."""

    status = 409
    reason = "invalid_transition"

    def __init__(
        self, execution_id: str, current: str, target: str, allowed: Iterable[str]
    ) -> None:
        self.execution_id = execution_id
        self.current = current
        self.target = target
        self.allowed = tuple(allowed)
        targets = ", ".join(self.allowed) if self.allowed else "none"
        # f"'{x}'" rather than !r: the states are StrEnums, whose repr is not the wire name.
        super().__init__(
            f"execution {execution_id!r} cannot go from '{current}' to '{target}'; "
            f"allowed from '{current}': {targets}"
        )


class FinalState(InvalidTransition):
    """The execution ended in a final state; nothing may follow."""

    reason = "final_state"

    def __init__(self, execution_id: str, current: str, target: str) -> None:
        super().__init__(execution_id, current, target, ())
        self.message = (
            f"execution {execution_id!r} already ended in final state '{current}'; "
            f"no event may follow (got '{target}')"
        )
        self.args = (self.message,)


class EvictedExecution(Rejection):
    """An event for an execution that ended and was evicted: rule 6 outlives retention."""

    status = 409
    reason = "final_state"

    def __init__(self, execution_id: str, tenant: str) -> None:
        self.execution_id = execution_id
        super().__init__(
            f"execution {execution_id!r} (tenant {tenant!r}) ended and was evicted after its "
            "retention time; no event may follow, and its id may not be reused"
        )


class StaleSeq(Rejection):
    """The event's `seq` is lower than the last one applied to its execution."""

    status = 409
    reason = "stale_seq"

    def __init__(self, execution_id: str, seq: int, last_seq: int) -> None:
        self.execution_id = execution_id
        self.seq = seq
        self.last_seq = last_seq
        super().__init__(
            f"execution {execution_id!r}: seq {seq} is stale; "
            f"the last applied seq is {last_seq}, allowed: seq >= {last_seq}"
        )


class DuplicateEvent(ExecwatchError):
    """An event whose `event_id` was applied before: acknowledged, not applied again."""

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id
        super().__init__(f"event_id {event_id!r} was already applied")
