"""Restoring dropped weights from the peers that kept them (through the transport, not disk).

All members of a splitting group run ``exchange_weights`` together. Every layer is owned by
the stage that kept it; the owner sends its layer buffer (one contiguous allocation) to
each member that dropped it, and the embedding, final norm and head go from the first and
last stages likewise. Every rank posts its sends and receives in the same order (layer by
layer, then the non-layer tensors), so the transfers match without a handshake.
"""

from __future__ import annotations

import logging
import time

from typing import TYPE_CHECKING

from engines.mapping import LayerRange
from engines.weights import LayerWeights, ModelWeights
from orchestrator.cluster.messages import TAG_WEIGHTS
from engines.weight_memory import RegionMemory, WeightMemory
from orchestrator.transport import Transport

if TYPE_CHECKING:
    from engines.rank_engine import RankEngine

logger = logging.getLogger(__name__)


def restore_weights(engine: RankEngine, ranks: tuple[int, ...], ranges: list[LayerRange], stage: int,
                    transport: Transport) -> tuple[int, float]:
    """A member's restore: the KV extension's memory (empty now) receives the weights it
    dropped, pulled from its peers (no allocator, no page faults); returns (bytes, seconds)."""
    memory = engine.memory_for_restore()
    nbytes, seconds = exchange_weights(engine.weights, ranks, ranges, stage, transport, memory)
    engine.restored(memory)
    return nbytes, seconds


def _owner(layer: int, ranges: list[LayerRange]) -> int:
    return next(i for i, r in enumerate(ranges) if layer in r)


def exchange_weights(weights: ModelWeights, ranks: tuple[int, ...], ranges: list[LayerRange], me: int,
                     transport: Transport, memory: WeightMemory | None = None) -> tuple[int, float]:
    """Make every weight resident on every member again; returns (bytes received, seconds).

    Received buffers come from ``memory`` (what the KV extension gave up) while it lasts.
    """
    cfg = weights.cfg
    memory = memory or RegionMemory()
    t0 = time.monotonic()
    handles, incoming = [], {}
    for layer in range(cfg.num_hidden_layers):
        owner = _owner(layer, ranges)
        if owner == me:
            for s, rank in enumerate(ranks):
                if s != me:
                    handles.append(transport.isend(weights.layers[layer].flat, rank, TAG_WEIGHTS))
        else:
            flat = memory.take((LayerWeights.buffer_numel(cfg),), weights.dtype, weights.device)
            buf = LayerWeights(cfg, flat)
            handles.append(transport.irecv(buf.flat, ranks[owner], TAG_WEIGHTS))
            incoming[layer] = buf
    received = sum(b.nbytes for b in incoming.values())
    received += _exchange_head(weights, ranks, me, transport, handles, memory)
    for h in handles:
        h.wait()
    weights.layers.update(incoming)
    if cfg.tie_word_embeddings:
        weights.lm_head = weights.embedding
    return received, time.monotonic() - t0


def _lacks(name: str, stage: int, g: int, tied: bool) -> bool:
    """Whether a stage dropped this tensor (the rule ``RankEngine.drop_to`` follows)."""
    if name == "embedding":
        return stage != 0 and not (tied and stage == g - 1)
    return stage != g - 1  # final_norm, untied lm_head


def _exchange_head(weights: ModelWeights, ranks: tuple[int, ...], me: int, transport: Transport,
                   handles: list, memory: WeightMemory) -> int:
    """Embedding from the first stage; final norm (and an untied head) from the last."""
    cfg = weights.cfg
    g, last, tied = len(ranks), len(ranks) - 1, cfg.tie_word_embeddings
    shape = (cfg.vocab_size, cfg.hidden_size)
    tensors = [("embedding", 0, shape), ("final_norm", last, (cfg.hidden_size,))]
    if not tied:
        tensors.append(("lm_head", last, shape))
    received = 0
    for name, owner, tshape in tensors:
        for s, rank in enumerate(ranks):
            if not _lacks(name, s, g, tied):
                continue
            if owner == me:
                handles.append(transport.isend(getattr(weights, name), rank, TAG_WEIGHTS))
            elif s == me:
                buf = memory.take(tshape, weights.dtype, weights.device)
                handles.append(transport.irecv(buf, ranks[owner], TAG_WEIGHTS))
                setattr(weights, name, buf)
                received += buf.numel() * buf.element_size()
    return received
