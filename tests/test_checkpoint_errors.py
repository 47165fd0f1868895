"""A broken checkpoint fails at load with an error naming the tensor or field."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError
from tests import tiny_checkpoints
from tests.test_models import engine_for


@pytest.fixture
def checkpoint(tmp_path):
    path, _ = tiny_checkpoints.mixtral(tmp_path / "mixtral")
    return path


def test_missing_tensor_is_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        engine_for(checkpoint)


def test_wrong_shape_is_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    tensors[name] = tensors[name][:, :10].contiguous()
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}.*shape \[64, 10\], expected \[64, 96\]"):
        engine_for(checkpoint)


def test_unknown_model_type_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "llama4"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'llama4' is not supported"):
        engine_for(checkpoint)


def test_missing_config_field_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["num_local_experts"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_local_experts"):
        engine_for(checkpoint)


def test_sharded_checkpoint_loads(tmp_path):
    path, model = tiny_checkpoints.qwen3_moe(tmp_path / "q")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    engine = engine_for(tmp_path / "sharded")
    assert engine.model_config.model_type == "qwen3_moe"
