"""Moving KV pages between ranks' pools: the member side of an exchange batch.

Every member gets the same ordered list of moves from the leader and performs those it is
part of, in list order, so the sends of one rank and the receives of its peer match up.
A batch is posted in turns of whole layers, a bounded number of bytes per turn of the
rank loop, so pipeline steps run in between; within a turn, the pages going from one rank
to another travel as one message, layer after layer, straight from pool memory into pool
memory (``Transport.isend_rows``/``irecv_rows``).

A rank that leads a tensor-parallel set tells its followers (``MoveMirror``) when a batch
starts, before posting any of it, and when its part has landed or was given up: each
follower moves its own KV heads of the same pages with its peers (``post_all``, ``finish``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engines.kv_cache import KVPool
from orchestrator.cluster.messages import TAG_KV, BatchId, ExchangeBatch, ExchangeDone, KvMove
from orchestrator.transport import Handle, Transport

logger = logging.getLogger(__name__)

BYTES_PER_TURN = 128 << 20
"""A turn of the rank loop posts whole layers of a batch until they move this many bytes
(all members together): large enough that the transfers run near the link's speed, small
enough that a pipeline step runs between two turns."""


def _by_layer(moves: list[KvMove]) -> list[tuple[int, list[KvMove]]]:
    """The moves grouped by layer, layers ascending, each group in list order."""
    out: dict[int, list[KvMove]] = {}
    for m in moves:
        out.setdefault(m.layer, []).append(m)
    return sorted(out.items())


class MoveMirror(Protocol):
    """Told of this rank's batches (a TP set's leader: its followers move their shards alike)."""

    def moves_started(self, msg: ExchangeBatch) -> None: ...

    def moves_finished(self, batch: BatchId) -> None: ...


@dataclass
class _Batch:
    id: BatchId
    turns: deque  # deque[list[KvMove]]: this rank's moves, one list per turn of whole layers, in order
    handles: list[Handle] = field(default_factory=list)
    bytes_moved: int = 0
    started: float = field(default_factory=time.monotonic)


class KvMover:
    """Performs this rank's part of exchange batches."""

    def __init__(self, rank: int, kv: KVPool, transport: Transport, mirror: MoveMirror | None = None) -> None:
        self.rank = rank
        self.kv = kv
        self.transport = transport
        self.mirror = mirror
        self._batches: list[_Batch] = []

    @property
    def busy(self) -> bool:
        return bool(self._batches)

    def start(self, msg: ExchangeBatch) -> None:
        """Queue this rank's part of a batch, in turns of whole layers.

        The turns are cut from the whole batch's move list, which every member has, so the
        members of a pair agree on which layers each message carries.
        """
        if self.mirror is not None:
            self.mirror.moves_started(msg)
        turns: list[list[KvMove]] = []
        turn_bytes = BYTES_PER_TURN
        for layer, moves in _by_layer(msg.moves):
            if turn_bytes >= BYTES_PER_TURN:
                turns.append([])
                turn_bytes = 0
            turns[-1] += [m for m in moves if self.rank in (m.src_rank, m.dst_rank)]
            turn_bytes += sum(len(m.src_pages) for m in moves) * self.kv.page_bytes
        self._batches.append(_Batch(msg.id, deque(t for t in turns if t)))

    def poll(self) -> list[ExchangeDone]:
        """Post the next turn of the oldest batch, test transfers; return this rank's
        completions of the batches that finished (bytes received here, seconds taken)."""
        done = []
        # Post from the oldest batch that still has turns to post: every rank then posts
        # all of batch k before batch k+1, so each pair of ranks sees one order (NCCL needs it).
        posting = next((b for b in self._batches if b.turns), None)
        if posting is not None:
            posting.bytes_moved += self._post_turn(posting.turns.popleft(), posting.handles)
        for b in list(self._batches):
            b.handles = [h for h in b.handles if not self._land(h)]
            if not b.turns and not b.handles:
                self._batches.remove(b)
                if self.mirror is not None:
                    self.mirror.moves_finished(b.id)
                done.append(ExchangeDone(self.rank, b.id, b.bytes_moved, time.monotonic() - b.started))
        return done

    def abort(self, batch: BatchId) -> None:
        self.finish(batch)
        if self.mirror is not None:
            self.mirror.moves_finished(batch)

    def post_all(self) -> None:
        """Post every turn of every queued batch now, in order (a TP follower, which runs
        no loop of its own between its leader's orders)."""
        for b in self._batches:
            while b.turns:
                b.bytes_moved += self._post_turn(b.turns.popleft(), b.handles)

    def finish(self, batch: BatchId) -> int:
        """Block until this rank's posted transfers of ``batch`` have landed, then forget it
        (a posted transfer cannot be taken back safely, so an aborted one lands too, unused;
        turns not yet posted are dropped, as the peers of an abort drop theirs). Returns the
        bytes it received."""
        received = 0
        for b in [b for b in self._batches if b.id == batch]:
            for h in b.handles:
                h.wait()
            self._batches.remove(b)
            received += b.bytes_moved
        return received

    def _post_turn(self, moves: list[KvMove], handles: list) -> int:
        """Post one turn's moves, one transfer per peer; returns the bytes this rank receives.

        A turn's pages going from one rank to another form one message, layer after layer,
        sent from the pages where they lie and received into their new pages
        (``Transport.isend_rows``: on one host the receiver copies them out of the sender's
        pool itself, elsewhere an MPI indexed datatype describes them; nothing is gathered
        or scattered in Python either way).
        """
        by_pair: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        for m in moves:
            src, dst = by_pair.setdefault((m.src_rank, m.dst_rank), ([], []))
            src.extend(m.src_pages)
            dst.extend(m.dst_pages)
        nbytes = 0
        data, dev = self.kv.data, self.kv.data.device
        for (src_rank, dst_rank), (src, dst) in by_pair.items():
            if dst_rank == self.rank:
                nbytes += len(src) * self.kv.page_bytes  # count what arrives here (and local copies)
            if src_rank == dst_rank:
                data.index_copy_(0, torch.as_tensor(dst, device=dev),
                                 data.index_select(0, torch.as_tensor(src, device=dev)))
            elif src_rank == self.rank:
                handles.append(self.transport.isend_rows(data, src, dst_rank, TAG_KV))
            else:
                handles.append(self.transport.irecv_rows(data, dst, src_rank, TAG_KV))
        return nbytes

    @staticmethod
    def _land(handle: Handle) -> bool:
        """True once a transfer is done (a transport that received into scratch memory
        has scattered it into the pages by then)."""
        return handle.test()
