"""Writing an engine store: one TensorRT-LLM checkpoint directory per pipeline split."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from build_scripts.convert import convert_embedding, convert_head, convert_layer
from build_scripts.sources import SourceModel
from engines.config import ModelConfig
from engines.errors import StoreError
from engines.mapping import Mapping, pp_partition
from engines.store import FORMAT_VERSION, read_json, split_name
from engines.tensor_parallel import TpShard, check_tp, shard_layer
from engines.weights import EMBEDDING, layer_prefix

logger = logging.getLogger(__name__)


def model_fingerprint(source: SourceModel) -> str:
    """Identity of a model: its architecture and the bytes of its embedding and first layer."""
    h = hashlib.sha256(json.dumps({**source.config.to_json(), "dtype": None}, sort_keys=True).encode())
    dtype = source.config.torch_dtype
    tensors = [convert_embedding(source.get_tensor, dtype),
               *convert_layer(source.config, source.get_tensor, 0, dtype).values()]
    for t in tensors:
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def check_splits(cfg: ModelConfig, splits: list[int], tp_sizes: list[int] = (1,)) -> None:
    """Refuse splits the model cannot take, with the reason."""
    for tp in tp_sizes:
        try:
            check_tp(cfg, tp)
        except StoreError as exc:
            raise StoreError(f"cannot build tp{tp}: {exc}") from None
    for g in splits:
        try:
            pp_partition(cfg.num_hidden_layers, g)
        except ValueError as exc:
            raise StoreError(f"cannot build pp{g}: {exc}") from None


def check_overwrite(out: Path, fingerprint: str) -> None:
    """Refuse to write over a store (or any non-empty directory) of a different model."""
    if not out.exists() or not any(out.iterdir()):
        return
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise StoreError(f"{out} exists and is not an engine store; refusing to write into it")
    old = (read_json(cfg_path).get("kunserve") or {}).get("model_fingerprint")
    if old != fingerprint:
        raise StoreError(f"{out} holds a store of a different model (fingerprint {old}, "
                         f"this model is {fingerprint}); choose another --out or delete it")


def write_store(source: SourceModel, out: Path, splits: list[int], progress: bool = True,
                tp_sizes: list[int] = (1,)) -> None:
    """Convert ``source`` into ``out`` for every tensor-parallel size in ``tp_sizes`` and
    pipeline size in ``splits``."""
    cfg = source.config
    check_splits(cfg, splits, tp_sizes)
    fingerprint = model_fingerprint(source)
    check_overwrite(out, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "model_fingerprint": fingerprint, "source": source.name}
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    source.save_tokenizer(tok_dir)
    total = sum(tp * (cfg.num_hidden_layers + 2 * g) for g in splits for tp in tp_sizes)
    with tqdm(total=total, desc=f"building {out.name}", unit="tensor", disable=not progress) as bar:
        for tp in tp_sizes:
            for g in splits:
                _write_split(source, out, Mapping(pp_size=g, num_layers=cfg.num_hidden_layers, tp_size=tp),
                             {**meta, "pp_size": g, "tp_size": tp}, bar)
    shapes = sorted({*((tp, g) for tp in tp_sizes for g in splits), *_existing_shapes(out)})
    top = {**cfg.to_json(), "kunserve": {**meta, "splits": [g for tp, g in shapes if tp == 1],
                                         "shapes": [list(s) for s in shapes]}}
    _atomic_write_json(out / "config.json", top)
    logger.info("wrote %s: splits %s, model %s", out, [split_name(g, t) for t, g in shapes], fingerprint)


def _existing_shapes(out: Path) -> list[tuple[int, int]]:
    return [(int(m.group(1) or 1), int(m.group(2))) for p in out.iterdir()
            if (m := re.fullmatch(r"(?:tp(\d+))?pp(\d+)", p.name)) and p.is_dir()]


def _write_split(source: SourceModel, out: Path, mapping: Mapping, meta: dict, bar: tqdm) -> None:
    cfg, dtype = source.config, source.config.torch_dtype
    name = split_name(mapping.pp_size, mapping.tp_size)
    split_dir = out / name
    tmp_dir = out / f".{name}.partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    for rank in range(mapping.world_size):
        pp_rank, shard = mapping.pp_rank(rank), TpShard(mapping.tp_size, mapping.tp_rank(rank))
        layers = mapping.layer_range(pp_rank)
        tensors: dict[str, torch.Tensor] = {}
        if pp_rank == 0:
            tensors[EMBEDDING] = convert_embedding(source.get_tensor, dtype)
        for local, layer in enumerate(layers):
            full = convert_layer(cfg, source.get_tensor, layer, dtype)
            for tensor_name, t in shard_layer(cfg, full, shard).items():
                tensors[layer_prefix(local) + tensor_name] = t
            bar.update(1)
        if pp_rank == mapping.pp_size - 1:
            tensors.update(convert_head(cfg, source.get_tensor, dtype))
        file_meta = {"model_fingerprint": meta["model_fingerprint"], "pp_size": str(mapping.pp_size),
                     "pp_rank": str(pp_rank), "tp_size": str(shard.size), "tp_rank": str(shard.rank),
                     "layer_start": str(layers.start), "layer_end": str(layers.end)}
        save_file(tensors, str(tmp_dir / f"rank{rank}.safetensors"), metadata=file_meta)
        bar.update(2)
    _atomic_write_json(tmp_dir / "config.json", {**cfg.to_json(), "mapping": mapping.to_json(),
                                                 "kunserve": meta})
    # Swap the finished split in, so an interrupted build never leaves a half-written split.
    if split_dir.exists():
        shutil.rmtree(split_dir)
    os.replace(tmp_dir, split_dir)


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
