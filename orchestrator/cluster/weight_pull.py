"""Restoring dropped weights from the peers that kept them (through the transport, not disk).

All members of a splitting group run ``exchange_weights`` together, each knowing what every
member holds now and what it held before the drop (``Holding``). Every layer is owned by
the stage that kept it; the owner sends its layer buffer (one contiguous allocation) to
each member that held it before, and the embedding, final norm and head go likewise from
the stage that kept them. Every rank posts its sends and receives in the same order (layer
by layer, then the non-layer tensors), so the transfers match without a handshake.
"""

from __future__ import annotations

import logging
import time

from collections.abc import Callable
from typing import TYPE_CHECKING

from engines.mapping import Holding
from engines.weights import LayerWeights, ModelWeights
from orchestrator.cluster.messages import TAG_WEIGHTS
from engines.weight_memory import RegionMemory, WeightMemory
from orchestrator.transport import Transport

if TYPE_CHECKING:
    from engines.rank_engine import RankEngine

logger = logging.getLogger(__name__)


def restore_weights(engine: RankEngine, ranks: tuple[int, ...], now: list[Holding], target: list[Holding],
                    me: int, transport: Transport) -> tuple[int, float]:
    """A member's restore: the KV extension's memory (empty now) receives the weights it
    dropped, pulled from its peers (no allocator, no page faults); returns (bytes, seconds)."""
    memory = engine.memory_for_restore()
    nbytes, seconds = exchange_weights(engine.weights, ranks, now, target, me, transport, memory)
    engine.restored(memory)
    return nbytes, seconds


def _owner(holds: Callable[[Holding], bool], now: list[Holding], what: str) -> int:
    for i, h in enumerate(now):
        if holds(h):
            return i
    raise RuntimeError(f"restore: no member of the group holds {what}")


def exchange_weights(weights: ModelWeights, ranks: tuple[int, ...], now: list[Holding], target: list[Holding],
                     me: int, transport: Transport, memory: WeightMemory | None = None) -> tuple[int, float]:
    """Give every member what ``target`` says it holds again, from the members that hold it
    ``now``; returns (bytes received here, seconds).

    Every member computes the same plan from the same lists, and posts its sends and
    receives in its order (layer by layer, then the tensors outside the layers), so the
    transfers match without a handshake. Received buffers come from ``memory`` (what the
    KV extension gave up) while it lasts.
    """
    cfg = weights.cfg
    memory = memory or RegionMemory()
    t0 = time.monotonic()
    handles, incoming = [], {}
    for layer in range(cfg.num_hidden_layers):
        owner = _owner(lambda h: layer in h.layers, now, f"layer {layer}")
        for m in range(len(ranks)):
            if m == owner or layer not in target[m].layers or layer in now[m].layers:
                continue
            if owner == me:
                handles.append(transport.isend(weights.layers[layer].flat, ranks[m], TAG_WEIGHTS))
            elif m == me:
                flat = memory.take((LayerWeights.buffer_numel(cfg),), weights.dtype, weights.device)
                buf = LayerWeights(cfg, flat)
                handles.append(transport.irecv(buf.flat, ranks[owner], TAG_WEIGHTS))
                incoming[layer] = buf
    received = sum(b.nbytes for b in incoming.values())
    received += _exchange_head(weights, ranks, now, target, me, transport, handles, memory)
    for h in handles:
        h.wait()
    weights.layers.update(incoming)
    if cfg.tie_word_embeddings:
        weights.lm_head = weights.embedding
    return received, time.monotonic() - t0


def _exchange_head(weights: ModelWeights, ranks: tuple[int, ...], now: list[Holding], target: list[Holding],
                   me: int, transport: Transport, handles: list, memory: WeightMemory) -> int:
    """The embedding, the final norm and an untied head, each from a member that holds it."""
    cfg = weights.cfg
    shape = (cfg.vocab_size, cfg.hidden_size)
    tensors = [("embedding", shape), ("final_norm", (cfg.hidden_size,))]
    if not cfg.tie_word_embeddings:
        tensors.append(("lm_head", shape))
    received = 0
    for name, tshape in tensors:
        needs = [m for m in range(len(ranks)) if getattr(target[m], name) and not getattr(now[m], name)]
        if not needs:
            continue
        owner = _owner(lambda h: getattr(h, name), now, f"the {name}")
        for m in needs:
            if owner == me:
                handles.append(transport.isend(getattr(weights, name), ranks[m], TAG_WEIGHTS))
            elif m == me:
                buf = memory.take(tshape, weights.dtype, weights.device)
                handles.append(transport.irecv(buf, ranks[owner], TAG_WEIGHTS))
                setattr(weights, name, buf)
                received += buf.numel() * buf.element_size()
    return received
