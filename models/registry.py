"""model_type (from config.json) -> family module. Adding a family touches models/ only."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from models import gpt_oss, mixtral, qwen3_moe
from models.base import ModelConfig
from models.checkpoint import CheckpointError, read_config

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (gpt_oss, qwen3_moe, mixtral)}


def family_of(model_type: str) -> ModuleType:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


def load_config(model_dir: str | Path) -> tuple[ModuleType, ModelConfig]:
    raw = read_config(model_dir)
    if "model_type" not in raw:
        raise CheckpointError(f"{model_dir}/config.json has no model_type field")
    family = family_of(raw["model_type"])
    return family, family.parse_config(raw)
