"""KvMover without MPI: which messages each member posts for an exchange batch.

The members of a pair must post matching messages in the same order (tags match by
order); the turns that bound the work per loop turn are cut from the whole batch, so every
member cuts them alike. A recording transport stands in for MPI here; the bytes really
moving are covered by the transport tests and the drop/restore cluster tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from orchestrator.cluster import kv_mover
from orchestrator.cluster.kv_mover import KvMover
from orchestrator.cluster.messages import BatchId, ExchangeBatch, KvMove, MovePurpose
from orchestrator.transport import Handle, Transport

PAGE_BYTES = 1024


class Done(Handle):
    def test(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class Recording(Transport):
    """Records rows transfers as ``(kind, peer, rows)``; every transfer completes at once."""

    name = "recording"

    def __init__(self) -> None:
        self.log: list[tuple[str, int, list[int]]] = []

    def isend(self, tensor, dst, tag):
        raise AssertionError("the mover sends pages as rows")

    irecv = isend

    def isend_rows(self, tensor, rows, dst, tag):
        self.log.append(("send", dst, list(rows)))
        return Done()

    def irecv_rows(self, tensor, rows, src, tag):
        self.log.append(("recv", src, list(rows)))
        return Done()


def mover(rank: int) -> tuple[KvMover, Recording]:
    pool = SimpleNamespace(data=torch.zeros(64, PAGE_BYTES // 4), page_bytes=PAGE_BYTES)
    t = Recording()
    return KvMover(rank, pool, t), t


BATCH = BatchId(MovePurpose.EXCHANGE, epoch=1, batch=0)


def batch() -> ExchangeBatch:
    """Three members, moves in both directions, layers interleaved as the leader sorts them."""
    moves = []
    for layer in range(6):
        moves.append(KvMove(f"a{layer}", layer, 0, [layer, layer + 10], 1, [20 + layer, 30 + layer]))
        moves.append(KvMove(f"b{layer}", layer, 1, [40 + layer], 0, [50 + layer]))
        if layer % 2:
            moves.append(KvMove(f"c{layer}", layer, 2, [layer], 0, [56 + layer]))
    return ExchangeBatch(BATCH, moves)


def run(rank: int) -> tuple[list, int]:
    m, t = mover(rank)
    m.start(batch())
    while m.busy:
        done = m.poll()
    assert done and (done[0].rank, done[0].id) == (rank, BATCH)
    return t.log, done[0].bytes_moved


@pytest.mark.parametrize("turn_bytes", [1 << 30, 5 * PAGE_BYTES, PAGE_BYTES])
def test_pairs_post_matching_messages_in_one_order(monkeypatch, turn_bytes):
    monkeypatch.setattr(kv_mover, "BYTES_PER_TURN", turn_bytes)
    logs = {rank: run(rank)[0] for rank in (0, 1, 2)}
    for a in logs:
        for b in logs:
            if a == b:
                continue
            sent = [rows for kind, peer, rows in logs[a] if kind == "send" and peer == b]
            got = [rows for kind, peer, rows in logs[b] if kind == "recv" and peer == a]
            assert [len(r) for r in sent] == [len(r) for r in got], (a, b)


def test_one_message_per_pair_per_turn_layers_in_order(monkeypatch):
    monkeypatch.setattr(kv_mover, "BYTES_PER_TURN", 1 << 30)  # the whole batch in one turn
    log, received = run(1)
    assert log == [("recv", 0, [20, 30, 21, 31, 22, 32, 23, 33, 24, 34, 25, 35]),
                   ("send", 0, [40, 41, 42, 43, 44, 45])]
    assert received == 12 * PAGE_BYTES


def test_turns_are_bounded_by_the_whole_batchs_bytes(monkeypatch):
    # Layers move 3 pages (even) or 4 pages (odd) in all: 5 pages a turn cuts after every
    # second layer, on every member, whether or not it takes part in each layer.
    monkeypatch.setattr(kv_mover, "BYTES_PER_TURN", 5 * PAGE_BYTES)
    log, _ = run(2)
    assert log == [("send", 0, [1]), ("send", 0, [3]), ("send", 0, [5])]
    log, _ = run(1)
    assert [kind for kind, _, _ in log] == ["recv", "send"] * 3
