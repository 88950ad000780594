"""The restore's weight pull, planned from what each member holds now and held before: who
sends which layer (and the tensors outside the layers) to whom, without MPI. A pp4 group
fused from two pp2 pairs splits back: each rank gets the quarter it lacks from the member
that kept it. The bytes themselves move in the cluster tests."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from engines.mapping import Holding, LayerRange
from orchestrator.cluster.weight_pull import exchange_weights
from orchestrator.transport import Handle, Transport

L = 8


@pytest.fixture
def cfg(tiny_store):
    """The tiny model's shape with 8 layers (untied): pp2's stages split evenly into pp4's."""
    from engines.store import EngineStore
    return dataclasses.replace(EngineStore(tiny_store).config, num_hidden_layers=L, tie_word_embeddings=False)


class Done(Handle):
    def test(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class Recording(Transport):
    name = "recording"

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int]] = []  # (kind, peer, numel)

    def isend(self, tensor, dst, tag):
        self.log.append(("send", dst, tensor.numel()))
        return Done()

    def irecv(self, out, src, tag):
        self.log.append(("recv", src, out.numel()))
        return Done()


def _weights(cfg, held: Holding):
    from engines.weights import LayerWeights
    n = LayerWeights.buffer_numel(cfg)
    return SimpleNamespace(cfg=cfg, dtype=torch.float32, device=torch.device("cpu"),
                           layers={i: LayerWeights(cfg, torch.zeros(n)) for i in held.layers},
                           embedding=torch.zeros(cfg.vocab_size, cfg.hidden_size) if held.embedding else None,
                           final_norm=torch.zeros(cfg.hidden_size) if held.final_norm else None,
                           lm_head=torch.zeros(cfg.vocab_size, cfg.hidden_size) if held.lm_head else None)


def _stage(start: int, end: int, first: bool, last: bool) -> Holding:
    return Holding(LayerRange(start, end), first, last, last)


RANKS = (0, 2, 1, 3)  # the pp4 group of the pairs (0, 1) and (2, 3)
NOW = [_stage(0, 2, True, False), _stage(2, 4, False, False), _stage(4, 6, False, False), _stage(6, 8, False, True)]
BEFORE = [_stage(0, 4, True, False), _stage(0, 4, True, False), _stage(4, 8, False, True), _stage(4, 8, False, True)]


def _plan(cfg, me: int):
    t = Recording()
    w = _weights(cfg, NOW[me])
    received, _ = exchange_weights(w, RANKS, NOW, BEFORE, me, t)
    return t.log, w, received


def test_each_rank_pulls_the_quarter_it_lacks_from_the_member_that_kept_it(cfg):
    from engines.weights import LayerWeights
    n = LayerWeights.buffer_numel(cfg)
    emb = cfg.vocab_size * cfg.hidden_size
    # rank 0: had [0, 4), kept [0, 2): gets 2 and 3 from rank 2, sends it 0, 1 and the embedding
    log0, w0, got0 = _plan(cfg, 0)
    assert log0 == [("send", 2, n), ("send", 2, n), ("recv", 2, n), ("recv", 2, n), ("send", 2, emb)]
    assert sorted(w0.layers) == [0, 1, 2, 3] and got0 == 2 * n * 4
    log2, w2, _ = _plan(cfg, 1)  # rank 2: had [0, 4) with the embedding, kept [2, 4) -> the embedding from rank 0
    assert log2 == [("recv", 0, n), ("recv", 0, n), ("send", 0, n), ("send", 0, n), ("recv", 0, emb)]
    assert w2.embedding is not None and w2.final_norm is None
    log1, w1, _ = _plan(cfg, 2)  # rank 1: had [4, 8) with the norm and head, kept [4, 6) -> both from rank 3
    assert log1 == [("send", 3, n), ("send", 3, n), ("recv", 3, n), ("recv", 3, n), ("recv", 3, cfg.hidden_size),
                    ("recv", 3, emb)]
    assert w1.final_norm is not None and w1.lm_head is not None


def test_a_member_that_lost_nothing_moves_nothing(cfg):
    t = Recording()
    full = [Holding.full(L, tied=False)] * 2
    received, _ = exchange_weights(_weights(cfg, full[0]), (0, 1), full, full, 0, t)
    assert t.log == [] and received == 0
