"""Drops in levels: a rank that is a stage of a group drops again when the group fuses into
a deeper one (keeping part of what it holds), and each restore undoes one drop: the pool
shrinks to its size before that drop and the weights held then come back. KV below the
first level's pages survives all of it, with either KV extension."""

from __future__ import annotations

import mmap

import pytest
import torch

from engines.errors import EngineError
from engines.mapping import Holding, LayerRange
from engines.rank_engine import RankEngine
from engines.store import EngineStore
from engines.vmm.host import HostDriver
from engines.weights import LayerWeights


@pytest.fixture(params=["commit", "remap"])
def engine(request, tiny_store, monkeypatch) -> RankEngine:
    monkeypatch.setattr("engines.rank_engine.make_driver", lambda device: HostDriver(mmap.PAGESIZE))
    return RankEngine(EngineStore(tiny_store), torch.device("cpu"), torch.float32, 64 << 20, 16,
                      kv_extension=request.param)


def _pull(engine: RankEngine, reference, want: Holding, memory) -> None:
    """What the weight pull brings back, with the reference standing in for the peers."""
    w, cfg = engine.weights, engine.cfg
    for i in want.layers:
        if i not in w.layers:
            flat = memory.take((LayerWeights.buffer_numel(cfg),), w.dtype, w.device)
            flat.copy_(reference.layers[i].flat)
            w.layers[i] = LayerWeights(cfg, flat)
    for name in ("embedding", "final_norm", "lm_head"):
        if getattr(want, name) and getattr(w, name) is None:
            t = getattr(reference, name)
            buf = memory.take(tuple(t.shape), w.dtype, w.device)
            buf.copy_(t)
            setattr(w, name, buf)


def test_two_drops_deep_and_two_restores_back(engine, tiny_store):
    reference, _ = EngineStore(tiny_store).load_rank(1, 0, device=torch.device("cpu"), dtype=torch.float32)
    kv = engine.kv
    base, weights, full = kv.num_pages, engine.weight_memory(), engine.holding()
    kv.data[:base] = 0.5
    engine.drop_to(LayerRange(0, 3))  # stage 0 of a pp2 group (6 layers)
    pp2_pages, pp2 = kv.num_pages, engine.holding()
    assert pp2 == Holding(LayerRange(0, 3), True, False, False)
    engine.drop_to(LayerRange(0, 2))  # stage 0 of pp3, within it: drops layer 2 too
    assert kv.num_pages > pp2_pages and len(engine.levels) == 2 and engine.held == LayerRange(0, 2)
    with pytest.raises(EngineError, match=r"cannot drop to layers \[1, 3\): this rank holds only \[0, 2\)"):
        engine.drop_to(LayerRange(1, 3))
    assert engine.restore_target() == pp2
    for want, pages in ((pp2, pp2_pages), (full, base)):
        memory = engine.memory_for_restore()
        assert kv.num_pages == pages
        _pull(engine, reference, want, memory)
        engine.restored(memory)
        assert engine.holding() == want
    assert engine.levels == [] and engine.weight_memory() == weights and bool((kv.data[:base] == 0.5).all())
    assert all(torch.equal(engine.weights.layers[i].flat, reference.layers[i].flat) for i in range(6))
    assert engine.restore_target() == full  # nothing left to undo
