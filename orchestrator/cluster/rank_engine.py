"""One rank's device: resident weights, its KV pool, and runners for every role it can take.

Every rank loads the full-replica (pp1) weights once. The stages of the store's other
splits are runners over the same weight tensors with another layer range, so switching a
rank from replica to stage i of a g-group is choosing a runner: no rebuild, no reload.
The KV pool takes what the device-memory budget leaves after the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engines.errors import EngineError
from engines.kv_cache import KVPool
from engines.mapping import LayerRange
from engines.runner import StageRunner
from engines.store import EngineStore
from engines.weights import LayerWeights

logger = logging.getLogger(__name__)


def resident_bytes() -> int:
    """The process's resident memory (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@dataclass(frozen=True)
class MemoryPlan:
    """How a rank's device-memory budget is split."""

    device_memory: int
    weight_bytes: int
    workspace_bytes: int
    """Kept free for activations and scratch."""
    kv_pages: int
    page_bytes: int

    @property
    def kv_bytes(self) -> int:
        return self.kv_pages * self.page_bytes


@dataclass(frozen=True)
class DropMeasure:
    """What a drop did to memory, measured (resident sizes from the OS on CPU)."""

    weights_freed: int
    resident_fall: int
    """Resident memory released by freeing the weights."""
    kv_added: int
    resident_rise: int
    """Resident memory taken by committing the new KV pages."""


class RankEngine:
    """The weights, KV pool and stage runners of one rank."""

    def __init__(self, store: EngineStore, device: torch.device, dtype: torch.dtype | None,
                 device_memory: int, page_size: int, workspace_fraction: float = 0.05,
                 kv_pages: int | None = None) -> None:
        """``kv_pages`` overrides the budget's pool (the oracle): a lazy pool whose pages take
        memory only once written."""
        self.store = store
        self.cfg = store.config
        self.baseline_resident = resident_bytes() if device.type == "cpu" else 0
        self.weights, _ = store.load_rank(1, 0, device=device, dtype=dtype)
        self.plan = self._plan(device_memory, page_size, workspace_fraction)
        if kv_pages is not None:
            self.plan = MemoryPlan(device_memory, self.plan.weight_bytes, self.plan.workspace_bytes,
                                   kv_pages, self.plan.page_bytes)
        # Reserve room for the most KV this rank can ever get: its pool plus the weights it
        # would free as the smallest stage of the store's largest split.
        extra = (self.weights.resident_bytes() - self._min_kept_bytes()) // self.plan.page_bytes
        self.kv = KVPool(self.cfg, self.plan.kv_pages, page_size, self.weights.dtype, device,
                         max_pages=self.plan.kv_pages + extra, lazy=kv_pages is not None)
        self.held = LayerRange(0, self.cfg.num_hidden_layers)
        """The layers whose weights are resident (all of them unless dropped)."""
        self.last_drop: DropMeasure | None = None
        # Every role of every split the store holds, prepared up front.
        self.runners: dict[tuple[int, int], StageRunner] = {}
        for g in store.splits:
            mapping = store.mapping(g)
            for stage in range(g):
                r = mapping.layer_range(stage)
                self.runners[(r.start, r.end)] = StageRunner(self.cfg, self.weights, r, self.kv)
        logger.info("rank engine: %.1f MiB weights, %d KV pages (%.1f MiB), roles for splits %s",
                    self.plan.weight_bytes / 2**20, self.plan.kv_pages, self.plan.kv_bytes / 2**20,
                    store.splits)

    def _plan(self, device_memory: int, page_size: int, workspace_fraction: float) -> MemoryPlan:
        weight_bytes = self.weights.resident_bytes()
        page_bytes = KVPool.page_nbytes(self.cfg, page_size, self.weights.dtype)
        workspace = int(device_memory * workspace_fraction)
        kv_pages = (device_memory - weight_bytes - workspace) // page_bytes
        if kv_pages < self.cfg.num_hidden_layers:
            raise EngineError(
                f"--device-memory {device_memory / 2**20:.0f} MiB leaves no room for KV: the weights "
                f"take {weight_bytes / 2**20:.0f} MiB and {workspace / 2**20:.0f} MiB is kept for "
                f"activations; give at least {(weight_bytes + workspace) / 2**20 + 32:.0f} MiB")
        return MemoryPlan(device_memory, weight_bytes, workspace, kv_pages, page_bytes)

    def stage_weight_bytes(self, layers: LayerRange) -> int:
        """Bytes a rank keeps as the stage running ``layers``: its layers, plus the embedding
        on the first stage and the final norm and head on the last (the tied head is the
        embedding)."""
        w, cfg = self.weights, self.cfg
        first, last = layers.start == 0, layers.end == cfg.num_hidden_layers
        per_layer = LayerWeights.buffer_numel(cfg) * w.dtype.itemsize
        emb = cfg.vocab_size * cfg.hidden_size * w.dtype.itemsize
        total = len(layers) * per_layer
        if first or (last and cfg.tie_word_embeddings):
            total += emb
        if last:
            total += cfg.hidden_size * w.dtype.itemsize + (0 if cfg.tie_word_embeddings else emb)
        return total

    def _min_kept_bytes(self) -> int:
        sizes = [self.stage_weight_bytes(self.store.mapping(g).layer_range(s))
                 for g in self.store.splits for s in range(g)]
        return min(sizes)

    def drop_to(self, layers: LayerRange) -> int:
        """Keep only what stage ``layers`` needs; the freed bytes become KV pages at once.

        Returns the number of pages the pool grew by.
        """
        if self.held != LayerRange(0, self.cfg.num_hidden_layers):
            raise EngineError(f"rank already dropped to layers {self.held}")
        w, cfg = self.weights, self.cfg
        before = w.resident_bytes()
        first, last = layers.start == 0, layers.end == cfg.num_hidden_layers
        if not last:
            w.final_norm = w.lm_head = None
        if not first and not (last and cfg.tie_word_embeddings):
            w.embedding = None
            if not last:
                w.lm_head = None
        rss0 = resident_bytes()
        w.drop_layers([i for i in list(w.layers) if i not in layers])  # also trims the heap
        self._evict_from_pool_tail()
        freed = before - w.resident_bytes()
        rss1 = resident_bytes()
        pages = freed // self.plan.page_bytes
        self.kv.grow(pages)
        self.held = layers
        self.last_drop = DropMeasure(freed, rss0 - rss1, pages * self.plan.page_bytes, resident_bytes() - rss1)
        logger.info("dropped to layers %s: %.1f MiB of weights freed (resident -%.1f MiB), KV pool +%d "
                    "pages, +%.1f MiB (resident +%.1f MiB), %d pages in all", layers, freed / 2**20,
                    self.last_drop.resident_fall / 2**20, pages, self.last_drop.kv_added / 2**20,
                    self.last_drop.resident_rise / 2**20, self.kv.num_pages)
        return pages

    def _evict_from_pool_tail(self) -> None:
        """Copy out kept weights that a restore placed in the KV pool's tail: the pool is
        about to grow over it. (A drop to the same stage keeps none there.)"""
        w = self.weights
        for i, layer in list(w.layers.items()):
            if self.kv.holds(layer.flat):
                w.layers[i] = LayerWeights(self.cfg, layer.flat.clone())
        for name in ("embedding", "final_norm", "lm_head"):
            t = getattr(w, name)
            if t is not None and self.kv.holds(t):
                setattr(w, name, t.clone())
        if self.cfg.tie_word_embeddings and w.lm_head is not None and w.embedding is not None:
            w.lm_head = w.embedding

    def release_extension(self) -> None:
        """Give the KV pages gained by the drop back (they must be empty)."""
        self.kv.shrink(self.plan.kv_pages)

    def restored(self) -> None:
        """All weights are resident again (loaded by the caller)."""
        self.held = LayerRange(0, self.cfg.num_hidden_layers)

    def runner(self, layers: LayerRange) -> StageRunner:
        """The runner for a layer range of one of the store's splits."""
        key = (layers.start, layers.end)
        if key not in self.runners:
            raise EngineError(f"no engine for layers {layers}: the store lacks that split")
        return self.runners[key]

    def resident_growth(self) -> int:
        """Memory the rank took since it started: weights, KV pool and workspace in use."""
        if self.kv.data.device.type == "cuda":
            return torch.cuda.memory_reserved(self.kv.data.device)
        return resident_bytes() - self.baseline_resident
