"""A rank's drop and restore with ``--kv-extension remap``: the dropped weights' chunks are
mapped onto the KV pool's tail (nothing allocated, nothing copied), the restore maps them
back under the weights, and the rank ends where it started. On the host driver always,
at the page size and at CUDA's 2 MiB granularity (where the tiny model's head and norms,
each under one granule, stay in torch memory as they do on a GPU); on CUDA's
virtual-memory API where a GPU is available (the remap time is logged)."""

from __future__ import annotations

import logging
import mmap

import pytest
import torch

from engines.errors import EngineError
from engines.mapping import LayerRange
from engines.store import EngineStore
from engines.weights import LayerWeights
from engines.rank_engine import RankEngine
from engines.vmm.host import HostDriver

needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
HOST_GRANULARITIES = {"host-page": mmap.PAGESIZE, "host-2MiB": 2 << 20}


@pytest.fixture(params=[*HOST_GRANULARITIES, pytest.param("cuda", marks=needs_gpu)])
def device(request, monkeypatch) -> torch.device:
    """The device; on a CPU, the rank engine's host driver gets the case's granularity."""
    if request.param == "cuda":
        return torch.device("cuda")
    granularity = HOST_GRANULARITIES[request.param]
    monkeypatch.setattr("engines.rank_engine.make_driver", lambda device: HostDriver(granularity))
    return torch.device("cpu")


def _engine(store, device, kv_extension="remap") -> RankEngine:
    return RankEngine(EngineStore(store), device, torch.float32, 64 << 20, 16, kv_extension=kv_extension)


def _same_weights(engine: RankEngine, reference) -> bool:
    w = engine.weights
    same = all(torch.equal(w.layers[i].flat, reference.layers[i].flat) for i in reference.layers)
    return same and all(torch.equal(getattr(w, n), getattr(reference, n)) for n in ("embedding", "final_norm", "lm_head"))


def _placed_by_the_rule(engine: RankEngine) -> bool:
    """Every layer is in the arena, whatever its size (a drop remaps layers); the embedding,
    the final norm and the head are there only from one granule up, smaller ones stay in
    torch memory (a chunk of their own would be mostly waste)."""
    w, arena = engine.weights, engine.arena
    if not all(arena.owns(layer.flat) for layer in w.layers.values()):
        return False
    others = [t for t in (w.embedding, w.final_norm, w.lm_head) if t is not None]
    return all(arena.owns(t) == (t.numel() * t.element_size() >= arena.granularity) for t in others)


def _pull_back(engine: RankEngine, reference, memory) -> None:
    """What the weight pull does, with the reference standing in for the peers."""
    w, cfg = engine.weights, engine.cfg
    for i in sorted(set(reference.layers) - set(w.layers)):
        flat = memory.take((LayerWeights.buffer_numel(cfg),), w.dtype, w.device)
        flat.copy_(reference.layers[i].flat)
        w.layers[i] = LayerWeights(cfg, flat)
    for name in ("embedding", "final_norm", "lm_head"):
        if getattr(w, name) is None:
            t = getattr(reference, name)
            buf = memory.take(tuple(t.shape), w.dtype, w.device)
            buf.copy_(t)
            setattr(w, name, buf)


def test_drop_remaps_weight_chunks_onto_the_pool_and_restore_maps_them_back(tiny_store, device, caplog):
    caplog.set_level(logging.INFO, logger="engines.rank_engine")
    engine = _engine(tiny_store, device)
    reference, _ = EngineStore(tiny_store).load_rank(1, 0, device=device, dtype=torch.float32)
    arena, kv = engine.arena, engine.kv
    assert arena is not None and kv.remapped
    assert all(arena.owns(layer.flat) for layer in engine.weights.layers.values())
    base_pages, allocated, footprint = kv.num_pages, arena.allocated, engine.weight_memory()
    kv.data[:base_pages] = 0.25  # KV in flight: it must survive both remaps in place
    base_ptr = kv.data.data_ptr()

    for _ in range(2):  # two cycles: restored weights are remappable again
        w = engine.weights
        dropping = [w.layers[i].flat for i in (3, 4, 5)] + [w.lm_head, w.final_norm]
        chunked = sum(arena.footprint(t) for t in dropping if arena.owns(t))
        assert _placed_by_the_rule(engine) and not arena.owns(w.final_norm)  # a norm is under a granule
        head_bytes = w.lm_head.numel() * w.lm_head.element_size()  # ~66 KB: in the arena at 4 KiB, not at 2 MiB
        assert arena.owns(w.lm_head) == (head_bytes >= arena.granularity)
        added = engine.drop_to(LayerRange(0, 3))  # stage 0 of 2: drops layers 3-5, the norm and the head
        del w, dropping
        m = engine.last_drop
        assert m.remapped == chunked
        assert arena.allocated == allocated, "a remap allocates nothing"
        assert kv.num_pages == base_pages + added and kv.data.data_ptr() == base_ptr
        assert m.remapped - kv.page_bytes < added * kv.page_bytes <= m.remapped + arena.granularity
        assert bool((kv.data[:base_pages] == 0.25).all()) and not kv.data[base_pages:kv.num_pages].any()
        kv.data[base_pages:kv.num_pages] = -1.0  # the new pages hold KV like any other

        memory = engine.memory_for_restore()
        _pull_back(engine, reference, memory)
        engine.restored(memory)
        assert kv.num_pages == base_pages and arena.allocated == allocated
        assert engine.weight_memory() == footprint and _same_weights(engine, reference)
        assert _placed_by_the_rule(engine)
        assert bool((kv.data[:base_pages] == 0.25).all())
    assert any("remapped onto the pool" in r.getMessage() for r in caplog.records)


def test_a_restore_unmaps_its_chunks_after_one_wait_for_the_device(tiny_store, device):
    engine = _engine(tiny_store, device)
    drv = engine.arena.driver
    engine.drop_to(LayerRange(0, 3))
    waits = drv.syncs
    memory = engine.memory_for_restore()
    assert len(memory.chunks) >= 3 and drv.syncs == waits + 1


def test_a_drop_unmaps_its_chunks_after_one_wait_for_the_device(tiny_store, device):
    engine = _engine(tiny_store, device)
    drv = engine.arena.driver
    waits = drv.syncs
    engine.drop_to(LayerRange(0, 3))  # three layers (and at 4 KiB the head): several chunks
    assert engine.last_drop.remapped >= 3 * engine.arena.granularity and drv.syncs == waits + 1


def test_kv_extension_choices_are_checked(tiny_store):
    with pytest.raises(EngineError, match="expected one of auto, commit, remap"):
        _engine(tiny_store, torch.device("cpu"), "swap")
    with pytest.raises(EngineError, match="commit is for CPUs"):
        RankEngine._make_arena(torch.device("cuda"), "commit", lazy=False)
    with pytest.raises(EngineError, match="lazy pool"):
        RankEngine._make_arena(torch.device("cpu"), "remap", lazy=True)
    assert _engine(tiny_store, torch.device("cpu"), "auto").arena is None  # commit on a CPU by default


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without a GPU")
def test_remap_without_a_virtual_memory_driver_is_a_clear_error():
    with pytest.raises(EngineError, match="cuda.bindings|CUDA build of torch|driver library"):
        RankEngine._make_arena(torch.device("cuda"), "remap", lazy=False)
