"""The session store on its own, on SQLite and on a real PostgreSQL server: responses by tenant (another
tenant's do not exist), the conversation context behind a response (cut at the newest truncation or
summary, a deleted turn reported), durability across store instances, and the store the config
selects."""
from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from cluster.config import SessionsSection
from deployments.store import (DATA_DIR_ENV, SQLITE_FILE, STORE_URL_ENV, PostgresStore, SQLiteStore,
                               StoredResponse, open_store)


def turn(n: int, previous: int | None, *, tenant="alice", dropped_through: int | None = None,
         summary: str | None = None) -> StoredResponse:
    text = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"turn {n}"}]}]
    output = [{"type": "message", "role": "assistant", "id": f"msg_{n}", "status": "completed",
               "content": [{"type": "output_text", "text": f"answer {n}", "annotations": []}]}]
    return StoredResponse(f"resp_{n}", tenant, "resp_0", None if previous is None else f"resp_{previous}", text,
                          output, {"id": f"resp_{n}", "object": "response", "status": "completed"}, summary,
                          None if dropped_through is None else f"resp_{dropped_through}", 1_700_000_000 + n)


@pytest.fixture
def fresh_database(postgres_url):
    """A database of its own on the session's PostgreSQL server (schema created by the store)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_url.replace("/postgres?", f"/{name}?")


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path):
    """store() opens one more store on the same data (as another replica or a restart would)."""
    def store():
        return SQLiteStore(tmp_path / "data" / SQLITE_FILE) if request.param == "sqlite" else PostgresStore(url)

    url = request.getfixturevalue("fresh_database") if request.param == "postgresql" else None
    return store


async def test_round_trip_and_tenant_isolation(make_store):
    store = make_store()
    await store.put(turn(0, None))
    got = await store.get("alice", "resp_0")
    assert got == turn(0, None)
    assert got.as_response()["output"][0]["content"][0]["text"] == "answer 0"
    assert await store.get("bob", "resp_0") is None
    assert await store.conversation("bob", "resp_0") is None
    assert await store.delete("bob", "resp_0") is False
    assert await store.get("alice", "resp_0") is not None
    assert await store.delete("alice", "resp_0") is True
    assert await store.get("alice", "resp_0") is None and await store.delete("alice", "resp_0") is False
    await store.close()


async def test_conversation_context_starts_at_the_newest_cut(make_store):
    store = make_store()
    await store.put(turn(0, None))
    for n in range(1, 7):
        await store.put(turn(n, n - 1, dropped_through={3: 1, 5: 2}.get(n), summary={5: "the note"}.get(n)))
    full = await store.conversation("alice", "resp_2")
    assert [t.id for t in full.turns] == ["resp_0", "resp_1", "resp_2"] and full.summary is None
    assert full.id == "resp_0" and full.missing is None
    after_truncation = await store.conversation("alice", "resp_4")
    assert [t.id for t in after_truncation.turns] == ["resp_2", "resp_3", "resp_4"]
    assert after_truncation.summary is None
    after_summary = await store.conversation("alice", "resp_6")
    assert [t.id for t in after_summary.turns] == ["resp_3", "resp_4", "resp_5", "resp_6"]
    assert after_summary.summary == "the note"
    # Deleting a turn the context no longer holds changes nothing; deleting one it holds breaks it.
    await store.delete("alice", "resp_1")
    assert (await store.conversation("alice", "resp_6")).missing is None
    await store.delete("alice", "resp_4")
    assert (await store.conversation("alice", "resp_6")).missing == "resp_4"
    assert (await store.conversation("alice", "resp_2")).missing == "resp_1"
    await store.close()


async def test_responses_outlive_the_store_that_wrote_them(make_store):
    first = make_store()
    await first.put(turn(0, None))
    await first.put(turn(1, 0))
    await first.close()
    second = make_store()
    assert [t.id for t in (await second.conversation("alice", "resp_1")).turns] == ["resp_0", "resp_1"]
    await second.close()


async def test_replicas_create_the_schema_together(fresh_database):
    stores = [PostgresStore(fresh_database) for _ in range(3)]
    await asyncio.gather(*(s.put(turn(n, None)) for n, s in enumerate(stores)))
    assert all([await s.get("alice", f"resp_{n}") for n, s in enumerate(stores)])
    await asyncio.gather(*(s.close() for s in stores))


def test_config_selects_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from-env"))
    assert open_store(SessionsSection()).path == tmp_path / "from-env" / SQLITE_FILE
    assert open_store(SessionsSection(data_dir=str(tmp_path / "cfg"))).path == tmp_path / "cfg" / SQLITE_FILE
    with pytest.raises(ValueError, match=STORE_URL_ENV):
        open_store(SessionsSection(store="postgresql"))
    monkeypatch.setenv(STORE_URL_ENV, "postgresql://u:secret@db:5432/x")
    assert isinstance(open_store(SessionsSection()), PostgresStore)                   # auto: the URL decides
    assert isinstance(open_store(SessionsSection(store="sqlite")), SQLiteStore)
    assert open_store(SessionsSection(store_url="postgresql://other/y")).url == "postgresql://other/y"
    with pytest.raises(ValueError, match="postgresql:// URL"):
        SessionsSection(store_url="sqlite:///x.db")


async def test_an_unreachable_server_is_a_store_error_without_the_password():
    from deployments.store import StoreError

    store = PostgresStore("postgresql://u:hunter2@127.0.0.1:1/x?connect_timeout=1", open_timeout_s=2)
    with pytest.raises(StoreError) as error:
        await store.get("alice", "resp_0")
    assert "hunter2" not in str(error.value) and "PostgreSQL session store" in str(error.value)


async def test_the_sqlite_directory_is_created_on_demand(tmp_path):
    store = SQLiteStore(tmp_path / "a" / "b" / SQLITE_FILE)
    assert not (tmp_path / "a").exists()
    await store.put(turn(0, None))
    assert (tmp_path / "a" / "b" / SQLITE_FILE).exists()
    await store.close()
