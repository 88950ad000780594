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


class RankEngine:
    """The weights, KV pool and stage runners of one rank."""

    def __init__(self, store: EngineStore, device: torch.device, dtype: torch.dtype | None,
                 device_memory: int, page_size: int, workspace_fraction: float = 0.05) -> None:
        self.store = store
        self.cfg = store.config
        self.baseline_resident = resident_bytes() if device.type == "cpu" else 0
        self.weights, _ = store.load_rank(1, 0, device=device, dtype=dtype)
        self.plan = self._plan(device_memory, page_size, workspace_fraction)
        self.kv = KVPool(self.cfg, self.plan.kv_pages, page_size, self.weights.dtype, device)
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
