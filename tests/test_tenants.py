"""Tenants without a cluster: API keys (config hashes, a Kubernetes Secret's files, `expertmesh
hash-key`), the shared limit counters on a clock of the test's own, and weighted fair share in the
engine's waiting queue with a tiny model (deterministic: steps are counted, not timed).

The served side (401s through the official openai client, 429s across two ingress replicas, fair
share through the HTTP API) is tests/test_tenants_serving.py."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.config import ClusterConfig
from deployments.protocol import APIError
from deployments.tenants import ANONYMOUS, LimitCounters, TenantRegistry, hash_key, read_keys_dir
from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams
from tests import tiny_checkpoints

ROOT = Path(__file__).resolve().parents[1]
KEY_A, KEY_B, KEY_B2 = "sk-alpha-0123456789", "sk-beta-0123456789", "sk-beta-rotated-42"


def config(**tenants) -> ClusterConfig:
    return ClusterConfig.model_validate({"tenants": tenants})


def secret_volume(root: Path, entries: dict[str, str]) -> Path:
    """A directory laid out as Kubernetes mounts a Secret: `..data` links to a timestamped
    directory with the files, and each key is a link through `..data`."""
    data = root / "..2025_01_01_00_00_00.000000001"
    data.mkdir(parents=True)
    for name, content in entries.items():
        (data / name).write_text(content)
    (root / "..data").symlink_to(data.name)
    for name in entries:
        (root / name).symlink_to(Path("..data") / name)
    return root


# -- API keys --------------------------------------------------------------------------------------

def test_config_keys_are_hashes_and_resolve_to_their_tenant():
    registry = TenantRegistry.from_config(config(
        alpha={"api_keys": [hash_key(KEY_A)], "weight": 3, "limits": {"max_context_tokens": 64}}), keys_dir="")
    tenant = registry.authenticate(f"Bearer {KEY_A}")
    assert (tenant.name, tenant.weight, tenant.limits.max_context_tokens) == ("alpha", 3.0, 64)
    assert registry.authenticate(f"bearer   {KEY_A}  ").name == "alpha"     # scheme is case-insensitive


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", f"Basic {KEY_A}", f"Bearer {KEY_A}x",
                                    f"Bearer {KEY_A.upper()}"])
def test_missing_malformed_or_unknown_keys_are_401_invalid_api_key(header):
    registry = TenantRegistry.from_config(config(alpha={"api_keys": [hash_key(KEY_A)]}), keys_dir="")
    with pytest.raises(APIError) as caught:
        registry.authenticate(header)
    assert caught.value.status == 401 and caught.value.body()["error"]["code"] == "invalid_api_key"
    assert KEY_A.lower() not in caught.value.message.lower()          # a key is never echoed


def test_a_plaintext_key_in_the_config_is_refused_without_repeating_it():
    with pytest.raises(ValueError) as caught:
        config(alpha={"api_keys": [KEY_A]})
    assert "tenants.alpha.api_keys" in str(caught.value) and "hash-key" in str(caught.value)
    assert KEY_A not in str(caught.value)


def test_keys_from_a_mounted_secret_join_the_config(tmp_path):
    keys_dir = secret_volume(tmp_path / "keys", {
        "alpha": f"{KEY_A}\n",                                    # also in the config: more keys
        "beta": f"{hash_key(KEY_B)}\n\n{KEY_B2}\n",               # a hash and a key, one per line
    })
    assert read_keys_dir(keys_dir) == {"alpha": [hash_key(KEY_A)], "beta": [hash_key(KEY_B), hash_key(KEY_B2)]}
    registry = TenantRegistry.from_config(config(alpha={"weight": 2}), keys_dir=keys_dir)
    assert registry.authenticate(f"Bearer {KEY_A}").weight == 2
    assert registry.authenticate(f"Bearer {KEY_B}").name == "beta"
    assert registry.authenticate(f"Bearer {KEY_B2}").name == "beta"
    beta = registry.authenticate(f"Bearer {KEY_B2}")
    assert beta.weight == 1 and beta.limits.requests_per_minute is None   # only in the Secret: defaults


def test_the_keys_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_API_KEYS_DIR", str(secret_volume(tmp_path / "keys", {"beta": KEY_B})))
    registry = TenantRegistry.from_config(ClusterConfig())
    assert not registry.open and registry.authenticate(f"Bearer {KEY_B}").name == "beta"
    with pytest.raises(APIError):
        registry.authenticate(None)


@pytest.mark.parametrize("entries, message", [
    ({"bad name": "k"}, "is not a tenant name"),
    ({"beta": "\n \n"}, "holds no key"),
    ({"beta": "sha256:abc\n"}, "line 1: a 'sha256:' line must be"),
])
def test_bad_key_files_name_the_file_never_the_key(tmp_path, entries, message):
    with pytest.raises(ValueError, match=message) as caught:
        read_keys_dir(secret_volume(tmp_path / "keys", entries))
    assert str(tmp_path) in str(caught.value)


def test_a_missing_keys_dir_and_a_shared_key_are_errors(tmp_path):
    with pytest.raises(ValueError, match="EXPERTMESH_API_KEYS_DIR.*not a directory"):
        TenantRegistry.from_config(ClusterConfig(), keys_dir=tmp_path / "absent")
    keys_dir = secret_volume(tmp_path / "keys", {"beta": KEY_A})
    with pytest.raises(ValueError, match="tenants 'alpha' and 'beta' share an API key") as caught:
        TenantRegistry.from_config(config(alpha={"api_keys": [hash_key(KEY_A)]}), keys_dir=keys_dir)
    assert KEY_A not in str(caught.value)


def test_no_tenants_is_an_open_service_that_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="deployments.tenants"):
        registry = TenantRegistry.from_config(ClusterConfig.embedded_default(), keys_dir="")
    assert registry.open
    assert registry.authenticate(None) is ANONYMOUS and registry.authenticate("Bearer anything") is ANONYMOUS
    assert any("the API is OPEN" in r.getMessage() for r in caplog.records)


def test_a_tenant_without_a_key_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="deployments.tenants"):
        registry = TenantRegistry.from_config(config(alpha={"api_keys": [hash_key(KEY_A)]}, nokey={}), keys_dir="")
    assert not registry.open
    assert [r.getMessage() for r in caplog.records] == [
        "tenant 'nokey' has no API key (config tenants.nokey.api_keys or a key file): no request can use it"]


def test_hash_key_cli_prints_what_the_config_takes():
    def cli(*args, stdin):
        return subprocess.run([sys.executable, "-m", "cluster.cli", "hash-key", *args], input=stdin, cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})

    done = cli(stdin=KEY_A + "\n")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line == "sha256:" + hashlib.sha256(KEY_A.encode()).hexdigest()
    registry = TenantRegistry.from_config(config(alpha={"api_keys": [line]}), keys_dir="")
    assert registry.authenticate(f"Bearer {KEY_A}").name == "alpha"

    fresh = cli("--new", stdin="")
    key, hashed = (row.split(":", 1)[1].strip() for row in fresh.stdout.splitlines())
    assert hashed == hash_key(key) and len(key) > 40

    two = cli(stdin="a\nb\n")
    assert two.returncode == 2 and "one API key on one line" in two.stderr and "a\n" not in two.stderr


# -- the shared limit counters (the LimitCounters actor's logic) -----------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admit(counters, tenant="t", tokens=10, **limits):
    return asyncio.run(counters.admit(tenant, limits, tokens))


def test_requests_per_minute_is_a_sliding_window_with_retry_after():
    clock = Clock()
    counters = LimitCounters(clock=clock)
    for _ in range(3):
        assert "lease" in admit(counters, requests_per_minute=3)
        clock.now += 10
    refused = admit(counters, requests_per_minute=3)
    assert refused["limit"] == "requests_per_minute" and "3 requests per minute" in refused["message"]
    assert refused["retry_after_s"] == 30                 # the first admission leaves the window at +60
    assert "lease" in admit(counters, tenant="other", requests_per_minute=3)    # per tenant
    clock.now += 30
    assert "lease" in admit(counters, requests_per_minute=3)


def test_tokens_per_minute_reserves_max_tokens_then_charges_what_was_used():
    clock = Clock()
    counters = LimitCounters(clock=clock)
    first = admit(counters, tokens=60, tokens_per_minute=100)["lease"]
    refused = admit(counters, tokens=60, tokens_per_minute=100)
    assert refused["limit"] == "tokens_per_minute" and refused["retry_after_s"] == 60
    asyncio.run(counters.release(first, used_tokens=25))        # it stopped early: 35 tokens come back
    assert "lease" in admit(counters, tokens=60, tokens_per_minute=100)
    assert asyncio.run(counters.usage("t"))["tokens"] == 85
    too_large = admit(counters, tenant="u", tokens=101, tokens_per_minute=100)
    assert too_large["limit"] == "tokens_per_minute" and "Request too large" in too_large["message"]


def test_concurrent_streams_are_leases_that_lapse_when_their_replica_stops_renewing():
    clock = Clock()
    counters = LimitCounters(lease_ttl_s=30, clock=clock)
    kept = admit(counters, max_concurrent_streams=2)["lease"]
    lost = admit(counters, max_concurrent_streams=2)["lease"]
    refused = admit(counters, max_concurrent_streams=2)
    assert refused["limit"] == "max_concurrent_streams" and "2 requests in flight" in refused["message"]
    asyncio.run(counters.release(kept))
    kept = admit(counters, max_concurrent_streams=2)["lease"]
    # One replica keeps renewing its lease; the other died holding `lost`.
    for _ in range(3):
        clock.now += 20
        asyncio.run(counters.renew([kept]))
    assert asyncio.run(counters.usage("t"))["streams"] == 1
    assert "lease" in admit(counters, max_concurrent_streams=2)
    asyncio.run(counters.release(lost))                 # late news of a lapsed lease changes nothing
    assert asyncio.run(counters.usage("t"))["streams"] == 2


# -- weighted fair share in the engine ---------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoints.mixtral(tmp_path_factory.mktemp("mixtral"), seed=4)[0]


def make_engine(path, **overrides) -> Engine:
    settings = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=512, max_num_seqs=4,
                    max_num_batched_tokens=64, max_model_len=128, skip_tokenizer_init=True)
    settings.update(overrides)
    return Engine(path, EngineConfig(**settings))


def prompt(n, seed):
    return torch.randint(0, tiny_checkpoints.VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine) -> tuple[list[str], list[dict]]:
    """Step to the end: the order requests finished in, and the output tokens per tenant after each step."""
    finished, served, history = [], {}, []
    while engine.has_unfinished():
        for out in engine.step():
            tenant = engine_tenant(out.request_id)
            served[tenant] = served.get(tenant, 0) + len(out.token_ids)
            if out.finished:
                finished.append(out.request_id)
        history.append(dict(served))
    return finished, history


def engine_tenant(request_id: str) -> str:
    return request_id.split("-")[0]


PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_a_flood_does_not_starve_a_tenant_that_comes_after(checkpoint):
    engine = make_engine(checkpoint)
    for i in range(50):
        engine.add_request(prompt(4, i), PARAMS, request_id=f"a-{i}", tenant="a")
    for _ in range(3):                                   # a's flood is being served ...
        engine.step()
    for i in range(5):                                   # ... when b sends its 5
        engine.add_request(prompt(4, 100 + i), PARAMS, request_id=f"b-{i}", tenant="b")
    finished, _ = run(engine)
    last_b = max(finished.index(f"b-{i}") for i in range(5))
    a_after_b = [r for r in finished[last_b:] if r.startswith("a-")]
    assert len(a_after_b) >= 35, finished                 # first come, first served would leave none


def test_tokens_follow_the_weights_while_both_tenants_wait(checkpoint):
    engine = make_engine(checkpoint)
    for i in range(40):
        engine.add_request(prompt(4, i), PARAMS, request_id=f"a-{i}", tenant="a", weight=3)
        engine.add_request(prompt(4, 100 + i), PARAMS, request_id=f"b-{i}", tenant="b", weight=1)
    _, history = run(engine)
    start, end = history[10], history[60]                  # both still have requests waiting here
    a, b = end["a"] - start["a"], end["b"] - start["b"]
    assert 0.7 <= a / (a + b) <= 0.8, (a, b)


def test_one_tenant_is_first_come_first_served(checkpoint):
    engine = make_engine(checkpoint, max_num_seqs=2)
    ids = [engine.add_request(prompt(4, i), PARAMS, request_id=f"a-{i}", tenant="a") for i in range(8)]
    assert run(engine)[0] == ids


def test_preemption_and_the_prefix_cache_work_across_tenants(checkpoint):
    """A KV cache too small for everyone: sequences are preempted and recomputed (from the prefix
    cache where they can) and every request still gets the tokens of a run with room for all."""
    shared = prompt(12, 7)
    prompts = {f"{t}-{i}": shared + prompt(3, 10 * i + len(t)) for t in ("a", "bb") for i in range(4)}
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    reference = make_engine(checkpoint, enable_prefix_caching=False).generate(list(prompts.values()), long)
    alone = {rid: out.token_ids for rid, out in zip(prompts, reference)}
    engine = make_engine(checkpoint, num_kv_blocks=24, max_num_seqs=8, max_model_len=64)
    for rid, p in prompts.items():
        engine.add_request(p, long, request_id=rid, tenant=engine_tenant(rid), weight=2 if rid[0] == "a" else 1)
    tokens = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert engine.scheduler.num_preemptions > 0
    assert engine.prefix_cache_stats.hits > 0
    assert tokens == alone
