"""The embedded default store: SQLite in WAL mode, with group commit.

Every commit() joins a queue; one writer drains the whole queue into one transaction,
so under load a hundred concurrent requests cost one fsync-free WAL append, not a
hundred. A commit() returns only after the transaction that holds its changes has
committed: with WAL and synchronous=NORMAL a committed transaction survives `kill -9`
of the daemon (not a power cut, which would need synchronous=FULL).

The connection belongs to one worker thread; the event loop only serializes snapshots
(before its first await, as the Protocol asks) and waits.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from monitor.encoding import compact_json
from monitor.errors import ConfigError
from monitor.model import Key
from monitor.store import Changes, Snapshot, merge_liveness

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    tenant TEXT NOT NULL,
    execution_id TEXT NOT NULL,
    serial INTEGER NOT NULL,
    snapshot BLOB NOT NULL,
    PRIMARY KEY (tenant, execution_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS liveness (
    tenant TEXT NOT NULL,
    execution_id TEXT NOT NULL,
    facts BLOB NOT NULL,
    PRIMARY KEY (tenant, execution_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS span_contexts (
    tenant TEXT NOT NULL,
    execution_id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    sampled INTEGER NOT NULL,
    PRIMARY KEY (tenant, execution_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS breakers (
    tenant TEXT NOT NULL,
    agent TEXT NOT NULL,
    snapshot BLOB NOT NULL,
    PRIMARY KEY (tenant, agent)
) WITHOUT ROWID;
"""
WAL_LIMIT_BYTES = 64 * 1024 * 1024
"""The WAL file is truncated back to this size after a checkpoint, so it stays bounded."""

Row = tuple[str, str, int, bytes]
LIVENESS_SLICE = 5000
"""Checkpoint rows serialized between two yields to the event loop."""


@dataclass(slots=True)
class _Pending:
    """One commit() waiting for the transaction that will hold it."""

    rows: list[Row]
    evicted: list[Key]
    breakers: list[tuple[str, str, bytes]]
    forgotten: list[tuple[str, str]]
    liveness: list[tuple[str, str, bytes, str, str]]
    span_contexts: list[tuple[str, str, str, str, bool, str, str]]
    done: asyncio.Future[None] = field(
        repr=False, default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _connect(path: str) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise ConfigError(
            [f"database = {path!r} cannot be opened: {exc}; name a writable file, "
             'or ":memory:" to keep nothing']
        ) from None  # fmt: skip
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ConfigError(
                [f"database = {path!r} has schema version {version}; this execwatch reads "
                 f"version {SCHEMA_VERSION}: point it at a new file"]
            )  # fmt: skip
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise ConfigError(
            [f"database = {path!r} is not an execwatch SQLite file ({exc}); point it at a "
             "new file"]
        ) from None  # fmt: skip
    except ConfigError:
        db.close()
        raise
    return db


class SqliteStore:
    """Keeps the latest snapshot of every execution the registry holds, in one file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = _connect(self.path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="execwatch-store")
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0
        """Transactions committed: fewer than commits under concurrent load."""
        self.commits = 0

    async def _run(self, fn: object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, fn, *args)  # type: ignore[arg-type]

    async def load(self) -> list[Snapshot]:
        rows = await self._run(self._read)
        assert isinstance(rows, list)
        return rows

    def _read(self) -> list[Snapshot]:
        cursor = self._db.execute(
            "SELECT e.snapshot, l.facts FROM executions AS e LEFT JOIN liveness AS l"
            " USING (tenant, execution_id) ORDER BY e.serial"
        )
        snapshots = []
        for blob, facts in cursor:
            snap = orjson.loads(blob)
            if facts is not None:
                merge_liveness(snap, orjson.loads(facts))
            snapshots.append(snap)
        return snapshots

    async def load_span_contexts(self) -> list[tuple[Key, tuple[str, str, bool]]]:
        rows = await self._run(self._read_span_contexts)
        assert isinstance(rows, list)
        return rows

    def _read_span_contexts(self) -> list[tuple[Key, tuple[str, str, bool]]]:
        cursor = self._db.execute(
            "SELECT s.tenant, s.execution_id, s.trace_id, s.span_id, s.sampled"
            " FROM span_contexts AS s JOIN executions USING (tenant, execution_id)"
        )
        return [((t, e), (trace, span, bool(sampled))) for t, e, trace, span, sampled in cursor]

    async def load_breakers(self) -> list[Snapshot]:
        rows = await self._run(self._read_breakers)
        assert isinstance(rows, list)
        return rows

    def _read_breakers(self) -> list[Snapshot]:
        cursor = self._db.execute("SELECT snapshot FROM breakers")
        return [orjson.loads(blob) for (blob,) in cursor]

    async def commit(self, changes: Changes) -> None:
        # Snapshot now: the registry goes on changing these objects after the first await.
        rows = [
            (ex.tenant, ex.execution_id, ex.serial, compact_json(ex.snapshot()))
            for ex in changes.executions
        ]
        breakers = [(b.tenant, b.agent, compact_json(b.snapshot())) for b in changes.breakers]
        evicted, forgotten = list(changes.evicted), list(changes.forgotten_breakers)
        spans = [
            (tenant, execution_id, trace_id, span_id, sampled, tenant, execution_id)
            for (tenant, execution_id), (trace_id, span_id, sampled) in changes.span_contexts
        ]
        waits = []
        if rows or evicted or breakers or forgotten or spans:
            # Queued before any await: commits reach the file in the order they were taken.
            waits.append(self._enqueue(_Pending(rows, evicted, breakers, forgotten, [], spans)))
        if changes.liveness:
            # A checkpoint may be serialized in slices, so a later commit can overtake it:
            # its rows carry the execution's version, and replay keeps the newer of the two.
            liveness: list[tuple[str, str, bytes, str, str]] = []
            for start in range(0, len(changes.liveness), LIVENESS_SLICE):
                if start:
                    await asyncio.sleep(0)  # 100k heartbeating executions: no 150 ms stall
                liveness.extend(
                    (ex.tenant, ex.execution_id, compact_json(ex.liveness()), ex.tenant,
                     ex.execution_id)
                    for ex in changes.liveness[start : start + LIVENESS_SLICE]
                )  # fmt: skip
            waits.append(self._enqueue(_Pending([], [], [], [], liveness, [])))
        if not waits:
            return
        # A caller that goes away (a client disconnect) must not cancel the others' write.
        await asyncio.shield(asyncio.gather(*waits))
        self.commits += 1

    def _enqueue(self, pending: _Pending) -> asyncio.Future[None]:
        self._queue.append(pending)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return pending.done

    async def _drain(self) -> None:
        """Write everything queued, one transaction per round, until the queue is empty."""
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._run(self._write, batch)
            except Exception as exc:
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
                continue
            self.transactions += 1
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_result(None)

    def _write(self, batch: list[_Pending]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for pending in batch:  # in order: an eviction then a re-registration stays so
                if pending.evicted:
                    for table in ("executions", "liveness", "span_contexts"):
                        db.executemany(
                            f"DELETE FROM {table} WHERE tenant = ? AND execution_id = ?",
                            pending.evicted,
                        )
                if pending.rows:
                    db.executemany(
                        "INSERT OR REPLACE INTO executions VALUES (?, ?, ?, ?)", pending.rows
                    )
                # Only for executions still in the file: a row written after its
                # execution's eviction would never be deleted.
                if pending.span_contexts:
                    db.executemany(
                        "INSERT OR REPLACE INTO span_contexts SELECT ?, ?, ?, ?, ? WHERE EXISTS"
                        " (SELECT 1 FROM executions WHERE tenant = ? AND execution_id = ?)",
                        pending.span_contexts,
                    )
                if pending.liveness:
                    db.executemany(
                        "INSERT OR REPLACE INTO liveness SELECT ?, ?, ? WHERE EXISTS"
                        " (SELECT 1 FROM executions WHERE tenant = ? AND execution_id = ?)",
                        pending.liveness,
                    )
                if pending.forgotten:
                    db.executemany(
                        "DELETE FROM breakers WHERE tenant = ? AND agent = ?", pending.forgotten
                    )
                if pending.breakers:
                    db.executemany(
                        "INSERT OR REPLACE INTO breakers VALUES (?, ?, ?)", pending.breakers
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Wait for queued commits, checkpoint the WAL into the file, and release it."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()
