"""The small containers of the model."""

from __future__ import annotations

from monitor.model import Recent


def test_recent_keeps_the_last_items_in_order() -> None:
    recent: Recent[int] = Recent(3, [1, 2])
    recent.append(3)
    recent.append(4)
    assert [2, 3, 4] == recent
    recent.extend(range(5, 10))
    assert [7, 8, 9] == recent
    assert [8, 9] == Recent(2, range(10))


def test_recent_is_small_when_it_holds_little() -> None:
    """Why it is not a deque: an empty deque already takes a 64-slot block."""
    import sys
    from collections import deque

    assert sys.getsizeof(Recent(100, [1])) < sys.getsizeof(deque([1], maxlen=100)) / 4
