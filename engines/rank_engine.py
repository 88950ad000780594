"""One rank's device: resident weights, its KV pool, and runners for every role it can take.

Every rank loads the full-replica (pp1) weights once. The stages of the store's other
splits are runners over the same weight tensors with another layer range, so switching a
rank from replica to stage i of a g-group is choosing a runner: no rebuild, no reload.
The KV pool takes what the device-memory budget leaves after the weights.

How a drop turns weights into KV (``kv_extension``):
- ``commit``: the pool is a reserved CPU range; dropped weights are freed to the OS and
  as many pages are committed at the pool's tail (CPU only);
- ``remap``: weights and KV live in physical chunks (``engines.vmm``); the chunks of the
  dropped weights are unmapped from them and mapped onto the pool's tail, so the same
  memory becomes KV without being freed or copied (CUDA's virtual-memory API on a GPU,
  shared memory on a CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engines.errors import EngineError
from engines.kv_cache import KVPool
from engines.mapping import Holding, LayerRange
from engines.runner import StageRunner
from engines.store import EngineStore
from engines.tensor_parallel import TpShard
from engines.vmm import Arena, VmmError, make_driver
from engines.vmm.host import resident_bytes
from engines.weights import LayerWeights, release_freed_memory
from engines.weight_memory import ChunkMemory, RegionMemory, WeightMemory

KV_EXTENSIONS = ("auto", "commit", "remap")
"""How a drop grows the KV pool; ``auto`` is ``remap`` on CUDA and ``commit`` on a CPU."""

logger = logging.getLogger(__name__)


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
    """What a drop did to memory, measured: the process's resident set on a CPU, the
    device's memory in use on a GPU."""

    weights_freed: int
    resident_fall: int
    """Memory in use that went away with the weights (freed, or unmapped by a remap)."""
    kv_added: int
    resident_rise: int
    """Memory in use that came back with the new KV pages."""
    remapped: int = 0
    """Bytes of weight chunks mapped onto the KV pool's tail (``remap``)."""
    seconds: float = 0.0
    """From freeing the first weight to the new pages being usable."""


@dataclass(frozen=True)
class _Level:
    """What a drop changed, to be undone by the restore after it."""

    held: Holding
    kv_pages: int


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class RankEngine:
    """The weights, KV pool and stage runners of one rank."""

    def __init__(self, store: EngineStore, device: torch.device, dtype: torch.dtype | None,
                 device_memory: int, page_size: int, workspace_fraction: float = 0.05,
                 kv_pages: int | None = None, kv_extension: str = "auto", tp: TpShard = TpShard(1, 0),
                 all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """``kv_pages`` overrides the budget's pool (the oracle): a lazy pool whose pages take
        memory only once written. ``kv_extension``: see the module's docstring. ``tp``: the
        rank's place in a tensor-parallel set, whose shard (of the store's tp splits) it
        holds and whose KV heads its pool keeps; ``all_reduce`` sums over the set."""
        self.store = store
        self.tp = tp
        self.baseline_resident = resident_bytes() if device.type == "cpu" else 0
        self.weights, _ = store.load_rank(1, tp.rank, device=device, dtype=dtype, tp_size=tp.size)
        self.cfg = self.weights.cfg
        """What this rank computes: the model, or its TP shard of it."""
        self.splits = store.tp_splits(tp.size)
        """The pipeline sizes this rank can take a stage of (with its TP size)."""
        self.arena = self._make_arena(device, kv_extension, lazy=kv_pages is not None)
        if self.arena is not None:
            self._adopt_weights()
        self.plan = self._plan(device_memory, page_size, workspace_fraction)
        if kv_pages is not None:
            self.plan = MemoryPlan(device_memory, self.plan.weight_bytes, self.plan.workspace_bytes,
                                   kv_pages, self.plan.page_bytes)
        # Reserve room for the most KV this rank can ever get: its pool plus the weights it
        # would free as the smallest stage of the store's largest split (a remapped pool:
        # every weight chunk, plus the rounding of its own first chunk).
        if self.arena is not None:
            extra = -(-(self.weight_memory() + self.arena.granularity) // self.plan.page_bytes)
        else:
            extra = (self.weights.resident_bytes() - self._min_kept_bytes()) // self.plan.page_bytes
        self.kv = KVPool(self.cfg, self.plan.kv_pages, page_size, self.weights.dtype, device,
                         max_pages=self.plan.kv_pages + extra, lazy=kv_pages is not None, arena=self.arena)
        self.held = LayerRange(0, self.cfg.num_hidden_layers)
        """The layers whose weights are resident (all of them unless dropped)."""
        self.levels: list[_Level] = []
        """One per drop not yet restored, oldest first: a group that fuses again drops again."""
        self.last_drop: DropMeasure | None = None
        # Every role of every split the store holds, prepared up front.
        self.runners: dict[tuple[int, int], StageRunner] = {}
        for g in self.splits:
            mapping = store.mapping(g, tp.size)
            for stage in range(g):
                r = mapping.layer_range(stage)
                self.runners[(r.start, r.end)] = StageRunner(self.cfg, self.weights, r, self.kv,
                                                             all_reduce if tp.size > 1 else None)
        logger.info("rank engine: %.1f MiB weights, %d KV pages (%.1f MiB), roles for splits %s%s, "
                    "KV extension by %s", self.plan.weight_bytes / 2**20, self.plan.kv_pages,
                    self.plan.kv_bytes / 2**20, self.splits,
                    f", tp rank {tp.rank} of {tp.size}" if tp.size > 1 else "",
                    f"remapping ({self.arena.driver.name} virtual memory)" if self.arena else "committing pages")

    @staticmethod
    def _make_arena(device: torch.device, kv_extension: str, lazy: bool) -> Arena | None:
        if kv_extension not in KV_EXTENSIONS:
            raise EngineError(f"--kv-extension {kv_extension!r}: expected one of {', '.join(KV_EXTENSIONS)}")
        if lazy or kv_extension == "commit" or (kv_extension == "auto" and device.type == "cpu"):
            if kv_extension == "remap":
                raise EngineError("--kv-extension remap cannot serve the oracle's lazy pool")
            if kv_extension == "commit" and device.type != "cpu":
                raise EngineError("--kv-extension commit is for CPUs; use remap (or auto) on CUDA")
            return None
        try:
            return Arena(make_driver(device))
        except VmmError as exc:
            if kv_extension == "remap":
                raise EngineError(str(exc)) from None
            logger.warning("no virtual-memory driver (%s): the KV pool cannot grow, so this rank "
                           "cannot drop weights for KV", exc)
            return None

    def _adopt_weights(self) -> None:
        """Move each weight buffer into a chunk of its own (once, at start-up), so that a drop
        can remap it. Tensors smaller than a chunk (norms) stay where they are.

        One buffer at a time: each original is dropped and its memory handed back before the
        next chunk is made, so start-up needs the weights plus one buffer, not twice the
        weights (no list or loop variable keeps an original alive)."""
        w, arena = self.weights, self.arena
        for i in sorted(w.layers):
            w.layers[i] = LayerWeights(self.cfg, arena.adopt(w.layers[i].flat))
            release_freed_memory(w.device)
        tied = w.lm_head is not None and w.embedding is not None and w.lm_head.data_ptr() == w.embedding.data_ptr()
        for name in ("embedding", "final_norm") + (() if tied else ("lm_head",)):
            nbytes = _nbytes(getattr(w, name))
            if nbytes >= arena.granularity:
                setattr(w, name, arena.adopt(getattr(w, name)))
                if tied and name == "embedding":
                    w.lm_head = w.embedding  # the old head was the old embedding: let it go
                release_freed_memory(w.device)

    def _weight_buffers(self) -> dict[int, torch.Tensor]:
        """Every weight buffer held, by address (a tied head and embedding once)."""
        w = self.weights
        tensors = [layer.flat for layer in w.layers.values()]
        tensors += [t for t in (w.embedding, w.final_norm, w.lm_head) if t is not None]
        return {t.data_ptr(): t for t in tensors}

    @property
    def can_grow_kv(self) -> bool:
        """Whether a drop can turn weights into KV pages here: on a CPU always, on CUDA only
        with the virtual-memory driver (a remapped pool)."""
        return self.kv.remapped or self.kv.data.device.type == "cpu"

    def weight_memory(self) -> int:
        """Memory behind the weights (whole chunks for the arena's buffers)."""
        if self.arena is None:
            return self.weights.resident_bytes()
        return sum(self.arena.footprint(t) for t in self._weight_buffers().values())

    def _memory_in_use(self) -> int:
        if self.arena is not None:
            return self.arena.driver.memory_in_use()
        return resident_bytes()

    def _plan(self, device_memory: int, page_size: int, workspace_fraction: float) -> MemoryPlan:
        weight_bytes = self.weight_memory()
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
        sizes = [self.stage_weight_bytes(self.store.mapping(g, self.tp.size).layer_range(s))
                 for g in self.splits for s in range(g)]
        return min(sizes)

    def holding(self) -> Holding:
        w = self.weights
        tied = self.cfg.tie_word_embeddings
        return Holding(self.held, w.embedding is not None, w.final_norm is not None,
                       not tied and w.lm_head is not None)

    def drop_to(self, layers: LayerRange) -> int:
        """Keep only what stage ``layers`` needs (within what is held: a stage of a group that
        fuses into a deeper one keeps a part of its layers); the freed bytes become KV pages
        at once. Returns the number of pages the pool grew by.
        """
        if layers.start < self.held.start or layers.end > self.held.end:
            raise EngineError(f"cannot drop to layers {layers}: this rank holds only {self.held}")
        w, cfg = self.weights, self.cfg
        self.levels.append(_Level(self.holding(), self.kv.num_pages))
        if not self.can_grow_kv:
            raise EngineError("this rank's KV pool cannot grow on CUDA without the virtual-memory driver "
                              "(cuda-bindings): refusing to drop weights that could not become KV")
        t0 = time.perf_counter()
        before = w.resident_bytes()
        # The arena's buffers, whose chunks a remap takes back (and only those: holding any
        # other tensor here would keep its memory from being freed).
        buffers = {p: t for p, t in self._weight_buffers().items() if self.arena.owns(t)} if self.kv.remapped else {}
        first, last = layers.start == 0, layers.end == cfg.num_hidden_layers
        if not last:
            w.final_norm = w.lm_head = None
        if not first and not (last and cfg.tie_word_embeddings):
            w.embedding = None
            if not last:
                w.lm_head = None
        used0 = self._memory_in_use()
        w.drop_layers([i for i in list(w.layers) if i not in layers])  # frees what is not the arena's
        freed = before - w.resident_bytes()
        pages, remapped, used1 = self._grow_pool(buffers, freed)
        self.held = layers
        m = self.last_drop = DropMeasure(freed, used0 - used1, pages * self.plan.page_bytes,
                                         self._memory_in_use() - used1, remapped, time.perf_counter() - t0)
        how = f"{m.remapped / 2**20:.1f} MiB of weight chunks remapped onto the pool, " if m.remapped else ""
        logger.info("dropped to layers %s in %.1f ms: %.1f MiB of weights dropped (in use -%.1f MiB), %sKV pool "
                    "+%d pages, +%.1f MiB (in use +%.1f MiB), %d pages in all", layers, m.seconds * 1e3,
                    freed / 2**20, m.resident_fall / 2**20, how, pages, m.kv_added / 2**20,
                    m.resident_rise / 2**20, self.kv.num_pages)
        return pages

    def _grow_pool(self, buffers: dict[int, torch.Tensor], freed: int) -> tuple[int, int, int]:
        """Turn what the weights gave up into KV pages: the chunks of the buffers no longer
        held (``buffers``: the arena's, before the drop) on a remapped pool, else ``freed``
        bytes of committed pages. Returns (pages added, bytes remapped, memory in use
        before the pool grew)."""
        if not self.kv.remapped:
            self._evict_from_pool_tail()
            used = self._memory_in_use()
            pages = freed // self.plan.page_bytes
            self.kv.grow(pages)
            return pages, 0, used
        kept = self._weight_buffers()
        chunks = self.arena.reclaim_all([t for p, t in buffers.items() if p not in kept])  # one wait
        used = self._memory_in_use()
        return self.kv.extend(chunks), sum(c.nbytes for c in chunks), used

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

    def restore_target(self) -> Holding:
        """What the last drop left behind: the weights a restore brings back."""
        return self.levels[-1].held if self.levels else self.holding()

    def memory_for_restore(self) -> WeightMemory:
        """Shrink the KV pool back to its size before the last drop (the pages above must be
        free) and hand the memory it gives up to the weights about to be pulled back from
        the peers. A rank that never dropped (a stage of a group it started in) has all its
        weights: nothing to give."""
        if not self.levels:
            return RegionMemory()
        kv, pages = self.kv, self.levels[-1].kv_pages
        if pages == kv.num_pages:
            return RegionMemory()
        if kv.remapped:
            return ChunkMemory(self.arena, kv.detach_chunks(pages))
        if kv.reserved:
            return RegionMemory(kv.detach_tail(pages), kv)
        kv.shrink(pages)
        return RegionMemory()

    def restored(self, memory: WeightMemory) -> None:
        """The weights before the last drop are resident again (loaded by the caller into
        ``memory``'s buffers)."""
        memory.finish()
        if self.levels:
            self.held = self.levels.pop().held.layers

    def runner(self, layers: LayerRange) -> StageRunner:
        """The runner for a layer range of one of the store's splits."""
        key = (layers.start, layers.end)
        if key not in self.runners:
            raise EngineError(f"no engine for layers {layers}: the store lacks that split")
        return self.runners[key]

    def resident_growth(self) -> int:
        """Memory the rank took since it started: weights, KV pool and workspace in use."""
        if self.kv.data.device.type == "cuda":
            chunks = self.arena.allocated if self.arena is not None else 0
            return torch.cuda.memory_reserved(self.kv.data.device) + chunks
        return resident_bytes() - self.baseline_resident
