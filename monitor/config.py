"""Frozen settings from one TOML file, EXECWATCH_* variables and flags; the only reader of env."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any

from monitor.errors import ConfigError
from monitor.states import BUILTIN_ALIASES, ExecState

ENV_PREFIX = "EXECWATCH_"
CLIENT_ENV = frozenset({"EXECWATCH_URL", "EXECWATCH_TOKEN", "EXECWATCH_CONFIG"})
"""Variables the SDK and the CLI read for themselves; not daemon settings."""

MEMORY_POLICIES = ("observe", "fail", "terminate")


@dataclass(frozen=True, slots=True)
class Limits:
    """Detector limits for one agent; None means "not set here" (inherit, or no such clock)."""

    start_timeout_s: float | None = None
    run_timeout_s: float | None = None
    timeout_s: float | None = None
    heartbeat_timeout_s: float | None = None
    stall_timeout_s: float | None = None
    memory_limit_bytes: int | None = None
    memory_soft_fraction: float | None = None
    memory_hold_s: float | None = None
    memory_trend_horizon_s: float | None = None
    terminate_grace_s: float | None = None
    memory_policy: str | None = None

    def over(self, base: Limits) -> Limits:
        """These limits where set, else `base`'s."""
        return Limits(
            *(
                mine if mine is not None else theirs
                for mine, theirs in zip(_values(self), _values(base), strict=True)
            )
        )


def _values(limits: Limits) -> tuple[Any, ...]:
    return tuple(getattr(limits, f.name) for f in fields(Limits))


DEFAULT_LIMITS = Limits(
    heartbeat_timeout_s=30.0,
    memory_soft_fraction=0.8,
    memory_hold_s=10.0,
    memory_trend_horizon_s=300.0,
    terminate_grace_s=10.0,
    memory_policy="observe",
)


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Per-agent circuit breakers, with resilience4j's names (rates as a 0-1 ratio)."""

    failure_rate_threshold: float = 0.5
    minimum_calls: int = 10
    window_size: int = 50
    window_s: float | None = None
    wait_in_open_s: float = 30.0
    permitted_calls_in_half_open: int = 3
    max_wait_in_half_open_s: float = 120.0
    """resilience4j's maxWaitDurationInHalfOpenState: re-open if the trials have not all
    ended by then (0 waits forever, which lets one hung trial hold the breaker)."""


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """How much the registry keeps, so memory stays flat under endless traffic."""

    finished_s: float = 3600.0
    """Seconds a finished execution stays visible before it is evicted."""
    max_finished: int = 10000
    """Finished executions kept at most; the oldest go first."""
    history: int = 100
    """Transitions kept per execution; the oldest go first."""
    event_ids: int = 100000
    """event_id values remembered for idempotency; the oldest are forgotten first."""
    tombstones: int = 100000
    """Evicted execution keys remembered, so a late event for one is refused, not re-registered."""


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """How the detector loop runs (daemon-wide)."""

    interval_s: float = 0.05
    """The longest the loop sleeps; it wakes earlier for the next deadline."""
    blind_lag_s: float = 1.0
    """A loop that woke this late was blind: every execution gets a fresh heartbeat grace."""
    memory_sample_interval_s: float = 5.0
    """How often executions that gave a pid have their RSS sampled."""
    memory_samples_max: int = 1000
    """Processes sampled at most per interval (round robin), bounding the cost."""


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """What /metrics exports."""

    max_agents: int = 500
    """Agent label values kept; later agents fold into `__overflow__` (counted)."""
    tenants: tuple[str, ...] = ()
    """The tenant allowlist: when set, per-agent series carry a `tenant` label whose value
    is one of these, or `__other__` for every other tenant. Empty: no tenant label."""


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """GET /v1/stream: the ring it resumes from and how it treats slow consumers."""

    ring_size: int = 10000
    """Stream events kept for Last-Event-ID resumes; a client further behind gets `reset`."""
    queue_size: int = 1000
    """Events waiting for one consumer at most; past it the consumer is dropped (counted)."""
    keepalive_s: float = 15.0
    """An idle stream sends a comment this often, so proxies keep the connection open."""
    max_consumers: int = 100
    """Streams open at once; one more is answered 503 with Retry-After."""
    max_consumers_per_tenant: int = 10
    """Streams of one tenant open at once, so one tenant cannot take every slot."""


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Bearer tokens and what may be read without one."""

    tokens: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Bearer token -> tenant ("*" = every tenant). Empty: no authentication, and the
    daemon listens on loopback only unless started with --insecure."""
    metrics_public: bool = False
    """Serve /metrics without a token even when tokens are configured."""


@dataclass(frozen=True)
class Settings:
    """Everything the daemon is configured with; built by load_settings, never mutated."""

    host: str = "127.0.0.1"
    port: int = 9478
    database: str = "execwatch.db"
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch_events: int = 10000
    max_ingest_in_flight: int = 64
    """POST /v1/events requests applied or committing at once; more get 503 Retry-After."""
    log_level: str = "info"
    log_format: str = "auto"
    """json, console, or auto (console on a terminal, JSON lines otherwise)."""
    defaults: Limits = DEFAULT_LIMITS
    agents: Mapping[str, Limits] = field(default_factory=lambda: MappingProxyType({}))
    breaker: BreakerSettings = BreakerSettings()
    retention: RetentionSettings = RetentionSettings()
    detectors: DetectorSettings = DetectorSettings()
    metrics: MetricsSettings = MetricsSettings()
    stream: StreamSettings = StreamSettings()
    auth: AuthSettings = AuthSettings()
    aliases: Mapping[str, ExecState] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def listen(self) -> str:
        """The listen address as HOST:PORT (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @cached_property
    def _merged(self) -> dict[str, Limits]:
        return {name: limits.over(self.defaults) for name, limits in self.agents.items()}

    def limits_for(self, agent: str) -> Limits:
        """The limits of `agent`: its [agents.NAME] table over [defaults]."""
        return self._merged.get(agent, self.defaults)


# ---- validation --------------------------------------------------------------------------

Check = Callable[[object], str | None]
"""Returns None when the value is good, else what was expected."""


def _number(minimum: float = 0.0, *, above: bool = True, maximum: float = math.inf) -> Check:
    def check(value: object) -> str | None:
        if type(value) in (int, float) and math.isfinite(value):  # type: ignore[arg-type]
            low_ok = value > minimum if above else value >= minimum  # type: ignore[operator]
            if low_ok and value <= maximum:  # type: ignore[operator]
                return None
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        return f"a number {bound}" + (f" and <= {maximum:g}" if maximum < math.inf else "")

    return check


def _integer(minimum: int) -> Check:
    def check(value: object) -> str | None:
        if type(value) is int and value >= minimum:
            return None
        return f"an integer >= {minimum}"

    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(value: object) -> str | None:
        return None if value in options else "one of " + ", ".join(options)

    return check


def _string(value: object) -> str | None:
    return None if type(value) is str and value else "a non-empty string"


_SECONDS = _number()
LIMIT_KEYS: Mapping[str, Check] = {
    "start_timeout_s": _SECONDS,
    "run_timeout_s": _SECONDS,
    "timeout_s": _SECONDS,
    "heartbeat_timeout_s": _SECONDS,
    "stall_timeout_s": _SECONDS,
    "memory_limit_bytes": _integer(1),
    "memory_soft_fraction": _number(0.0, maximum=1.0),
    "memory_hold_s": _number(0.0, above=False),
    "memory_trend_horizon_s": _SECONDS,
    "terminate_grace_s": _number(0.0, above=False),
    "memory_policy": _choice(MEMORY_POLICIES),
}
BREAKER_KEYS: Mapping[str, Check] = {
    "failure_rate_threshold": _number(0.0, maximum=1.0),
    "minimum_calls": _integer(1),
    "window_size": _integer(1),
    "window_s": _SECONDS,
    "wait_in_open_s": _SECONDS,
    "permitted_calls_in_half_open": _integer(1),
    "max_wait_in_half_open_s": _number(0.0, above=False),
}
RETENTION_KEYS: Mapping[str, Check] = {
    "finished_s": _number(0.0, above=False),
    "max_finished": _integer(0),
    "history": _integer(1),
    "event_ids": _integer(0),
    "tombstones": _integer(0),
}
SCALAR_KEYS: Mapping[str, Check] = {
    "listen": _string,
    "database": _string,
    "max_body_bytes": _integer(1024),
    "max_batch_events": _integer(1),
    "max_ingest_in_flight": _integer(1),
    "log_level": _choice(("debug", "info", "warning", "error")),
    "log_format": _choice(("auto", "json", "console")),
}
DETECTOR_KEYS: Mapping[str, Check] = {
    "interval_s": _number(0.0, maximum=10.0),
    "blind_lag_s": _SECONDS,
    "memory_sample_interval_s": _SECONDS,
    "memory_samples_max": _integer(0),
}


TENANT_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""What an event's `tenant` may be (monitor.events checks the same)."""
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
"""Visible ASCII: what an Authorization header can carry intact."""


def _tenant_names(value: object) -> str | None:
    if type(value) is list and all(
        type(v) is str and TENANT_NAME.fullmatch(v) and v != "__other__" for v in value
    ):
        return None
    return "a list of tenant names (1-128 of A-Z a-z 0-9 . _ : -; not __other__)"


METRICS_KEYS: Mapping[str, Check] = {"max_agents": _integer(1), "tenants": _tenant_names}
STREAM_KEYS: Mapping[str, Check] = {
    "ring_size": _integer(1),
    "queue_size": _integer(1),
    "keepalive_s": _number(0.01, above=False, maximum=3600.0),
    "max_consumers": _integer(1),
    "max_consumers_per_tenant": _integer(1),
}
TABLE_KEYS = (
    "defaults", "agents", "breaker", "retention", "detectors", "metrics", "stream", "auth",
    "aliases",
)  # fmt: skip
_FLOAT_KEYS = frozenset({"memory_soft_fraction", "failure_rate_threshold"})


def _table(
    raw: Mapping[str, Any], where: str, keys: Mapping[str, Check], problems: list[str]
) -> dict[str, Any]:
    good: dict[str, Any] = {}
    for key, value in raw.items():
        check = keys.get(key)
        if check is None:
            problems.append(f"{where}: unknown key {key!r}; allowed: {', '.join(keys)}")
            continue
        expected = check(value)
        if expected is not None:
            problems.append(f"{where}.{key} = {value!r}: expected {expected}")
            continue
        good[key] = float(value) if key.endswith("_s") or key in _FLOAT_KEYS else value
    return good


def _sub(raw: Mapping[str, Any], key: str, problems: list[str]) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"[{key}] must be a table, got {value!r}")
        return {}
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) to a pair; raise ValueError naming what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen = {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9478")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen = {value!r}: the port must be a number from 0 to 65535")
    return host, int(port)


def build_settings(raw: Mapping[str, Any]) -> Settings:
    """Validate a raw (TOML-shaped) mapping; raise ConfigError naming every bad key and value."""
    problems: list[str] = []
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in TABLE_KEYS:
            continue
        if key not in SCALAR_KEYS:
            allowed = ", ".join([*SCALAR_KEYS, *(f"[{t}]" for t in TABLE_KEYS)])
            problems.append(f"top level: unknown key {key!r}; allowed: {allowed}")
            continue
        expected = SCALAR_KEYS[key](value)
        if expected is None:
            top[key] = value
        else:
            problems.append(f"{key} = {value!r}: expected {expected}")
    values: dict[str, Any] = {}
    if "listen" in top:
        try:
            values["host"], values["port"] = parse_listen(top["listen"])
        except ValueError as exc:
            problems.append(str(exc))
    for key in (
        "database", "max_body_bytes", "max_batch_events", "max_ingest_in_flight", "log_level",
        "log_format",
    ):  # fmt: skip
        if key in top:
            values[key] = top[key]

    defaults = _table(_sub(raw, "defaults", problems), "[defaults]", LIMIT_KEYS, problems)
    values["defaults"] = replace(DEFAULT_LIMITS, **defaults)

    agents: dict[str, Limits] = {}
    for name, table in _sub(raw, "agents", problems).items():
        if not isinstance(table, dict):
            problems.append(f"[agents.{name}] must be a table, got {table!r}")
            continue
        agents[name] = Limits(**_table(table, f"[agents.{name}]", LIMIT_KEYS, problems))
    values["agents"] = MappingProxyType(agents)

    breaker_raw = _sub(raw, "breaker", problems)
    breaker = _table(breaker_raw, "[breaker]", BREAKER_KEYS, problems)
    if "window_s" in breaker and "window_size" in breaker:
        problems.append(
            "[breaker]: set window_size (a count-based window) or window_s "
            "(a time-based window), not both"
        )
    values["breaker"] = BreakerSettings(**breaker)
    values["retention"] = RetentionSettings(
        **_table(_sub(raw, "retention", problems), "[retention]", RETENTION_KEYS, problems)
    )

    metrics = _table(_sub(raw, "metrics", problems), "[metrics]", METRICS_KEYS, problems)
    if "tenants" in metrics:
        metrics["tenants"] = tuple(dict.fromkeys(metrics["tenants"]))
    values["metrics"] = MetricsSettings(**metrics)
    values["stream"] = StreamSettings(
        **_table(_sub(raw, "stream", problems), "[stream]", STREAM_KEYS, problems)
    )
    values["detectors"] = DetectorSettings(
        **_table(_sub(raw, "detectors", problems), "[detectors]", DETECTOR_KEYS, problems)
    )

    auth = _sub(raw, "auth", problems)
    metrics_public = False
    for key, value in auth.items():
        if key == "metrics_public":
            if type(value) is bool:
                metrics_public = value
            else:
                problems.append(f"[auth].metrics_public = {value!r}: expected true or false")
        elif key != "tokens":
            problems.append(f"[auth]: unknown key {key!r}; allowed: tokens, metrics_public")
    tokens: dict[str, str] = {}
    for token, tenant in _sub(auth, "tokens", problems).items():
        if type(tenant) is not str or not (tenant == "*" or TENANT_NAME.fullmatch(tenant)):
            problems.append(
                f"[auth.tokens]: the token ending {token[-4:]!r} must map to a tenant name "
                f'(1-128 of A-Z a-z 0-9 . _ : -) or "*", got {tenant!r}'
            )
        elif not _TOKEN_CHARS.fullmatch(token):
            problems.append(
                f"[auth.tokens]: the token ending {token[-4:]!r} holds a space or a character "
                "outside visible ASCII; no Authorization header could carry it intact"
            )
        elif len(token) < 8:
            problems.append(
                f"[auth.tokens]: the token ending {token[-2:]!r} is too short; use 8+ characters"
            )
        else:
            tokens[token] = tenant
    values["auth"] = AuthSettings(MappingProxyType(tokens), metrics_public)

    aliases: dict[str, ExecState] = {}
    canonical = {s.value: s for s in ExecState}
    for alias, target in _sub(raw, "aliases", problems).items():
        if alias.lower() in canonical:
            problems.append(f"[aliases]: {alias!r} is a canonical state and cannot be an alias")
        elif alias.lower() in BUILTIN_ALIASES:
            builtin = BUILTIN_ALIASES[alias.lower()][0]
            problems.append(
                f"[aliases]: {alias!r} is already a built-in alias of '{builtin}' and cannot "
                "be redefined"
            )
        elif type(target) is not str or target not in canonical:
            problems.append(
                f"[aliases].{alias} = {target!r}: expected one of {', '.join(canonical)}"
            )
        else:
            aliases[alias] = canonical[target]
    values["aliases"] = MappingProxyType(aliases)

    if problems:
        raise ConfigError(problems)
    return Settings(**values)


def _env_value(text: str) -> object:
    """An environment value as TOML would read it (number, boolean, ...), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_STRING_KEYS = frozenset({"listen", "database", "memory_policy", "log_level", "log_format"})


def _env_path(parts: list[str]) -> list[str]:
    """Key parts are lower case, but a token keeps its case: it is a secret, compared
    exactly, so EXECWATCH_AUTH__TOKENS__Abc123xyz=team-a means the token Abc123xyz."""
    path = [part.lower() for part in parts]
    if len(path) >= 3 and path[:2] == ["auth", "tokens"]:
        path[2] = parts[2]
    return path


def _env_layer(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """The EXECWATCH_* variables as a TOML-shaped table; each one is also checked on its
    own, so a problem names the variable rather than a key of a file."""
    layer: dict[str, Any] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in CLIENT_ENV:
            continue
        path = _env_path(name[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            problems.append(f"{name}: empty key part; nest keys with a double underscore")
            continue
        named = path[0] == "aliases" or path[:2] == ["auth", "tokens"]
        value = text if path[-1] in _STRING_KEYS or named else _env_value(text)
        single: dict[str, Any] = {}
        node = single
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        try:
            build_settings(single)
        except ConfigError as exc:
            problems.extend(f"{name}={text!r}: {problem}" for problem in exc.problems)
            continue
        layer = _merge(layer, single)
    return layer


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_file(path: str) -> dict[str, Any]:
    """The TOML file at `path`; raise ConfigError if it cannot be read or parsed."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def load_settings(
    path: str | None,
    environ: Mapping[str, str],
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults < the TOML file at `path` < EXECWATCH_* variables < flags.

    `flags` uses the file's keys (`listen`, `database`, ...). Raises ConfigError
    naming every bad key and value at once.
    """
    problems: list[str] = []
    raw = read_file(path) if path else {}
    raw = _merge(raw, _env_layer(environ, problems))
    raw = _merge(raw, {k: v for k, v in (flags or {}).items() if v is not None})
    try:
        settings = build_settings(raw)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return settings
