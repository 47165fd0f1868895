"""The session store: where the Responses API keeps responses, so that a conversation survives
ingress replicas and restarts.

One small interface (`SessionStore`), two implementations:

    SQLiteStore    a file under the data directory (the default; one machine, any number of
                   ingress replicas on it); sqlite3 on a worker thread, never on the event loop
    PostgresStore  a PostgreSQL server every replica shares (multi-node deployments); psycopg 3 async

One row per response: its id, owner (tenant name), conversation id (the id of the conversation's
first response), previous response id, this turn's input items, its output items, the rest of the
response object, and, when this turn shortened the conversation, the summary that replaced the older
turns and the id of the newest turn it replaced. Every read and delete is scoped to a tenant: another
tenant's response does not exist. The schema is created on first use.
"""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config import SessionsSection

STORE_URL_ENV = "EXPERTMESH_SESSION_STORE_URL"
DATA_DIR_ENV = "EXPERTMESH_DATA_DIR"
SQLITE_FILE = "sessions.sqlite3"
TABLE = "expertmesh_responses"

SCHEMA = [
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        previous_id TEXT,
        input TEXT NOT NULL,
        output TEXT NOT NULL,
        response TEXT NOT NULL,
        summary TEXT,
        dropped_through TEXT,
        created_at BIGINT NOT NULL)""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_conversation ON {TABLE} (tenant, conversation_id)",
]
COLUMNS = "id, tenant, conversation_id, previous_id, input, output, response, summary, dropped_through, created_at"

# The turns still in a conversation's context, oldest first: walk back from a response along
# previous_id (same tenant only) until the newest `dropped_through` mark, which names the newest
# turn the context no longer holds (truncated, or condensed into that row's summary).
CHAIN = f"""
WITH RECURSIVE chain(id, previous_id, cut, depth) AS (
    SELECT id, previous_id, dropped_through, 0 FROM {TABLE} WHERE id = ? AND tenant = ?
  UNION ALL
    SELECT r.id, r.previous_id, COALESCE(c.cut, r.dropped_through), c.depth + 1
    FROM {TABLE} r JOIN chain c ON r.id = c.previous_id
    WHERE r.tenant = ? AND (c.cut IS NULL OR c.id <> c.cut)
)
SELECT {", ".join("r." + c.strip() for c in COLUMNS.split(","))}, chain.cut
FROM chain JOIN {TABLE} r ON r.id = chain.id ORDER BY chain.depth DESC"""


class StoreError(Exception):
    """The store cannot be reached or used (the ingress answers 503)."""


@dataclass
class StoredResponse:
    id: str
    tenant: str
    conversation_id: str
    previous_id: str | None
    input: list[dict]                      # this turn's input items (instructions are not carried over)
    output: list[dict]                     # its output items
    response: dict                         # the response object without `output`
    summary: str | None = None             # the note that replaced the turns through `dropped_through`
    dropped_through: str | None = None     # the newest earlier response this turn removed from the context
    created_at: int = 0

    def row(self) -> tuple:
        return (self.id, self.tenant, self.conversation_id, self.previous_id, json.dumps(self.input),
                json.dumps(self.output), json.dumps(self.response), self.summary, self.dropped_through,
                self.created_at)

    @classmethod
    def from_row(cls, row) -> "StoredResponse":
        (id_, tenant, conversation, previous, input_, output, response, summary, dropped, created) = row[:10]
        return cls(id_, tenant, conversation, previous, json.loads(input_), json.loads(output),
                   json.loads(response), summary, dropped, int(created))

    def as_response(self) -> dict:
        return {**self.response, "output": self.output}


@dataclass
class Conversation:
    """What continuing from a response needs: the turns still in the context (oldest first, ending
    with that response) and the summary standing in for the turns before them."""
    id: str                                # the conversation id (its first response's id)
    turns: list[StoredResponse]
    summary: str | None = None
    missing: str | None = None             # an earlier turn that was deleted: the chain is broken
    cut: str | None = field(default=None, repr=False)


def _conversation(rows: list[tuple]) -> Conversation | None:
    if not rows:
        return None
    cut = rows[0][10]                      # the oldest row carries the cut its successors set
    turns = [StoredResponse.from_row(r) for r in rows]
    missing = None
    if turns[0].id == cut:
        turns = turns[1:]                  # the newest removed turn: only its successors remain
    elif turns[0].previous_id is not None:
        missing = turns[0].previous_id     # walked back to a turn whose predecessor is gone
    summary = next((t.summary for t in reversed(turns) if t.dropped_through is not None), None)
    return Conversation(turns[-1].conversation_id, turns, summary, missing, cut)


class SessionStore(ABC):
    """Responses by (tenant, id). Every method is a coroutine that never blocks the event loop.
    Both stores speak the same SQL (`?` placeholders); each supplies only how a statement runs."""

    @abstractmethod
    async def _query(self, sql: str, params: tuple = ()) -> tuple[list, int]:
        """Run one statement: (rows, rowcount). Failures are StoreError."""

    @abstractmethod
    async def close(self) -> None: ...

    async def put(self, record: StoredResponse) -> None:
        await self._query(f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join('?' * 10)})", record.row())

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        rows, _ = await self._query(f"SELECT {COLUMNS} FROM {TABLE} WHERE id = ? AND tenant = ?", (response_id, tenant))
        return StoredResponse.from_row(rows[0]) if rows else None

    async def conversation(self, tenant: str, response_id: str) -> Conversation | None:
        """The context to continue from `response_id`, or None when this tenant has no such response."""
        rows, _ = await self._query(CHAIN, (response_id, tenant, tenant))
        return _conversation(rows)

    async def delete(self, tenant: str, response_id: str) -> bool:
        _, count = await self._query(f"DELETE FROM {TABLE} WHERE id = ? AND tenant = ?", (response_id, tenant))
        return count > 0


class SQLiteStore(SessionStore):
    """A SQLite file (WAL, so that several ingress replicas on one machine share it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                for statement in SCHEMA:
                    db.execute(statement)
            except (OSError, sqlite3.Error) as error:
                raise StoreError(f"cannot open the SQLite session store {self.path}: {error}") from None
            self._db = db
        return self._db

    def _run(self, sql: str, params: tuple = ()) -> tuple[list, int]:
        with self._lock:
            try:
                cursor = self._connect().execute(sql, params)
                return cursor.fetchall(), cursor.rowcount
            except sqlite3.Error as error:
                raise StoreError(f"the SQLite session store {self.path} failed: {error}") from None

    async def _query(self, sql: str, params: tuple = ()) -> tuple[list, int]:
        return await asyncio.to_thread(self._run, sql, params)

    async def close(self) -> None:
        def close():
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None
        await asyncio.to_thread(close)


class PostgresStore(SessionStore):
    """A PostgreSQL server shared by every ingress replica: a small psycopg 3 async pool, opened on
    first use; the schema is created under an advisory lock, so replicas starting together agree."""

    SCHEMA_LOCK = 0x6578706D       # any constant, the same in every replica

    def __init__(self, url: str, max_connections: int = 8, open_timeout_s: float = 30):
        self.url = url
        self.max_connections = max_connections
        self.open_timeout_s = open_timeout_s
        self._pool = None
        self._opening = asyncio.Lock()

    async def _connection_pool(self):
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                from psycopg_pool import AsyncConnectionPool

                pool = AsyncConnectionPool(self.url, min_size=1, max_size=self.max_connections, open=False,
                                           kwargs={"autocommit": True}, name="expertmesh-sessions")
                try:
                    await pool.open(wait=True, timeout=self.open_timeout_s)
                    async with pool.connection() as db, db.transaction():
                        await db.execute("SELECT pg_advisory_xact_lock(%s)", (self.SCHEMA_LOCK,))
                        for statement in SCHEMA:
                            await db.execute(statement)
                except Exception as error:
                    await pool.close()
                    raise StoreError(f"cannot open the PostgreSQL session store at {_redacted(self.url)}: "
                                     f"{error}") from None
                self._pool = pool
        return self._pool

    async def _query(self, sql: str, params: tuple = ()) -> tuple[list, int]:
        import psycopg

        pool = await self._connection_pool()
        try:
            async with pool.connection() as db:
                cursor = await db.execute(sql.replace("?", "%s"), params)
                rows = await cursor.fetchall() if cursor.description else []
                return rows, cursor.rowcount
        except (psycopg.Error, OSError) as error:
            raise StoreError(f"the PostgreSQL session store failed: {error}") from None

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def _redacted(url: str) -> str:
    """A connection URL without its password, for error messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.split(':')[0]}:***{at}{host}" if at else url


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".local" / "share" / "expertmesh").expanduser()


def open_store(config: SessionsSection) -> SessionStore:
    """The store `config` describes (read in the replica: the environment is the pod's). Opening
    connects nothing; the first request does."""
    url = config.store_url or os.environ.get(STORE_URL_ENV) or None
    kind = config.store if config.store != "auto" else ("postgresql" if url else "sqlite")
    if kind == "postgresql":
        if not url:
            raise ValueError(f"sessions.store is postgresql, but there is no store URL: set sessions.store_url "
                             f"or ${STORE_URL_ENV}")
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"${STORE_URL_ENV} must be a postgresql:// URL, got {_redacted(url)!r}")
        return PostgresStore(url)
    data_dir = Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()
    return SQLiteStore(data_dir / SQLITE_FILE)
