"""Tensor parallelism, Megatron-style: which slice of each weight a TP rank holds.

Attention is split by heads. The fused QKV projection is column-parallel: a rank holds the
rows of its query heads and of its KV heads (Q, K and V stay fused, in that order). The
attention output projection is row-parallel: the columns of its query heads. The SwiGLU
input projections (``mlp.fc``, ``mlp.gate``) are column-parallel, and the down projection
(``mlp.proj``) row-parallel, each by a contiguous chunk of the intermediate size. The two
row-parallel outputs are partial sums that an all-reduce adds up (``StageRunner``). The
norms, the embedding and the LM head are replicated: every rank embeds and samples alike.

When ``tp`` exceeds the KV heads, each KV head is replicated over ``tp / kv_heads`` ranks,
as vLLM does: rank r holds KV head ``r // (tp / kv_heads)``, the one its query heads use.
A rank's KV pool holds its KV heads only; page ids are the same on every rank of the set.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import torch

from engines.config import ModelConfig
from engines.errors import StoreError


@dataclass(frozen=True)
class TpShard:
    """One rank of a tensor-parallel set."""

    size: int
    rank: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tp rank {self.rank} out of range for tp size {self.size}")


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Refuse a TP size the model's heads or MLP cannot be split into, naming the counts."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if tp < 1:
        raise StoreError(f"tp size must be >= 1, got {tp}")
    if heads % tp:
        raise StoreError(f"tp {tp} does not divide the {heads} attention heads")
    if kv % tp and tp % kv:
        raise StoreError(f"tp {tp} neither divides the {kv} KV heads nor is a multiple of them "
                         "(KV heads are split, or replicated when tp exceeds them)")
    if cfg.intermediate_size % tp:
        raise StoreError(f"tp {tp} does not divide the MLP's intermediate size {cfg.intermediate_size}")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The architecture one TP rank computes: its heads and its slice of the MLP."""
    check_tp(cfg, tp)
    if tp == 1:
        return cfg
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp,
                               num_key_value_heads=max(1, cfg.num_key_value_heads // tp),
                               intermediate_size=cfg.intermediate_size // tp)


def _heads(cfg: ModelConfig, shard: TpShard) -> tuple[range, range]:
    """(query heads, KV heads) of ``shard`` in the full model's numbering."""
    q_per = cfg.num_attention_heads // shard.size
    kv = cfg.num_key_value_heads
    if kv >= shard.size:
        kv_per = kv // shard.size
        kv_heads = range(shard.rank * kv_per, (shard.rank + 1) * kv_per)
    else:
        kv_heads = range(shard.rank // (shard.size // kv), shard.rank // (shard.size // kv) + 1)
    return range(shard.rank * q_per, (shard.rank + 1) * q_per), kv_heads


def _rows(t: torch.Tensor, heads: range, head_size: int, offset: int = 0) -> torch.Tensor:
    return t[offset + heads.start * head_size:offset + heads.stop * head_size]


def shard_layer(cfg: ModelConfig, tensors: dict[str, torch.Tensor], shard: TpShard) -> dict[str, torch.Tensor]:
    """A decoder layer's tensors (TensorRT-LLM names, no layer prefix) cut to ``shard``'s slice."""
    if shard.size == 1:
        return dict(tensors)
    check_tp(cfg, shard.size)
    q_heads, kv_heads = _heads(cfg, shard)
    d, inter = cfg.head_size, cfg.intermediate_size // shard.size
    chunk = slice(shard.rank * inter, (shard.rank + 1) * inter)

    def qkv(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([_rows(t, q_heads, d), _rows(t, kv_heads, d, cfg.q_size),
                          _rows(t, kv_heads, d, cfg.q_size + cfg.kv_size)])

    out = dict(tensors)
    out["attention.qkv.weight"] = qkv(tensors["attention.qkv.weight"])
    if "attention.qkv.bias" in tensors:
        out["attention.qkv.bias"] = qkv(tensors["attention.qkv.bias"])
    out["attention.dense.weight"] = tensors["attention.dense.weight"][:, q_heads.start * d:q_heads.stop * d]
    out["mlp.fc.weight"] = tensors["mlp.fc.weight"][chunk]
    out["mlp.gate.weight"] = tensors["mlp.gate.weight"][chunk]
    out["mlp.proj.weight"] = tensors["mlp.proj.weight"][:, chunk]
    return {k: v.contiguous() for k, v in out.items()}


class ThreadGroup:
    """An all-reduce over the TP ranks of one process, each run by its own thread.

    Every member sums the same tensors in rank order, so all hold bit-identical results,
    as the ranks of a real collective do; the second barrier keeps a fast member from
    posting its next tensor before the slow ones have read this one.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: list[torch.Tensor | None] = [None] * size
        self._barrier = threading.Barrier(size)

    def abort(self) -> None:
        """A member failed: the others, waiting in an all-reduce, raise instead of hanging."""
        self._barrier.abort()

    def member(self, rank: int):
        """The in-place all-reduce of rank ``rank``."""
        def all_reduce(t: torch.Tensor) -> None:
            self._slots[rank] = t
            self._barrier.wait()
            total = self._slots[0].clone()
            for other in self._slots[1:]:
                total += other
            self._barrier.wait()
            t.copy_(total)
        return all_reduce
