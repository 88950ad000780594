"""Reading the engine store: configs, per-split mappings and per-rank weight files.

Layout (TensorRT-LLM checkpoint layout, one checkpoint directory per split)::

    STORE/config.json              model architecture + dtype, and a "kunserve" section
                                   (format version, model fingerprint, source, splits)
    STORE/tokenizer/               tokenizer.json, tokenizer_config.json (chat template)
    STORE/pp{g}/config.json        the same architecture plus "mapping" (world_size,
                                   tp_size, pp_size, pp_partition, layer_ranges)
    STORE/pp{g}/rank{r}.safetensors  only rank r's weights; layers numbered locally
                                   (transformer.layers.0 is the stage's first layer)
    STORE/tp{t}pp{g}/...           a split with tensor parallelism t: rank r is pp rank
                                   r // t, tp rank r % t (TensorRT-LLM's order), and holds
                                   that rank's shard of its stage's layers
                                   (``engines/tensor_parallel.py``)
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from engines.config import ModelConfig
from engines.errors import StoreError
from engines.mapping import LayerRange, Mapping
from engines.tensor_parallel import shard_config
from engines.weights import (EMBEDDING, FINAL_NORM, LM_HEAD, LayerWeights, ModelWeights,
                             layer_prefix, release_freed_memory)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BUILD_HINT = "build one with: python -m build_scripts.build_engines --source ... --out DIR"


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, turning every failure into a StoreError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path} is corrupt: expected a JSON object")
    return data


def split_name(pp_size: int, tp_size: int = 1) -> str:
    """The directory of a split: ``pp{g}``, or ``tp{t}pp{g}`` with tensor parallelism."""
    return f"pp{pp_size}" if tp_size == 1 else f"tp{tp_size}pp{pp_size}"


class EngineStore:
    """An engine store on disk, validated on open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"engine directory {self.path} does not exist; {BUILD_HINT}")
        if not (self.path / "config.json").is_file():
            raise StoreError(f"{self.path} is not an engine store (no config.json); {BUILD_HINT}")
        top = read_json(self.path / "config.json")
        meta = top.get("kunserve")
        if not isinstance(meta, dict) or "model_fingerprint" not in meta:
            raise StoreError(f"{self.path}/config.json has no 'kunserve' section; {BUILD_HINT}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.path} has store format {meta.get('format_version')}, "
                             f"this version reads {FORMAT_VERSION}; rebuild the store")
        self.config = ModelConfig.from_json(top)
        self.fingerprint: str = meta["model_fingerprint"]
        self.source: str = meta.get("source", "?")
        self.shapes = sorted((int(m.group(1) or 1), int(m.group(2))) for p in self.path.iterdir()
                             if (m := re.fullmatch(r"(?:tp(\d+))?pp(\d+)", p.name)) and p.is_dir())
        """(tp, pp) of every split on disk."""
        self.splits = [pp for tp, pp in self.shapes if tp == 1]
        """Pipeline sizes of the splits without tensor parallelism."""

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def tp_splits(self, tp_size: int) -> list[int]:
        """Pipeline sizes built with tensor parallelism ``tp_size``."""
        return [pp for tp, pp in self.shapes if tp == tp_size]

    def mapping(self, pp_size: int, tp_size: int = 1) -> Mapping:
        """The mapping of split (``tp_size``, ``pp_size``), checked against this store's model."""
        split_dir = self.path / split_name(pp_size, tp_size)
        if (tp_size, pp_size) not in self.shapes:
            raise StoreError(f"{self.path} has no {split_name(pp_size, tp_size)} split (has: "
                             f"{', '.join(split_name(g, t) for t, g in self.shapes) or 'none'}); {BUILD_HINT}")
        cfg = read_json(split_dir / "config.json")
        fp = (cfg.get("kunserve") or {}).get("model_fingerprint")
        if fp != self.fingerprint:
            raise StoreError(f"{split_dir} was built for another model (fingerprint {fp}, "
                             f"store is {self.fingerprint}); rebuild the store")
        if "mapping" not in cfg:
            raise StoreError(f"{split_dir}/config.json has no mapping")
        mapping = Mapping.from_json(cfg["mapping"], self.config.num_hidden_layers)
        if mapping.tp_size != tp_size:
            raise StoreError(f"{split_dir}/config.json says tp_size {mapping.tp_size}, its name {tp_size}")
        return mapping

    def load_rank(self, pp_size: int, rank: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None, tp_size: int = 1) -> tuple[ModelWeights, LayerRange]:
        """Load rank ``rank`` of split (``tp_size``, ``pp_size``): its stage's layers (its
        shard of them under tensor parallelism: the weights' ``cfg`` is then the shard's)
        and, on the first or last stage, the embedding or the final norm and head."""
        mapping = self.mapping(pp_size, tp_size)
        layers = mapping.layer_range(mapping.pp_rank(rank))
        dtype = dtype or self.config.torch_dtype
        weights = ModelWeights(shard_config(self.config, tp_size), torch.device(device), dtype)
        path = self._rank_file(pp_size, rank, tp_size)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                self._check_rank_metadata(path, f.metadata() or {}, layers, tp_size, mapping.tp_rank(rank))
                self._load_tensors(path, f, layers, weights)
        except SafetensorError as exc:
            raise StoreError(f"{path} is corrupt: {exc}") from None
        if (self.config.tie_word_embeddings and weights.embedding is not None
                and weights.lm_head is not None):
            weights.lm_head = weights.embedding  # one copy in memory when tied
        release_freed_memory(weights.device)  # the file's staging copies, so RSS = weights
        return weights, layers

    def _rank_file(self, pp_size: int, rank: int, tp_size: int = 1) -> Path:
        path = self.path / split_name(pp_size, tp_size) / f"rank{rank}.safetensors"
        if not path.is_file():
            raise StoreError(f"{path} is missing; {BUILD_HINT}")
        return path

    def _check_rank_metadata(self, path: Path, meta: dict[str, str], layers: LayerRange, tp_size: int = 1,
                             tp_rank: int = 0) -> None:
        if meta.get("model_fingerprint") != self.fingerprint:
            raise StoreError(f"{path} was built for another model (fingerprint "
                             f"{meta.get('model_fingerprint')}, store is {self.fingerprint}); "
                             "rebuild the store")
        shard = (meta.get("tp_size", "1"), meta.get("tp_rank", "0"))
        if shard != (str(tp_size), str(tp_rank)):
            raise StoreError(f"{path} holds tp shard {shard[1]} of {shard[0]}, the mapping says {tp_rank} of {tp_size}")
        held = (meta.get("layer_start"), meta.get("layer_end"))
        if held != (str(layers.start), str(layers.end)):
            raise StoreError(f"{path} holds layers {held[0]}-{held[1]}, the mapping says {layers}")

    def _load_tensors(self, path: Path, f, layers: LayerRange, weights: ModelWeights) -> None:
        keys = set(f.keys())
        dev, dtype = weights.device, weights.dtype
        for name in keys & {EMBEDDING, FINAL_NORM, LM_HEAD}:
            # A copy: get_tensor may return a view of the mapped file, which would keep the
            # whole file resident for as long as the tensor lives.
            tensor = f.get_tensor(name).to(device=dev, dtype=dtype, copy=True)
            setattr(weights, {EMBEDDING: "embedding", FINAL_NORM: "final_norm", LM_HEAD: "lm_head"}[name], tensor)
        for local, layer_id in enumerate(layers):
            prefix = layer_prefix(local)
            names = [k for k in keys if k.startswith(prefix)]
            if not names:
                raise StoreError(f"{path} lacks layer {layer_id} ({prefix}*)")
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in names}
            weights.layers[layer_id] = LayerWeights.from_tensors(weights.cfg, tensors, dtype, dev)
