"""Moving KV pages between ranks' pools: the member side of an exchange batch.

Every member gets the same ordered list of moves from the leader and performs those it is
part of, in list order, so the sends of one rank and the receives of its peer match up.
Page runs that are consecutive on both sides travel as one transfer straight from pool
memory into pool memory (no scratch buffer). Moves are posted one layer per turn of the
rank loop, so pipeline steps run in between.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from engines.kv_cache import KVPool
from orchestrator.cluster.messages import TAG_KV, ExchangeBatch, KvMove
from orchestrator.transport import Handle, Transport

logger = logging.getLogger(__name__)


def coalesce(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` runs where both page lists are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            a, b, n = runs[-1]
            runs[-1] = (a, b, n + 1)
        else:
            runs.append((s, d, 1))
    return runs


@dataclass
class _Batch:
    epoch: int
    batch: int
    layers: deque  # deque[list[KvMove]]: this rank's moves, one list per layer, in order
    handles: list[Handle] = field(default_factory=list)
    bytes_moved: int = 0
    started: float = field(default_factory=time.monotonic)


class KvMover:
    """Performs this rank's part of exchange batches."""

    def __init__(self, rank: int, kv: KVPool, transport: Transport) -> None:
        self.rank = rank
        self.kv = kv
        self.transport = transport
        self._batches: list[_Batch] = []

    @property
    def busy(self) -> bool:
        return bool(self._batches)

    def start(self, msg: ExchangeBatch) -> None:
        mine = [m for m in msg.moves if self.rank in (m.src_rank, m.dst_rank)]
        by_layer: dict[int, list[KvMove]] = {}
        for m in mine:
            by_layer.setdefault(m.layer, []).append(m)
        self._batches.append(_Batch(msg.epoch, msg.batch, deque(by_layer[k] for k in sorted(by_layer))))

    def poll(self) -> list[tuple[int, int, int, float]]:
        """Post the next layer of each batch, test transfers; return finished
        ``(epoch, batch, bytes, seconds)``."""
        done = []
        # Post from the oldest batch that still has layers to post: every rank then posts
        # all of batch k before batch k+1, so each pair of ranks sees one order (NCCL needs it).
        posting = next((b for b in self._batches if b.layers), None)
        if posting is not None:
            for move in posting.layers.popleft():
                posting.bytes_moved += self._post(move, posting.handles)
        for b in list(self._batches):
            b.handles = [h for h in b.handles if not h.test()]
            if not b.layers and not b.handles:
                self._batches.remove(b)
                done.append((b.epoch, b.batch, b.bytes_moved, time.monotonic() - b.started))
        return done

    def abort(self, epoch: int, batch: int) -> None:
        for b in [b for b in self._batches if (b.epoch, b.batch) == (epoch, batch)]:
            for h in b.handles:
                h.wait()  # a posted transfer cannot be taken back safely; let it land
            self._batches.remove(b)

    def _post(self, move: KvMove, handles: list[Handle]) -> int:
        nbytes = 0
        data = self.kv.data
        for s, d, n in coalesce(move.src_pages, move.dst_pages):
            nbytes += n * self.kv.page_bytes
            if move.src_rank == move.dst_rank:
                data[d:d + n] = data[s:s + n].clone()  # local: from the extension to the base region
            elif move.src_rank == self.rank:
                handles.append(self.transport.isend(data[s:s + n], move.dst_rank, TAG_KV))
            else:
                handles.append(self.transport.irecv(data[d:d + n], move.src_rank, TAG_KV))
        return nbytes
