"""Hugging Face model directories: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from build_scripts.sources import SourceModel
from engines.config import ModelConfig
from engines.errors import StoreError
from engines.store import read_json


def _tensor_index(directory: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor (single file or sharded index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        return {name: directory / fname for name, fname in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise StoreError(f"{directory} has no *.safetensors weights (PyTorch .bin is not read)")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: f for k in sf.keys()})
    return out


def open_hf_dir(directory: Path, dtype: str = "float32") -> SourceModel:
    """Open a Hugging Face checkpoint directory of a Llama or Qwen2 model."""
    hf_cfg = read_json(directory / "config.json")
    config = ModelConfig.from_hf_config(hf_cfg, dtype=dtype)
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():  # generation_config's EOS list is the one generation honours
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        if eos is not None:
            ids = tuple(eos) if isinstance(eos, list) else (eos,)
            config = ModelConfig.from_json({**config.to_json(), "eos_token_ids": list(ids)})
    index = _tensor_index(directory)

    def get_tensor(name: str) -> torch.Tensor:
        if name not in index:
            raise StoreError(f"{directory} lacks tensor {name}")
        with safe_open(str(index[name]), framework="pt") as sf:
            return sf.get_tensor(name)

    def save_tokenizer(out: Path) -> None:
        from transformers import AutoTokenizer  # build-time dependency only

        tok = AutoTokenizer.from_pretrained(str(directory))
        tok.save_pretrained(str(out))

    return SourceModel(name=str(directory.resolve()), config=config, get_tensor=get_tensor,
                       save_tokenizer=save_tokenizer)
