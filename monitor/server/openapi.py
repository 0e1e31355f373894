"""The OpenAPI 3.1 document of the HTTP API; a test keeps it in step with the routes."""

from __future__ import annotations

from functools import cache
from typing import Any

from monitor import __version__
from monitor.events import LIMIT_FIELDS, MAX_ATTRIBUTES, MAX_ID, MAX_NAME, Kind
from monitor.states import ExecState

_ID = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$", "maxLength": MAX_ID}
_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME}
_STATES = [s.value for s in ExecState]
_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_NUM = {"type": ["number", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), "An error, with a message that names what was wrong")

EVENT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "execution_id"],
    "properties": {
        "type": {"enum": ["state", "heartbeat"]},
        "execution_id": _ID,
        "agent": {**_NAME, "description": "required on the first event of an execution"},
        "tenant": {**_ID, "description": "default: the token's tenant, else 'default'"},
        "ts": {
            "oneOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "format": "date-time"},
            ],
            "description": "epoch seconds or RFC 3339; used for ordering and durations only",
        },
        "event_id": {**_NAME, "description": "idempotency key: a repeat is not applied again"},
        "seq": {"type": "integer", "minimum": 0},
        "state": {
            "type": "string",
            "description": "a canonical state or an alias (case-insensitive): "
            + ", ".join(_STATES),
        },
        "phase": _NAME,
        "kind": {"enum": [k.value for k in Kind]},
        "parent_id": _ID,
        **{name: {"type": "number", "exclusiveMinimum": 0} for name in LIMIT_FIELDS},
        "memory_limit_bytes": {"type": "integer", "minimum": 1},
        "pid": {"type": "integer", "minimum": 1},
        "rss_bytes": {"type": "integer", "minimum": 0},
        "progress": {"type": ["number", "string"]},
        "error": {"type": ["string", "object"]},
        "attributes": {
            "type": "object",
            "maxProperties": MAX_ATTRIBUTES,
            "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
        },
        "traceparent": {
            "type": "string",
            "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        },
    },
}

_TRANSITION = {
    "type": "object",
    "required": ["from", "to", "at", "reason"],
    "properties": {
        "from": {"enum": [*_STATES, None]},
        "to": {"enum": _STATES},
        "at": {"type": "number"},
        "reason": _NULLABLE_STR,
        "phase": {"type": "string"},
        "detected_at": {"type": "number", "description": "for a detector's transition"},
        "revived": {"type": "boolean", "description": "it left dead: proof of life"},
    },
}

EXECUTION = {
    "type": "object",
    "required": [
        "execution_id",
        "tenant",
        "agent",
        "kind",
        "state",
        "phase",
        "parent_id",
        "created_at",
        "updated_at",
        "last_heartbeat_at",
        "limits",
        "rss_bytes",
        "progress",
        "attributes",
        "findings",
        "history",
    ],
    "properties": {
        "execution_id": {"type": "string"},
        "tenant": {"type": "string"},
        "agent": {"type": "string"},
        "kind": {"enum": [k.value for k in Kind]},
        "state": {"enum": _STATES},
        "phase": _NULLABLE_STR,
        "parent_id": _NULLABLE_STR,
        "created_at": {"type": "number"},
        "updated_at": {"type": "number"},
        "last_heartbeat_at": {"type": "number"},
        "limits": {"type": "object", "additionalProperties": {"type": "number"}},
        "rss_bytes": _NULLABLE_INT,
        "pid": _NULLABLE_INT,
        "progress": {"type": ["number", "string", "null"]},
        "error": {},
        "attributes": {"type": "object"},
        "traceparent": _NULLABLE_STR,
        "cancel_requested": {"type": "boolean"},
        "findings": {"type": "array", "items": _ref("Finding")},
        "history": {"type": "array", "items": _ref("Transition")},
    },
}

FINDING = {
    "type": "object",
    "required": ["kind", "since", "detail"],
    "properties": {
        "kind": {"enum": ["stalled", "memory_high", "memory_exceeded", "memory_trend"]},
        "since": {"type": "number"},
        "detail": {"type": "string"},
        "execution_id": {"type": "string"},
        "tenant": {"type": "string"},
        "agent": {"type": "string"},
    },
}

BREAKER = {
    "type": "object",
    "required": ["state", "allow", "failure_rate", "retry_after_s"],
    "properties": {
        "tenant": {"type": "string"},
        "agent": {"type": "string"},
        "state": {"enum": ["closed", "open", "half_open"]},
        "allow": {"type": "boolean", "description": "whether a new execution may start now"},
        "failure_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "retry_after_s": {"type": "number", "minimum": 0},
        "calls": {"type": "integer", "description": "outcomes in the sliding window"},
    },
}

INGEST_RESULT = {
    "type": "object",
    "required": ["accepted", "duplicates", "rejected", "directives"],
    "properties": {
        "accepted": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "rejected": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "status", "reason", "error"],
                "properties": {
                    "index": {"type": "integer"},
                    "status": {"enum": [403, 404, 409, 422]},
                    "reason": {"type": "string"},
                    "error": {"type": "string"},
                },
            },
        },
        "directives": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["execution_id", "action", "reason"],
                "properties": {
                    "execution_id": {"type": "string"},
                    "action": {"enum": ["cancel"]},
                    "reason": {"type": "string"},
                },
            },
        },
    },
}


_SSE_EVENT: dict[str, Any] = {
    "description": "One event; `data` is a JSON object (see the README for its fields)",
    "type": "object",
    "properties": {
        "event": {"enum": ["transition", "finding", "breaker", "reset"]},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": {"type": "integer"},
    },
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_TENANT_QUERY = _query("tenant", _ID, "the tenant (default 'default' where an id is named)")

PATHS: dict[str, dict[str, Any]] = {
    "/": {
        "get": {
            "summary": "Landing page",
            "parameters": [_TENANT_QUERY],
            "responses": {"200": {"description": "HTML with links", "content": {"text/html": {}}}},
        }
    },
    "/v1/events": {
        "post": {
            "summary": "Ingest state events and heartbeats",
            "description": "A JSON object, a JSON array of objects, or NDJSON. Good events in a "
            "batch are applied even when others are rejected, before the answer is sent. A single "
            "object that is rejected answers with its own status.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [_ref("Event"), {"type": "array", "items": _ref("Event")}]
                        }
                    },
                    "application/x-ndjson": {"schema": {"type": "string"}},
                },
            },
            "responses": {
                "202": _json(_ref("IngestResult"), "Applied; rejections listed by index"),
                "400": _ERROR,
                "403": _json(
                    _ref("IngestResult"), "An event names another tenant than the token's"
                ),
                "404": _json(_ref("IngestResult"), "The execution is not known"),
                "409": _json(_ref("IngestResult"), "The transition is not allowed"),
                "413": _ERROR,
                "422": _json(_ref("IngestResult"), "A field is invalid"),
                "503": _ERROR,
            },
        }
    },
    "/v1/executions": {
        "get": {
            "summary": "List executions",
            "parameters": [
                _query("state", {"type": "string"}, "canonical state or alias"),
                _query("agent", {"type": "string"}, "agent name"),
                _query("kind", {"enum": [k.value for k in Kind]}, "execution kind"),
                _TENANT_QUERY,
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1},
                    "page size, default 100, capped at 1000",
                ),
                _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["executions", "next_cursor"],
                        "properties": {
                            "executions": {"type": "array", "items": _ref("Execution")},
                            "next_cursor": _NULLABLE_STR,
                        },
                    },
                    "A page of executions",
                ),
                "400": _ERROR,
            },
        }
    },
    "/v1/executions/{execution_id}": {
        "get": {
            "summary": "One execution with its history",
            "parameters": [
                {"name": "execution_id", "in": "path", "required": True, "schema": _ID},
                _TENANT_QUERY,
            ],
            "responses": {
                "200": _json(_ref("Execution"), "The execution"),
                "400": _ERROR,
                "404": _ERROR,
            },
        }
    },
    "/v1/executions/{execution_id}/cancel": {
        "post": {
            "summary": "Ask an execution to stop",
            "description": "Every later answer about the execution carries a cancel directive.",
            "parameters": [
                {"name": "execution_id", "in": "path", "required": True, "schema": _ID},
                _TENANT_QUERY,
            ],
            "responses": {
                "202": _json(
                    {"type": "object", "required": ["execution_id", "action", "reason"]},
                    "Cancellation requested",
                ),
                "400": _ERROR,
                "404": _ERROR,
                "409": _ERROR,
                "503": _ERROR,
            },
        }
    },
    "/v1/breakers/{agent}": {
        "get": {
            "summary": "An agent's circuit breaker: may a new execution start?",
            "parameters": [
                {"name": "agent", "in": "path", "required": True, "schema": _NAME},
                _TENANT_QUERY,
            ],
            "responses": {
                "200": _json(_ref("Breaker"), "The breaker"),
                "400": _ERROR,
                "404": _ERROR,
            },
        }
    },
    "/v1/findings": {
        "get": {
            "summary": "Active detector findings",
            "parameters": [
                _TENANT_QUERY,
                _query("agent", {"type": "string"}, "agent name"),
                _query(
                    "finding",
                    {"type": "string"},
                    "stalled, memory_high, memory_exceeded, memory_trend",
                ),
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["findings"],
                        "properties": {"findings": {"type": "array", "items": _ref("Finding")}},
                    },
                    "Findings",
                ),
                "400": _ERROR,
            },
        }
    },
    "/v1/agents": {
        "get": {
            "summary": "Per-agent counts by state, and each agent's breaker",
            "parameters": [_TENANT_QUERY],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["agents"],
                        "properties": {"agents": {"type": "array", "items": {"type": "object"}}},
                    },
                    "Agents",
                ),
                "400": _ERROR,
            },
        }
    },
    "/v1/stream": {
        "get": {
            "summary": "Live Server-Sent Events: transitions, findings and breaker changes",
            "description": "Events `transition`, `finding` and `breaker` carry increasing ids "
            "(one sequence per tenant on a one-tenant stream, one daemon-wide on an "
            "all-tenants stream). Send `Last-Event-ID` (or `last_event_id`) to "
            "resume: what was missed is replayed from a bounded ring, or one `reset` event says "
            "to re-list. Comments keep an idle stream open; a consumer that stops reading is "
            "dropped.",
            "parameters": [
                _TENANT_QUERY,
                _query(
                    "last_event_id",
                    {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    "resume after this id (as the Last-Event-ID header does)",
                ),
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    "description": "resume after this id (EventSource sends it on reconnect)",
                },
            ],
            "responses": {
                "200": {
                    "description": "The stream (text/event-stream), open until the client goes",
                    "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                },
                "400": _ERROR,
                "403": _ERROR,
                "503": _ERROR,
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "description": "Prometheus text format, or OpenMetrics with trace_id exemplars on "
            "the duration histogram when the Accept header asks for it.",
            "responses": {
                "200": {
                    "description": "The exposition",
                    "content": {"text/plain": {}, "application/openmetrics-text": {}},
                }
            },
        }
    },
    "/healthz": {
        "get": {
            "summary": "Liveness",
            "security": [],
            "responses": {
                "200": _json({"type": "object"}, "The event loop and the detector loop answer"),
                "503": _json({"type": "object"}, "The detector loop has not woken for 60 s"),
            },
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness",
            "security": [],
            "responses": {
                "200": _json({"type": "object"}, "Replayed and serving"),
                "503": _json({"type": "object"}, "Starting or draining"),
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
        }
    },
}


_LISTS = ("/", "/v1/executions", "/v1/agents", "/v1/findings", "/v1/stream", "/metrics")
"""403 for a token bound to another tenant than `?tenant=` names (and /metrics: a bound token)."""


def _with_auth(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every operation but the probes answers 401 without a good token (when tokens are
    configured); lists answer 403 for another tenant's data."""
    out: dict[str, dict[str, Any]] = {}
    for path, operations in paths.items():
        out[path] = {}
        for method, operation in operations.items():
            responses = dict(operation["responses"])
            if operation.get("security") != []:
                responses.setdefault("401", _ERROR)
            if path in _LISTS:
                responses.setdefault("403", _ERROR)
            out[path][method] = {**operation, "responses": responses}
    return out


@cache
def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "execwatch",
            "version": __version__,
            "description": "Sidecar that watches long-running executions.",
        },
        "paths": _with_auth(PATHS),
        "security": [{"bearer": []}, {}],
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of [auth.tokens]; needed once any are configured",
                }
            },
            "schemas": {
                "Event": EVENT,
                "Execution": EXECUTION,
                "Transition": _TRANSITION,
                "IngestResult": INGEST_RESULT,
                "Finding": FINDING,
                "Breaker": BREAKER,
                "Error": {
                    "type": "object",
                    "required": ["error", "status"],
                    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                },
            },
        },
    }
