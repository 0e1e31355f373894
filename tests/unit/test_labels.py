"""The agent label cap and its memory of decisions: remembered or not, the same labels."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporters import prometheus
from exporters.prometheus import OTHER_TENANT, OVERFLOW, AgentLabels

PAIRS = st.lists(
    st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.sampled_from(["a", "b", "c", "d", "e"])),
    max_size=60,
)


@given(pairs=PAIRS, cap=st.integers(0, 4), allow=st.sampled_from([(), ("t1",), ("t1", "t2")]))
def test_remembered_groups_are_the_groups_decided_afresh(
    pairs: list[tuple[str, str]], cap: int, allow: tuple[str, ...]
) -> None:
    """Against a twin that decides every call anew: same groups, same overflow count,
    with the memory small enough to start over several times."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prometheus, "MAX_GROUPS_CACHED", 3)
        cached, fresh = AgentLabels(cap, allow), AgentLabels(cap, allow)
        for tenant, agent in pairs:
            assert fresh._group(tenant, agent) == cached(tenant, agent)
            assert len(cached.groups) <= 3
        assert fresh.overflowed == cached.overflowed


def test_a_kept_name_stays_kept_and_an_overflowed_one_stays_folded() -> None:
    labels = AgentLabels(2, ("t1",))
    assert [("t1", "a"), (OTHER_TENANT, "b"), ("t1", OVERFLOW)] == [
        labels("t1", "a"), labels("t9", "b"), labels("t1", "c")
    ]  # fmt: skip
    assert [("t1", "a"), ("t1", OVERFLOW)] == [labels("t1", "a"), labels("t1", "c")]
    assert {("t1", "a"): ("t1", "a"), ("t9", "b"): (OTHER_TENANT, "b"),
            ("t1", "c"): ("t1", OVERFLOW)} == labels.groups  # fmt: skip
    assert 1 == labels.overflowed
