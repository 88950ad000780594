"""A rank's drop and restore with ``--kv-extension remap``: the dropped weights' chunks are
mapped onto the KV pool's tail (nothing allocated, nothing copied), the restore maps them
back under the weights, and the rank ends where it started. On the host driver always;
on CUDA's virtual-memory API where a GPU is available (the remap time is logged)."""

from __future__ import annotations

import logging

import pytest
import torch

from engines.errors import EngineError
from engines.mapping import LayerRange
from engines.store import EngineStore
from engines.weights import LayerWeights
from engines.rank_engine import RankEngine

needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_gpu)])
def device(request) -> torch.device:
    return torch.device(request.param)


def _engine(store, device, kv_extension="remap") -> RankEngine:
    return RankEngine(EngineStore(store), device, torch.float32, 64 << 20, 16, kv_extension=kv_extension)


def _same_weights(engine: RankEngine, reference) -> bool:
    w = engine.weights
    same = all(torch.equal(w.layers[i].flat, reference.layers[i].flat) for i in reference.layers)
    return same and all(torch.equal(getattr(w, n), getattr(reference, n)) for n in ("embedding", "final_norm", "lm_head"))


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
        assert arena.owns(w.lm_head) and not arena.owns(w.final_norm)  # a norm is smaller than a chunk
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
        assert all(arena.owns(layer.flat) for layer in engine.weights.layers.values())
        assert bool((kv.data[:base_pages] == 0.25).all())
    assert any("remapped onto the pool" in r.getMessage() for r in caplog.records)


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
