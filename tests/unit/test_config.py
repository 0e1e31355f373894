"""Configuration: TOML < EXECWATCH_* < flags, and every bad key and value named at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import DEFAULT_LIMITS, build_settings, load_settings, parse_listen
from monitor.errors import ConfigError
from monitor.states import ExecState

DESIGN_EXAMPLE = """
listen = "127.0.0.1:9478"
database = "execwatch.db"
max_body_bytes = 4194304
[defaults]
heartbeat_timeout_s = 30
memory_soft_fraction = 0.8
memory_hold_s = 10
memory_trend_horizon_s = 300
terminate_grace_s = 10
[agents.triage]
run_timeout_s = 300
memory_limit_bytes = 536870912
memory_policy = "observe"
[breaker]
failure_rate_threshold = 0.5
minimum_calls = 10
window_size = 50
wait_in_open_s = 30
permitted_calls_in_half_open = 3
[auth.tokens]
"change-me" = "team-a"
[aliases]
"SUCCESS_WITH_WARNINGS" = "completed"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "execwatch.toml"
    path.write_text(text)
    return str(path)


def test_the_design_example_config_loads(tmp_path: Path) -> None:
    """The config printed in DESIGN.md is valid as it stands."""
    settings = load_settings(write(tmp_path, DESIGN_EXAMPLE), {})
    assert ("127.0.0.1", 9478) == (settings.host, settings.port)
    assert 300.0 == settings.limits_for("triage").run_timeout_s
    assert 30.0 == settings.limits_for("triage").heartbeat_timeout_s  # from [defaults]
    assert settings.limits_for("other") is settings.defaults
    assert {"change-me": "team-a"} == dict(settings.auth.tokens)
    assert {"SUCCESS_WITH_WARNINGS": ExecState.COMPLETED} == dict(settings.aliases)


def test_no_file_gives_the_defaults() -> None:
    """Zero required config."""
    settings = load_settings(None, {})
    assert ("127.0.0.1", 9478, "execwatch.db") == (settings.host, settings.port, settings.database)
    assert DEFAULT_LIMITS == settings.defaults


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    """Precedence: flags > EXECWATCH_* > TOML > defaults; nested keys use a double underscore."""
    path = write(tmp_path, 'listen = "127.0.0.1:1000"\n[defaults]\nheartbeat_timeout_s = 30\n')
    environ = {
        "EXECWATCH_LISTEN": "127.0.0.1:2000",
        "EXECWATCH_DEFAULTS__HEARTBEAT_TIMEOUT_S": "12.5",
        "EXECWATCH_AGENTS__TRIAGE__RUN_TIMEOUT_S": "60",
        "EXECWATCH_URL": "http://ignored-by-the-daemon",
    }
    settings = load_settings(path, environ)
    assert 2000 == settings.port
    assert 12.5 == settings.defaults.heartbeat_timeout_s
    assert 60.0 == settings.limits_for("triage").run_timeout_s
    flagged = load_settings(path, environ, {"listen": "127.0.0.1:3000", "database": None})
    assert 3000 == flagged.port


def test_every_bad_key_and_value_is_named_at_once(tmp_path: Path) -> None:
    """check-config lists all problems, each with the key, the value and what was expected."""
    path = write(
        tmp_path,
        """
listn = "x"
max_body_bytes = "big"
[defaults]
heartbeat_timeout_s = -1
memory_policy = "panic"
[agents.triage]
run_timout_s = 3
[breaker]
failure_rate_threshold = 50
window_s = 60
window_size = 10
[aliases]
running = "completed"
OKAY = "fine"
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {"EXECWATCH_RETENTION__HISTORY": "0"})
    problems = caught.value.problems
    expected = [
        "top level: unknown key 'listn'",
        "max_body_bytes = 'big': expected an integer >= 1024",
        "[defaults].heartbeat_timeout_s = -1: expected a number > 0",
        "[defaults].memory_policy = 'panic': expected one of observe, fail, terminate",
        "[agents.triage]: unknown key 'run_timout_s'",
        "[breaker].failure_rate_threshold = 50: expected a number > 0 and <= 1",
        "[breaker]: set window_size (a count-based window) or window_s",
        "[retention].history = 0: expected an integer >= 1",
        "[aliases]: 'running' is a canonical state and cannot be an alias",
        "[aliases].OKAY = 'fine': expected one of pending,",
    ]
    for words in expected:
        assert any(words in p for p in problems), (words, problems)
    assert len(expected) == len(problems)


def test_a_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    """A syntax error names the file."""
    path = write(tmp_path, "listen = \n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.problems[0].startswith(f"{path}: not valid TOML")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    """A missing file names itself and why it cannot be read."""
    with pytest.raises(ConfigError) as caught:
        load_settings(str(tmp_path / "nope.toml"), {})
    assert "cannot read the config file" in caught.value.problems[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9478", ("127.0.0.1", 9478)),
        ("[::1]:80", ("::1", 80)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_listen_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT, with IPv6 in brackets."""
    assert expected == parse_listen(text)


@pytest.mark.parametrize("text", ["9478", ":9478", "host:port", "h:70000"])
def test_bad_listen_addresses_say_what_is_expected(text: str) -> None:
    """A bad address names itself."""
    with pytest.raises(ValueError, match=r"listen = "):
        parse_listen(text)


def test_short_tokens_are_refused() -> None:
    """A guessable token is a configuration error."""
    with pytest.raises(ConfigError, match="too short"):
        build_settings({"auth": {"tokens": {"abc": "team-a"}}})


@pytest.mark.parametrize(
    ("auth", "problem"),
    [
        ({"tokens": {"long-enough-token": "team a"}}, "must map to a tenant name"),
        ({"tokens": {"long-enough-token": ""}}, "must map to a tenant name"),
        ({"tokens": {" long-enough-token": "team-a"}}, "holds a space"),
        ({"tokens": {"long-enough-tökén": "team-a"}}, "outside visible ASCII"),
        ({"metrics_public": "yes"}, "[auth].metrics_public = 'yes': expected true or false"),
        ({"token": {}}, "[auth]: unknown key 'token'; allowed: tokens, metrics_public"),
    ],
)
def test_tokens_that_could_never_match_are_refused(auth: dict[str, object], problem: str) -> None:
    """A tenant no event could name, a token no header could carry: errors, not surprises."""
    with pytest.raises(ConfigError) as caught:
        build_settings({"auth": auth})
    assert any(problem in p for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("tenants", [["__other__"], ["team a"], ["*"], "team-a", [""]])
def test_the_metrics_tenant_allowlist_holds_tenant_names(tenants: object) -> None:
    with pytest.raises(ConfigError, match=r"\[metrics\]\.tenants"):
        build_settings({"metrics": {"tenants": tenants}})


def test_stream_settings_are_checked_and_keepalive_cannot_spin() -> None:
    settings = build_settings({"stream": {"ring_size": 50, "keepalive_s": 5, "max_consumers": 3}})
    assert (50, 5.0, 3) == (
        settings.stream.ring_size,
        settings.stream.keepalive_s,
        settings.stream.max_consumers,
    )
    with pytest.raises(ConfigError) as caught:
        build_settings({"stream": {"keepalive_s": 1e-9, "queue_size": 0, "ring": 1}})
    assert 3 == len(caught.value.problems)


def test_a_token_from_the_environment_keeps_its_case() -> None:
    """A token is a secret compared exactly: EXECWATCH_AUTH__TOKENS__X keeps X as given."""
    settings = load_settings(None, {"EXECWATCH_AUTH__TOKENS__AbCdEf123456": "team-a"})
    assert {"AbCdEf123456": "team-a"} == dict(settings.auth.tokens)


def test_alias_values_of_the_wrong_type_and_builtin_redefinitions_are_named() -> None:
    """A list as a target and a redefined built-in alias are problems, not crashes."""
    with pytest.raises(ConfigError) as caught:
        build_settings({"aliases": {"weird": ["x"], "DONE": "failed"}})
    assert [
        "[aliases].weird = ['x']: expected one of pending, starting, running, paused, "
        "completing, completed, failed, timeout, cancelled, dead",
        "[aliases]: 'DONE' is already a built-in alias of 'completed' and cannot be redefined",
    ] == list(caught.value.problems)


def test_a_bad_environment_variable_is_named_as_such() -> None:
    """A problem from the environment names the variable, not a key of some file."""
    with pytest.raises(ConfigError) as caught:
        load_settings(
            None,
            {"EXECWATCH_LISTN": "x", "EXECWATCH_DEFAULTS__HEARTBEAT_TIMEOUT_S": "abc"},
        )
    problems = caught.value.problems
    assert problems[0].startswith("EXECWATCH_DEFAULTS__HEARTBEAT_TIMEOUT_S='abc': ")
    assert problems[1].startswith("EXECWATCH_LISTN='x': top level: unknown key 'listn'")


def test_string_settings_from_the_environment_stay_strings() -> None:
    """EXECWATCH_DATABASE=2024 is a file called 2024, not a number."""
    assert "2024" == load_settings(None, {"EXECWATCH_DATABASE": "2024"}).database
