"""Lazy, per-tensor reads of Hugging Face checkpoint directories.

A checkpoint is `config.json` plus either `model.safetensors` or shards listed
in `model.safetensors.index.json`. Nothing is read until a tensor is asked
for, and a slice along the first dimension (one expert of a fused [E, ...]
tensor) reads only that slice, so an expert group loads only its own experts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """The checkpoint does not match what the model family expects."""


class CheckpointReader:
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index_file = self.model_dir / "model.safetensors.index.json"
        single_file = self.model_dir / "model.safetensors"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            self._file_of = {name: self.model_dir / shard for name, shard in weight_map.items()}
        elif single_file.exists():
            with safe_open(single_file, "pt") as f:
                self._file_of = {name: single_file for name in f.keys()}
        else:
            raise CheckpointError(
                f"{self.model_dir}: no model.safetensors or model.safetensors.index.json found"
            )
        self._handles: dict[Path, object] = {}

    def _handle(self, name: str):
        try:
            path = self._file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint") from None
        if path not in self._handles:
            if not path.exists():
                raise CheckpointError(f"{self.model_dir}: shard {path.name} (holding {name!r}) is missing")
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...] | None = None, *, index: int | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read tensor `name` (only row `index` of its first dimension when given).

        `shape` is the expected shape of the whole tensor; a mismatch is an
        error naming the tensor, both shapes and the checkpoint.
        """
        full_shape = self.shape(name)
        if shape is not None and tuple(full_shape) != tuple(shape):
            raise CheckpointError(
                f"{self.model_dir}: tensor {name!r} has shape {list(full_shape)}, expected {list(shape)}"
            )
        handle = self._handle(name)
        tensor = handle.get_slice(name)[index] if index is not None else handle.get_tensor(name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: config.json is missing (is this a Hugging Face checkpoint directory?)")
    return json.loads(path.read_text())
