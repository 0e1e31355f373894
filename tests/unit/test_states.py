"""The canonical state machine: rules 1-7 and the alias table, exactly as DESIGN.md writes them."""

from __future__ import annotations

import itertools

import pytest

from monitor.errors import FinalState, InvalidTransition
from monitor.states import (
    ALLOWED,
    FINAL,
    LIVE,
    TERMINAL,
    ExecState,
    StateNames,
    check_transition,
)

S = ExecState
ORDER = [S.PENDING, S.STARTING, S.RUNNING, S.COMPLETING]


def rule_verdict(current: ExecState, target: ExecState) -> str:
    """An independent reading of DESIGN.md's rules: 'change', 'noop' or 'reject'."""
    if current in FINAL:  # rule 6
        return "reject"
    if current == target:  # rule 1
        return "noop"
    if current is S.DEAD:  # rule 5
        return "reject" if target is S.PENDING else "change"
    if target in TERMINAL:  # rule 4
        return "change"
    if target is S.PAUSED:  # rule 3 (entered from any non-terminal)
        return "change"
    if current is S.PAUSED:  # rule 3 (left to starting, running or completing)
        return "change" if target in (S.STARTING, S.RUNNING, S.COMPLETING) else "reject"
    if current in ORDER and target in ORDER:  # rule 2
        return "change" if ORDER.index(target) > ORDER.index(current) else "reject"
    return "reject"  # rule 7


def test_ten_canonical_states_five_live_five_terminal() -> None:
    """There are ten states: five non-terminal, four final and dead."""
    assert 10 == len(ExecState)
    assert {"pending", "starting", "running", "paused", "completing"} == set(LIVE)
    assert {"completed", "failed", "timeout", "cancelled"} == set(FINAL)
    assert FINAL | {S.DEAD} == TERMINAL


@pytest.mark.parametrize(("current", "target"), list(itertools.product(ExecState, ExecState)))
def test_every_pair_follows_the_rules(current: ExecState, target: ExecState) -> None:
    """All 100 pairs get the verdict the seven rules give."""
    expected = rule_verdict(current, target)
    if expected == "reject":
        with pytest.raises(InvalidTransition):
            check_transition("run-1", current, target)
    else:
        assert (expected == "change") == check_transition("run-1", current, target)


def test_invalid_transition_names_the_execution_both_states_and_the_allowed_targets() -> None:
    """Rule 7's error carries and says everything a sender needs to fix the event."""
    with pytest.raises(InvalidTransition) as caught:
        check_transition("run-42", S.RUNNING, S.STARTING)
    error = caught.value
    assert ("run-42", S.RUNNING, S.STARTING) == (error.execution_id, error.current, error.target)
    assert (S.PAUSED, S.COMPLETING, *sorted(TERMINAL, key=list(S).index)) == tuple(
        sorted(error.allowed, key=list(S).index)
    )
    assert (
        "execution 'run-42' cannot go from 'running' to 'starting'; allowed from 'running': "
        "paused, completing, completed, failed, timeout, cancelled, dead"
    ) == str(error)
    assert (409, "invalid_transition") == (error.status, error.reason)


def test_final_state_rejects_even_the_same_state() -> None:
    """Rule 6 wins over rule 1: after completed, even completed is rejected."""
    with pytest.raises(FinalState) as caught:
        check_transition("run-1", S.COMPLETED, S.COMPLETED)
    assert "final_state" == caught.value.reason
    assert (
        "execution 'run-1' already ended in final state 'completed'; no event may follow "
        "(got 'completed')"
    ) == str(caught.value)


def test_dead_cannot_be_revived_into_pending() -> None:
    """Rule 5: proof of life may lead anywhere but back to pending."""
    assert S.PENDING not in ALLOWED[S.DEAD]
    assert set(ExecState) - {S.PENDING, S.DEAD} == set(ALLOWED[S.DEAD])


SEED_ALIASES = {
    "queued": ("pending", None),
    "scheduled": ("pending", None),
    "initializing": ("starting", None),
    "init": ("starting", None),
    "in_progress": ("running", None),
    "active": ("running", None),
    "recovering": ("running", "recovering"),
    "yielded": ("paused", None),
    "suspended": ("paused", None),
    "success": ("completed", None),
    "succeeded": ("completed", None),
    "ok": ("completed", None),
    "done": ("completed", None),
    "complete": ("completed", None),
    "finished": ("completed", None),
    "error": ("failed", None),
    "errored": ("failed", None),
    "timed_out": ("timeout", None),
    "timedout": ("timeout", None),
    "aborted": ("cancelled", None),
    "canceled": ("cancelled", None),
}


@pytest.mark.parametrize(("alias", "expected"), sorted(SEED_ALIASES.items()))
def test_every_seed_alias_maps_as_written_in_any_case(
    alias: str, expected: tuple[str, str | None]
) -> None:
    """Each alias of DESIGN.md resolves, lower, upper and mixed case."""
    names = StateNames()
    for spelling in (alias, alias.upper(), alias.capitalize()):
        assert expected == names.resolve(spelling)


@pytest.mark.parametrize(
    ("vocabulary", "spellings"),
    [
        ("6-state tracker", ["pending", "running", "completed", "failed", "timeout", "dead"]),
        (
            "9-state tracker",
            [
                "pending",
                "starting",
                "running",
                "completing",
                "completed",
                "failed",
                "timeout",
                "cancelled",
                "dead",
            ],
        ),
        (
            "uppercase registry",
            [
                "PENDING",
                "INITIALIZING",
                "RUNNING",
                "SUCCESS",
                "FAILED",
                "TIMEOUT",
                "ABORTED",
                "RECOVERING",
            ],
        ),
        ("job engine", ["queued", "running", "paused", "done", "error"]),
    ],
)
def test_seed_vocabularies_all_resolve(vocabulary: str, spellings: list[str]) -> None:
    """Every state of the vocabularies execwatch exists to unify resolves to a canonical one."""
    names = StateNames()
    assert all(names.resolve(s) is not None for s in spellings), vocabulary


def test_config_aliases_extend_the_table_case_insensitively() -> None:
    """An alias from [aliases] resolves like a built-in one."""
    names = StateNames({"SUCCESS_WITH_WARNINGS": S.COMPLETED})
    assert (S.COMPLETED, None) == names.resolve("success_with_warnings")
    assert (S.COMPLETED, None) == names.resolve("Success_With_Warnings")


def test_unknown_spelling_resolves_to_nothing() -> None:
    """An unknown state is not guessed."""
    assert StateNames().resolve("exploded") is None
