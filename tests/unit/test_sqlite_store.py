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
