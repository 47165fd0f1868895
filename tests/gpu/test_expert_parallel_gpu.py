"""Expert groups on GPUs over NCCL: one GPU for the router, one per group.

Skipped without 3 CUDA devices (NCCL needs a distinct device per rank). Run on a
multi-GPU machine with `pytest tests/gpu`.
"""
from __future__ import annotations

import pytest
import torch

from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams
from tests import tiny_checkpoints

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 3,
                                reason="needs 3 CUDA devices: the router and two expert groups")


@pytest.mark.parametrize("transport", ["collective", "grpc"])
def test_two_gpu_expert_groups_answer_like_the_local_engine(ray_cluster, tmp_path, transport):
    path, _ = tiny_checkpoints.mixtral(tmp_path / "mixtral")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, tiny_checkpoints.VOCAB, (n,), generator=g).tolist() for n in (5, 9, 17, 3)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    base = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=64, skip_tokenizer_init=True)
    expected = [r.token_ids for r in Engine(path, EngineConfig(**base)).generate(prompts, params)]
    engine = Engine(path, EngineConfig(**base, expert_groups=2, transport=transport))
    try:
        if transport == "collective":
            assert engine.transport.backend == "nccl"
        assert [r.token_ids for r in engine.generate(prompts, params)] == expected
    finally:
        engine.close()
