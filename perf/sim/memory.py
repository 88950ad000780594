"""What one device of a simulated instance holds: weights, workspace and KV pages.

The figures follow the engine's own rules, so the simulated pools are the ones ``serve``
would make: a device holds its TP shard of every layer of its stage (``LayerWeights``'s
buffer), the embedding, final norm and LM head (replicated over a TP set, never dropped),
a workspace of 5% of its memory (``RankEngine``'s default), and KV pages of one layer's
``page_size`` tokens (``KVPool.page_nbytes``) in the rest. A stage of a group fused from
replicas keeps its pages and adds the bytes of the layers it dropped (the KV extension).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.config import ModelConfig
from engines.kv_cache import KVPool
from engines.tensor_parallel import shard_config
from engines.weights import LayerWeights
from orchestrator.kunserve.planner import ModelMemory

WORKSPACE_FRACTION = 0.05
"""``RankEngine``'s default: the part of the device memory kept for activations."""


@dataclass(frozen=True)
class MemoryLayout:
    """One device's memory, per TP shard; an instance rank is a TP set of ``tp`` such devices."""

    num_layers: int
    tp: int
    device_bytes: int
    layer_weight_bytes: int
    """One decoder layer's shard on one device."""
    fixed_weight_bytes: int
    """Embedding, final norm and LM head on one device (replicated over the TP set)."""
    page_bytes: int
    """One layer's page of ``page_size`` tokens, one device's KV heads."""
    page_size: int
    splits: tuple[int, ...]
    """Pipeline sizes the engines were built for (a group's size must be one)."""
    workspace_fraction: float = WORKSPACE_FRACTION

    @classmethod
    def for_model(cls, m: ModelConfig, dtype: torch.dtype, device_bytes: int, page_size: int,
                  splits: tuple[int, ...], tp: int = 1) -> "MemoryLayout":
        shard = shard_config(m, tp)
        item = torch.empty((), dtype=dtype).element_size()
        fixed = (m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2) + m.hidden_size) * item
        layout = cls(m.num_hidden_layers, tp, device_bytes, LayerWeights.buffer_numel(shard) * item, fixed,
                     KVPool.page_nbytes(shard, page_size, dtype), page_size, tuple(splits))
        if layout.replica_pages() < m.num_hidden_layers:
            raise ValueError(f"{m.num_hidden_layers} layers of weights ({layout.weight_bytes() / 2**30:.1f} GiB "
                             f"per device at tp {tp}) leave no KV in {device_bytes / 2**30:.1f} GiB")
        return layout

    @property
    def workspace_bytes(self) -> int:
        return int(self.device_bytes * self.workspace_fraction)

    def weight_bytes(self, layers: int | None = None) -> int:
        """Weight bytes of a device holding ``layers`` decoder layers (None: all)."""
        n = self.num_layers if layers is None else layers
        return self.fixed_weight_bytes + n * self.layer_weight_bytes

    def replica_pages(self) -> int:
        """KV pages of a device holding every layer (a replica's pool, ``RankEngine``'s plan)."""
        return (self.device_bytes - self.weight_bytes() - self.workspace_bytes) // self.page_bytes

    def stage_pages(self, layers: int) -> int:
        """KV pages of a stage holding ``layers`` layers after a drop: its pool plus the freed weights."""
        return self.replica_pages() + (self.num_layers - layers) * self.layer_weight_bytes // self.page_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """One token's K and V over every layer, on one device."""
        return self.page_bytes // self.page_size * self.num_layers

    def model_memory(self) -> ModelMemory:
        """The figures the kunserve policy's planner reads (as ``serve`` builds them)."""
        return ModelMemory(self.num_layers, self.kv_bytes_per_token, self.layer_weight_bytes,
                           self.replica_pages() * self.page_bytes, self.splits)
