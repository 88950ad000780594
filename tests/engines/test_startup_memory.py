"""Start-up moves the weights into the virtual-memory arena one buffer at a time: when a
buffer is adopted, every original adopted before it is already gone, so start-up needs
the weights plus one buffer, not twice the weights."""

from __future__ import annotations

import weakref

import torch

from engines.rank_engine import RankEngine
from engines.store import EngineStore
from engines.vmm import Arena


def test_each_original_is_released_before_the_next_buffer_is_adopted(tiny_store, monkeypatch):
    adopted: list[weakref.ref] = []
    still_alive: list[int] = []
    real = Arena.adopt

    def adopt(self, tensor):
        still_alive.append(sum(r() is not None for r in adopted))
        out = real(self, tensor)
        adopted.append(weakref.ref(tensor))
        return out

    monkeypatch.setattr(Arena, "adopt", adopt)
    engine = RankEngine(EngineStore(tiny_store), torch.device("cpu"), None, 64 << 20, 4, kv_extension="remap")
    assert len(adopted) >= engine.cfg.num_hidden_layers
    assert still_alive == [0] * len(adopted), still_alive  # no original outlived its adoption
    assert all(r() is None for r in adopted)
