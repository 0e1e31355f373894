"""The SQLite store: what it keeps, how it batches commits, how it refuses a bad file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from monitor.config import build_settings
from monitor.errors import ConfigError
from monitor.events import parse_event
from monitor.registry import Registry
from monitor.states import StateNames
from monitor.store import Changes
from monitor.store.sqlite import SqliteStore

NAMES = StateNames({})


def registry_with(*ids: str) -> Registry:
    registry = Registry(build_settings({}))
    for execution_id in ids:
        event = {"type": "state", "execution_id": execution_id, "agent": "a", "state": "running"}
        registry.apply(parse_event(event, 1000.0, NAMES), 1000.0)
    return registry


async def test_commits_are_kept_evictions_forgotten_and_order_preserved(tmp_path: Path) -> None:
    registry = registry_with("c", "a", "b")
    store = SqliteStore(tmp_path / "x.db")
    await store.commit(Changes((), list(registry), ()))
    await store.commit(Changes((), (), [("default", "a")]))
    await store.close()

    reopened = SqliteStore(tmp_path / "x.db")
    assert ["c", "b"] == [snap["execution_id"] for snap in await reopened.load()]
    await reopened.close()


async def test_concurrent_commits_share_transactions(tmp_path: Path) -> None:
    """Group commit: 50 requests committing at once take far fewer than 50 transactions."""
    ids = [f"r{i}" for i in range(50)]
    registry = registry_with(*ids)
    store = SqliteStore(tmp_path / "x.db")
    await asyncio.gather(*(store.commit(Changes((), [ex], ())) for ex in registry))
    assert 50 == store.commits
    assert store.transactions < 50
    assert ids == [snap["execution_id"] for snap in await store.load()]
    await store.close()


async def test_a_cancelled_caller_does_not_cancel_the_write(tmp_path: Path) -> None:
    registry = registry_with("r")
    store = SqliteStore(tmp_path / "x.db")
    task = asyncio.create_task(store.commit(Changes((), list(registry), ())))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await store.close()
    reopened = SqliteStore(tmp_path / "x.db")
    assert ["r"] == [snap["execution_id"] for snap in await reopened.load()]
    await reopened.close()


async def test_a_failed_write_fails_its_callers_and_the_store_goes_on(tmp_path: Path) -> None:
    registry = registry_with("r")
    store = SqliteStore(tmp_path / "x.db")
    bad = Changes((), (), [("default", object())])  # type: ignore[list-item]
    with pytest.raises(sqlite3.Error):
        await store.commit(bad)
    await store.commit(Changes((), list(registry), ()))
    assert ["r"] == [snap["execution_id"] for snap in await store.load()]
    await store.close()


def test_a_file_that_is_not_sqlite_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database, just words " * 100)
    with pytest.raises(ConfigError) as caught:
        SqliteStore(path)
    assert "database = " in str(caught.value)
    assert "not an execwatch SQLite file" in str(caught.value)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        SqliteStore(path)


def test_a_directory_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be opened"):
        SqliteStore(tmp_path / "missing" / "x.db")


async def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    await SqliteStore(tmp_path / "x.db").close()
    db = sqlite3.connect(tmp_path / "x.db")
    assert "wal" == db.execute("PRAGMA journal_mode").fetchone()[0]
    db.close()


async def test_a_snapshot_newer_than_the_checkpoint_wins(tmp_path: Path) -> None:
    """Heartbeat, checkpoint, then a state change commits a whole snapshot: a crash
    before the next checkpoint must replay the snapshot's facts, not the older ones."""
    registry = registry_with("r")
    store = SqliteStore(tmp_path / "x.db")
    dirty, _ = registry.take_changes()
    await store.commit(Changes((), list(dirty.values()), ()))
    beat = {"type": "heartbeat", "execution_id": "r", "progress": 1, "seq": 1}
    registry.apply(parse_event(beat, 1001.0, NAMES), 1001.0)
    touched = registry.take_touched()
    assert ["r"] == [ex.execution_id for ex in touched]
    await store.commit(Changes(liveness=touched))
    moved = {"type": "state", "execution_id": "r", "state": "paused", "progress": 2, "seq": 2}
    registry.apply(parse_event(moved, 1002.0, NAMES), 1002.0)
    dirty, _ = registry.take_changes()
    await store.commit(Changes((), list(dirty.values()), ()))
    await store.close()

    reopened = SqliteStore(tmp_path / "x.db")
    (snap,) = await reopened.load()
    assert ("paused", 2, 2, 1002.0) == (
        snap["state"], snap["progress"], snap["last_seq"], snap["updated_at"]
    )  # fmt: skip
    await reopened.close()


async def test_a_checkpoint_newer_than_the_snapshot_wins(tmp_path: Path) -> None:
    registry = registry_with("r")
    store = SqliteStore(tmp_path / "x.db")
    dirty, _ = registry.take_changes()
    await store.commit(Changes((), list(dirty.values()), ()))
    beat = {"type": "heartbeat", "execution_id": "r", "progress": 7, "seq": 3, "rss_bytes": 10}
    registry.apply(parse_event(beat, 1005.0, NAMES), 1005.0)
    await store.commit(Changes(liveness=registry.take_touched()))
    await store.close()

    reopened = SqliteStore(tmp_path / "x.db")
    (snap,) = await reopened.load()
    assert (7, 3, 10, 1005.0, [[1005.0, 10]]) == (
        snap["progress"], snap["last_seq"], snap["rss_bytes"], snap["last_heartbeat_at"],
        snap["rss_samples"],
    )  # fmt: skip
    await reopened.close()
