"""Expert parallelism: expert groups as real Ray actors on the session's Ray cluster, reached over
a real gloo process group or real gRPC channels. The answer must not change: greedy tokens equal
the in-process engine's, for every family, 2 and 4 groups, both transports, one request and eight
concurrent ones; a killed actor is restarted and every in-flight request still ends the same."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experts.assignment import assign_experts, describe, load_routing_counts
from router.async_engine import AsyncEngine, EngineDeadError
from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams
from tests import tiny_checkpoints

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
TINY = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=256, skip_tokenizer_init=True)
# Expert groups compute with as many threads as this process: MKL's kernels, and so the last bits of
# a matmul, depend on the thread count, and a 1e-6 difference can flip a near-tie greedy token.
SAME_THREADS = dict(expert_group_threads=torch.get_num_threads())


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 17, 3, 12, 7, 20, 4][:count]
    return [torch.randint(3, tiny_checkpoints.VOCAB, (n,), generator=g).tolist() for n in lengths]


def token_ids(results) -> list[list[int]]:
    return [r.token_ids for r in results]


@pytest.fixture(scope="module", params=["gpt_oss", "qwen3_moe"])
def tiny(request, tmp_path_factory):
    """A tiny checkpoint and what the in-process engine answers (the oracle)."""
    path, _ = tiny_checkpoints.FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    local = Engine(path, EngineConfig(**TINY))
    expected = {1: token_ids(local.generate(prompts(1), GREEDY)), 8: token_ids(local.generate(prompts(8), GREEDY))}
    return path, expected


@pytest.mark.parametrize("transport", ["collective", "grpc"])
@pytest.mark.parametrize("groups", [2, 4])
def test_tiny_models_answer_the_same_over_every_transport(ray_cluster, tiny, transport, groups):
    path, expected = tiny
    engine = Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=groups, transport=transport))
    try:
        assert len(engine.transport.actors) == groups
        assert token_ids(engine.generate(prompts(1), GREEDY)) == expected[1]
        assert token_ids(engine.generate(prompts(8), GREEDY)) == expected[8]
        stats = engine.transport.stats
        assert sum(stats.tokens_routed) > 0 and all(n > 0 for n in stats.tokens_routed)
        assert stats.latency_count > 0 and sum(stats.latency_buckets) == stats.latency_count
        assert all(value >= 1.0 for value in stats.mean_imbalance().values())
    finally:
        engine.close()


@pytest.fixture(scope="module")
def smollm2_expected(smollm2_checkpoint):
    """The default model in its default dtype (bf16 on CPUs with bf16 instructions, else fp32)."""
    local = Engine(smollm2_checkpoint, EngineConfig(device="cpu", num_kv_blocks=128, skip_tokenizer_init=True))
    ps = [p[:12] for p in prompts(8, seed=3)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    return ps, params, token_ids(local.generate(ps[:1], params)), token_ids(local.generate(ps, params))


@pytest.mark.parametrize("transport,groups", [("collective", 2), ("grpc", 2), ("collective", 4), ("grpc", 4)])
def test_smollm2_moe_answers_the_same_over_every_transport(ray_cluster, smollm2_checkpoint, smollm2_expected,
                                                          transport, groups):
    ps, params, one, eight = smollm2_expected
    engine = Engine(smollm2_checkpoint, EngineConfig(device="cpu", num_kv_blocks=128, skip_tokenizer_init=True,
                                                     **SAME_THREADS, expert_groups=groups, transport=transport))
    try:
        assert token_ids(engine.generate(ps[:1], params)) == one
        assert token_ids(engine.generate(ps, params)) == eight
    finally:
        engine.close()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path, _ = tiny_checkpoints.mixtral(tmp_path_factory.mktemp("mixtral"))
    local = Engine(path, EngineConfig(**TINY))
    return path, token_ids(local.generate(prompts(8), GREEDY))


def test_overlapped_micro_batches_answer_the_same(ray_cluster, mixtral):
    path, expected = mixtral
    engine = Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=2, transport="collective", overlap=True))
    try:
        assert token_ids(engine.generate(prompts(8), GREEDY)) == expected
    finally:
        engine.close()


def test_idle_expert_groups_stay_in_the_process_group(ray_cluster, mixtral):
    """Longer without traffic than the process group's timeout is not a failure."""
    import time

    path, expected = mixtral
    engine = Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=2, transport="collective",
                                       expert_group_timeout_s=2))
    try:
        assert token_ids(engine.generate(prompts(2), GREEDY)) == expected[:2]
        time.sleep(4)
        assert token_ids(engine.generate(prompts(2), GREEDY)) == expected[:2]
        assert engine.transport.stats.restarts == [0, 0] and engine.transport.generation == 1
    finally:
        engine.close()


async def _stream_all(engine: AsyncEngine, ps, params, on_token=None):
    async def one(i, p):
        tokens = []
        async for out in engine.generate(p, params):
            tokens += out.token_ids
            if on_token:
                on_token(i, len(tokens))
        return tokens
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)), return_exceptions=True)


@pytest.mark.parametrize("transport", ["collective", "grpc"])
def test_killed_expert_group_restarts_and_streams_finish_unchanged(ray_cluster, mixtral, transport):
    path, expected = mixtral
    engine = Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=2, transport=transport, expert_group_timeout_s=60))
    victim = engine.transport.actors[1]
    killed = []

    def kill_once(i, produced):
        if produced == 8 and not killed:       # mid-generation, with all 4 requests streaming
            killed.append(i)
            ray_cluster.kill(victim, no_restart=False)

    async_engine = AsyncEngine(engine)
    try:
        results = asyncio.run(_stream_all(async_engine, prompts(4), GREEDY, kill_once))
        assert killed
        assert results == expected[:4]
        assert engine.transport.stats.restarts == [0, 1]
    finally:
        async_engine.shutdown()
        engine.close()


def test_expert_group_that_does_not_come_back_fails_requests_clearly(ray_cluster, mixtral):
    path, _ = mixtral
    engine = Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=2, transport="collective", expert_group_timeout_s=10))
    victim = engine.transport.actors[0]

    def kill_for_good(i, produced):
        if produced == 4:
            ray_cluster.kill(victim, no_restart=True)

    async_engine = AsyncEngine(engine)
    try:
        results = asyncio.run(asyncio.wait_for(_stream_all(async_engine, prompts(4), GREEDY, kill_for_good), 60))
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "expert group 0" in str(results[0]) and "will not restart" in str(results[0])
    finally:
        async_engine.shutdown()
        engine.close()


def test_balanced_assignment_from_recorded_routing_counts(ray_cluster, mixtral, tmp_path):
    path, expected = mixtral
    recorder = Engine(path, EngineConfig(**TINY))
    recorder.generate(prompts(8), GREEDY)
    counts = recorder.routing_counts()
    routed = 2 * sum(len(p) + NEW_TOKENS - 1 for p in prompts(8))   # top-2, every token the model ran
    assert len(counts) == 3 and all(sum(layer) == routed for layer in counts)
    (tmp_path / "routing.json").write_text(json.dumps({"counts": counts}))

    engine = Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=2, transport="grpc", expert_assignment="balanced",
                                       routing_counts=str(tmp_path / "routing.json")))
    try:
        per_expert = [sum(column) for column in zip(*counts)]
        assert engine.transport.assignment == assign_experts(8, 2, "balanced", per_expert)
        assert token_ids(engine.generate(prompts(8), GREEDY)) == expected
    finally:
        engine.close()


def test_assignment_rules():
    assert assign_experts(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert assign_experts(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert describe(assign_experts(8, 2)) == "group 0: experts 0-3, group 1: experts 4-7"
    counts = [100, 90, 10, 10, 10, 10, 5, 5]            # contiguous: 210 vs 30
    groups = assign_experts(8, 2, "balanced", counts)
    loads = [sum(counts[e] for e in g) for g in groups]
    assert sorted(len(g) for g in groups) == [4, 4] and max(loads) - min(loads) <= 20
    with pytest.raises(ValueError, match="between 1 and the model's 8 experts"):
        assign_experts(8, 9)
    with pytest.raises(ValueError, match="routing counts"):
        assign_experts(8, 2, "balanced")
    with pytest.raises(ValueError, match="expert_assignment"):
        assign_experts(8, 2, "random")


def test_bad_routing_counts_file_is_named(tmp_path):
    (tmp_path / "counts.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="8 non-negative numbers"):
        load_routing_counts(tmp_path / "counts.json", 8)
    with pytest.raises(ValueError, match="cannot read routing counts"):
        load_routing_counts(tmp_path / "missing.json", 8)


def test_bad_transport_settings_are_rejected_before_any_actor_starts(mixtral):
    path, _ = mixtral
    with pytest.raises(ValueError, match="local transport runs every expert in this process"):
        Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=2, transport="local"))
    with pytest.raises(ValueError, match="transport must be one of"):
        Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=2, transport="carrier-pigeon"))


def test_expert_service_over_a_real_grpc_channel(ray_cluster, mixtral):
    """The internal ExpertService as a foreign client sees it: Info, Dispatch, and a clear error."""
    import grpc

    from experts.group import tensor_from_proto, tensor_to_proto
    from experts.bank import ExpertBank
    from models.registry import load_config
    from protos import expert_transport_pb2 as pb
    from protos import expert_transport_pb2_grpc as pb_grpc

    path, _ = mixtral
    engine = Engine(path, EngineConfig(**TINY, **SAME_THREADS, expert_groups=2, transport="grpc"))
    try:
        with grpc.insecure_channel(engine.transport.addresses[1]) as channel:
            stub = pb_grpc.ExpertServiceStub(channel)
            info = stub.Info(pb.InfoRequest(), timeout=10)
            assert (info.group, list(info.expert_ids)) == (1, [4, 5, 6, 7])

            hidden = torch.randn(3, 64)
            ids = torch.tensor([[4, 0], [1, 6], [7, 5]], dtype=torch.int32)
            reply = stub.Dispatch(pb.DispatchRequest(layer=1, hidden=tensor_to_proto(hidden),
                                                     expert_ids=tensor_to_proto(ids)), timeout=10)
            family, config = load_config(path)
            bank = ExpertBank.load(family, config, path, [4, 5, 6, 7])
            torch.testing.assert_close(tensor_from_proto(reply.outputs), bank.expert_outputs(1, hidden, ids.long()))

            with pytest.raises(grpc.RpcError) as error:
                stub.Dispatch(pb.DispatchRequest(layer=99, hidden=tensor_to_proto(hidden),
                                                 expert_ids=tensor_to_proto(ids)), timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layer 99" in error.value.details()
    finally:
        engine.close()


def test_generated_stubs_match_the_proto(tmp_path):
    """protos/*_pb2*.py are what grpcio-tools makes of the .proto files today."""
    root = Path(__file__).resolve().parents[1]
    for proto in sorted((root / "protos").glob("*.proto")):
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", str(proto.relative_to(root))], check=True, cwd=root)
        for generated in (tmp_path / "protos").glob(f"{proto.stem}_pb2*.py"):
            assert generated.read_text() == (root / "protos" / generated.name).read_text(), \
                f"protos/{generated.name} is stale: run `make protos`"


def test_cli_generate_with_expert_groups_equals_local(ray_cluster, tmp_path):
    """`expertmesh generate --expert-groups 2 --transport ...` joins the running cluster (RAY_ADDRESS)."""
    path, _ = tiny_checkpoints.gpt_oss(tmp_path / "gpt-oss")
    exe = str(Path(sys.executable).parent / "expertmesh")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    common = ["generate", "--model", str(path), "--prompt-token-ids", "5,6,7,8,9", "--max-tokens", "16",
              "--temperature", "0", "--dtype", "float32", "--json"]
    local = subprocess.run([exe, *common], capture_output=True, text=True, timeout=300)
    remote = subprocess.run([exe, *common, "--expert-groups", "2", "--transport", "grpc",
                             "--expert-group-threads", str(torch.get_num_threads())],
                            capture_output=True, text=True, env=env, timeout=300)
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    assert json.loads(remote.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]
    assert "group 0: experts 0-3, group 1: experts 4-7" in remote.stderr
