"""A drop's exchange and a restore with prefix caching, planned on one process (no model,
no MPI): the KV moves they post, the pages they take, give back and share.

Two replicas of a 4-layer model become a pp=2 group (layers 0-1 on rank 0, 2-3 on rank 1)
and split again. Rank 0 holds requests A and B sharing cached blocks P1 and P2, and an
unreferenced cached block; rank 1 holds C, which shares an equal P1 of its own, and D,
which shares nothing. The moves each protocol posts are recorded instead of performed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from engines.mapping import LayerRange
from engines.sampling import SamplingParams
from orchestrator.cluster.faults import Faults
from orchestrator.cluster.formation import Formation
from orchestrator.cluster.instance import InstanceDriver
from orchestrator.cluster.messages import (BatchId, ExchangeAbort, ExchangeBatch, ExchangeDone, MemberReady,
                                           MovePurpose, SplitGroup)
from orchestrator.cluster.split import Split
from orchestrator.core.block_manager import PoolSpec
from orchestrator.core.request import Request, RequestStatus
from orchestrator.core.scheduler import SchedulerConfig

PS, LAYERS, BASE, GROWN = 4, 4, 40, 64
P1, P2 = [1, 2, 3, 4], [5, 6, 7, 8]
ENGINE = SimpleNamespace(kv=SimpleNamespace(page_size=PS, page_bytes=64), runner=lambda layers: None, tp=SimpleNamespace(size=1),
                         cfg=SimpleNamespace(eos_token_ids=[], num_hidden_layers=LAYERS, tie_word_embeddings=True))
CONFIG = SchedulerConfig(enable_prefix_caching=True)
FULL = LayerRange(0, LAYERS)
RANGES = [LayerRange(0, 2), LayerRange(2, 4)]


@dataclass
class FakeContext:
    """A leader rank as Formation and Split see it; what they send is recorded."""

    rank: int = 0
    engine: object = field(default_factory=lambda: ENGINE)
    messenger: object = None
    sched_config: SchedulerConfig = CONFIG
    cost_model: object = None
    faults: Faults = field(default_factory=Faults)
    role: object = None
    sent: list[tuple[int, object]] = field(default_factory=list)
    to_ctl: list[object] = field(default_factory=list)
    driver: InstanceDriver | None = None

    def take_role(self, role, driver=None, worker=None):
        self.driver = driver

    def send_to_rank(self, rank, msg):
        self.sent.append((rank, msg))

    def to_controller(self, msg):
        self.to_ctl.append(msg)

    def batches(self, purpose: MovePurpose) -> dict[int, ExchangeBatch]:
        return {m.id.batch: m for _, m in self.sent if isinstance(m, ExchangeBatch) and m.id.purpose == purpose}


def replica(rank: int) -> InstanceDriver:
    return InstanceDriver(rank, (rank,), [FULL], [PoolSpec(FULL, BASE)], ENGINE, None, CONFIG)


def running(driver: InstanceDriver, rid: str, prompt: list[int]) -> Request:
    """A request whose prompt is computed (its full blocks cached or shared), as after a step."""
    req = Request(rid, list(prompt), SamplingParams(max_tokens=8), 512)
    blocks = driver.blocks
    blocks.match(req)
    assert blocks.allocate(req, req.num_tokens - req.num_computed_tokens)
    req.num_computed_tokens = req.num_tokens
    blocks.cache_computed(req)
    req.status = RequestStatus.RUNNING
    driver.scheduler.running.append(req)
    driver.requests[rid], driver.sent[rid] = req, 0
    return req


def member_ready(driver: InstanceDriver, rank: int) -> MemberReady:
    exported = driver.export_requests(home=rank)
    return MemberReady(rank, 1, GROWN, BASE, exported, driver.export_blocks())


def members() -> tuple[MemberReady, MemberReady]:
    r0, r1 = replica(0), replica(1)
    running(r0, "A", P1 + P2 + [9, 10])
    running(r0, "B", P1 + P2 + [11])
    gone = running(r0, "old", [20, 21, 22, 23, 24])  # finished: its block stays cached, unreferenced
    r0.scheduler.abort(gone)
    del r0.requests["old"], r0.sent["old"]
    running(r1, "C", P1 + [12, 13])
    running(r1, "D", [30, 31, 32])  # no full block: nothing to share
    assert len(r0.blocks.cache.lru) == 1
    return member_ready(r0, 0), member_ready(r1, 1)


def formed(ctx: FakeContext) -> Formation:
    f = Formation(ctx, (0, 1), RANGES, epoch=1)
    for msg in members():
        f.on_member_ready(msg)
    f.poll()  # launch the request batches
    return f


def land(f, ctx: FakeContext, purpose=MovePurpose.EXCHANGE, skip=()) -> None:
    """Every rank reports every batch of ``purpose`` done (but those in ``skip``)."""
    for batch, msg in ctx.batches(purpose).items():
        if batch in skip:
            continue
        for rank in sorted({r for m in msg.moves for r in (m.src_rank, m.dst_rank)}):
            f.on_exchange_done(ExchangeDone(rank, BatchId(purpose, 1, batch), 64))


def test_a_member_gives_back_unreferenced_blocks_and_exports_shared_ones_once():
    m0, m1 = members()
    assert len(m0.blocks) == 2 and len(m1.blocks) == 1  # P1, P2 on rank 0; C's P1 on rank 1
    assert [len(er.prefix_hashes) for er in m0.requests] == [2, 2] and m0.requests[0].prefix_hashes[0] == m1.blocks[0].hash
    assert m1.requests[1].prefix_hashes == []


def test_the_drop_moves_each_shared_page_once_and_keeps_it_shared():
    ctx = FakeContext()
    f = formed(ctx)
    batches = ctx.batches(MovePurpose.EXCHANGE)
    block_moves = [m for m in batches[0].moves]
    # P1 is cached on both members: each layer's page comes from the member that runs it,
    # so it does not move at all. P2 (rank 0 only) moves its pages of layers 2-3, once,
    # although A and B share it.
    assert all(m.block is not None for m in block_moves)
    assert sorted((m.layer, m.src_rank, m.dst_rank) for m in block_moves) == [(2, 0, 1), (3, 0, 1)]
    own = [m for b, msg in batches.items() if b > 0 for m in msg.moves]
    assert all(m.block is None for m in own)
    assert sorted((m.request_id, m.layer) for m in own) == [
        ("A", 2), ("A", 3), ("B", 2), ("B", 3), ("C", 0), ("C", 1), ("D", 0), ("D", 1)]
    a = ctx.driver.requests["A"]
    assert all(len(m.src_pages) == 1 for m in own if m.request_id in "AB")  # only the pages after the blocks
    # Until P2 lands, a new request hits P1 only (P2 is not served while it moves).
    probe = Request("probe", P1 + P2 + [99], SamplingParams(max_tokens=1), 512)
    assert ctx.driver.blocks.match(probe) == PS
    ctx.driver.blocks.unmatch(probe)
    land(f, ctx, skip={0})
    assert ctx.driver.held  # A and B wait for P2, though their own pages have landed
    assert {r.request_id for r in ctx.driver.requests.values() if r.seq_id in ctx.driver.held} == {"A", "B"}
    land(f, ctx, skip=set(batches) - {0})
    assert f.poll() and not ctx.driver.held and f.recomputed == 0 and f.shared.pages_moved == 2
    b = ctx.driver.requests["B"]
    assert a.prefix_blocks[0] is b.prefix_blocks[0] is ctx.driver.requests["C"].prefix_blocks[0]
    assert a.prefix_blocks[1] is b.prefix_blocks[1] and a.prefix_blocks[1].refs == 2
    blocks = ctx.driver.blocks
    for layer in range(LAYERS):
        assert a.block_table[layer][:2] == [blk.pages[layer] for blk in a.prefix_blocks]
    blocks.audit(ctx.driver.requests.values())  # also run by the formation when done
    assert blocks.match(probe) == 2 * PS  # a hit inside the group, on the pages it holds
    [event] = [m for m in ctx.to_ctl if getattr(m, "kind", None) is not None and m.kind.value == "exchange"]
    assert event.detail["block_pages"] == 2 and event.detail["recomputed"] == 0


def test_a_shared_block_whose_move_times_out_recomputes_only_its_sharers():
    ctx = FakeContext()
    f = formed(ctx)
    f.pending[0].deadline = 0.0  # the block batch times out; the request batches land
    f.poll()
    assert any(isinstance(m, ExchangeAbort) and m.id.batch == 0 for _, m in ctx.sent)
    land(f, ctx, skip={0})
    assert f.poll()
    reqs = ctx.driver.requests
    assert [reqs[r].num_preemptions for r in "ABCD"] == [1, 1, 0, 0] and f.recomputed == 2
    assert reqs["A"].num_computed_tokens == 0 and not reqs["A"].prefix_blocks
    assert len(ctx.driver.blocks.cache.blocks) == 1 and reqs["C"].prefix_blocks[0].refs == 1  # P2 forgotten
    ctx.driver.blocks.audit(reqs.values())


def test_the_restore_copies_a_shared_block_once_per_member_and_it_is_shared_there():
    ctx = FakeContext()
    f = formed(ctx)
    land(f, ctx)
    assert f.poll()
    group = ctx.driver
    ctx.sent.clear()
    split = Split(ctx, group, epoch=1)
    split.poll(exchanging=False)
    [msg] = ctx.batches(MovePurpose.RESTORE).values()
    block_moves = [(m.block, m.layer, m.dst_rank) for m in msg.moves if m.block is not None]
    assert block_moves and len(block_moves) == len(set(block_moves))  # one copy per block, layer and member
    for rank in (0, 1):
        split.on_exchange_done(ExchangeDone(rank, split.batch_id))
    orders = {r: m for r, m in ctx.sent if isinstance(m, SplitGroup)}
    assert sorted(er.request_id for m in orders.values() for er in m.requests) == ["A", "B", "C", "D"]
    for rank, order in orders.items():  # each member serves its requests with their blocks shared
        member = replica(rank)
        member.blocks.allocators[0] = type(member.blocks.allocators[0])(GROWN)
        member.adopt_blocks(order.blocks, pool=0)
        for er in order.requests:
            assert all(p < BASE for row in er.block_table for p in row), "KV left in the extension"
            member.adopt(er, pool=0)
        member.audit()  # references are the requests that list each block; no page owned twice
        if {"A", "B"} <= set(member.requests):
            a, b = member.requests["A"], member.requests["B"]
            assert a.prefix_blocks[1] is b.prefix_blocks[1] and a.prefix_blocks[1].refs == 2
            assert a.block_table[3][:2] == b.block_table[3][:2]  # the same pages, shared again
            probe = Request("probe", P1 + P2 + [99], SamplingParams(max_tokens=1), 512)
            assert member.blocks.match(probe) == 2 * PS  # a hit after the restore
    for order in orders.values():  # a member gets each block its requests share, once
        hashes = [b.hash for b in order.blocks]
        assert len(hashes) == len(set(hashes))
        assert set(hashes) == {h for er in order.requests for h in er.prefix_hashes}


@pytest.mark.parametrize("caching", [False])
def test_without_caching_nothing_is_shared(caching):
    r0 = InstanceDriver(0, (0,), [FULL], [PoolSpec(FULL, BASE)], ENGINE, None,
                        SchedulerConfig(enable_prefix_caching=caching))
    running(r0, "A", P1 + P2 + [9])
    running(r0, "B", P1 + P2 + [9])
    ready = member_ready(r0, 0)
    assert ready.blocks == [] and all(er.prefix_hashes == [] for er in ready.requests)
