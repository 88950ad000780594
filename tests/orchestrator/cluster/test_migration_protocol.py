"""The live-migration state machines, driven message by message (no MPI, no tensors):
the happy path, and every way a migration ends early without losing the request or a page."""

from __future__ import annotations

from collections import Counter

import pytest

from engines.sampling import SamplingParams
from orchestrator.core.block_manager import BlockManager
from orchestrator.cluster.messages import (BatchId, MovePurpose, ExchangeBatch, ExchangeDone, MigrationCancel,
                                           MigrationCommit, MigrationDone, MigrationOffer, MigrationReply,
                                           StartMigration)
from orchestrator.cluster.migration import HEADROOM_TOKENS, MigrationSource, MigrationState, MigrationTarget
from orchestrator.core.request import Request, RequestStatus
from orchestrator.core.scheduler import Scheduler, SchedulerConfig
from tests.orchestrator.core.pages import free_pages

LAYERS, PAGE = 2, 4


class FakeDriver:
    """What the migration code uses of an InstanceDriver: a real scheduler and block manager."""

    def __init__(self, pages: int = 64) -> None:
        self.ranks = (0,)
        self.paused = False
        self.scheduler = Scheduler(SchedulerConfig(), BlockManager.single(pages, PAGE, LAYERS))
        self.held: set[int] = set()
        self.busy: Counter[int] = Counter()
        self.pending_aborts: set[str] = set()
        self.updates: list = []
        self.handed: list = []
        self.adopted: list = []

    def start(self, tokens: int) -> Request:
        req = Request(f"r{tokens}", list(range(tokens)), SamplingParams(max_tokens=64), 512)
        self.scheduler.add(req)
        self.scheduler.schedule()
        req.num_computed_tokens = tokens
        return req

    def hand_over(self, req, block_table, home):
        self.scheduler.release(req)
        self.scheduler.blocks.free(req)
        self.handed.append((req.request_id, block_table, home))
        return ("exported", req.request_id, block_table)

    @property
    def blocks(self) -> BlockManager:
        return self.scheduler.blocks

    def running(self) -> list[Request]:
        return list(self.scheduler.running)

    def hold(self, req) -> None:
        self.held.add(req.seq_id)

    def release_held(self, req) -> None:
        self.held.discard(req.seq_id)

    def adopt(self, er, pool: int | None = None, held: bool = False) -> None:
        assert pool is None and not held  # the reservation's pages are the request's pages
        self.adopted.append(er)


class FakeLoop:
    def __init__(self, rank: int, driver: FakeDriver) -> None:
        self.rank, self.driver = rank, driver
        self.sent: list[tuple[int, object]] = []
        self.to_ctl: list = []

    def send_to_rank(self, rank: int, msg: object) -> None:
        self.sent.append((rank, msg))

    def to_controller(self, msg: object) -> None:
        self.to_ctl.append(msg)

    def last(self, kind, to: int | None = None):
        """Messages of ``kind`` sent so far (to rank ``to`` only, if given)."""
        return [m for r, m in self.sent if isinstance(m, kind) and (to is None or r == to)]


def setup(tokens: int = 20):
    src, dst = FakeLoop(0, FakeDriver()), FakeLoop(1, FakeDriver())
    req = src.driver.start(tokens)
    source, target = MigrationSource(src), MigrationTarget(dst)
    source.start(StartMigration(7, dst=1, dst_free_tokens=1000))
    offer = src.last(MigrationOffer)[0]
    assert offer.num_tokens == tokens + HEADROOM_TOKENS
    target.on_offer(offer)
    reply = dst.last(MigrationReply)[0]
    source.on_reply(reply)
    return src, dst, req, source, target, reply


def grow(driver: FakeDriver, req: Request, n: int) -> None:
    """Decoding went on: ``n`` more tokens computed (pages allocated first, as the scheduler does)."""
    assert driver.scheduler.blocks.allocate(req, n)
    req.num_computed_tokens += n


def finish_stage(source, batch: ExchangeBatch) -> None:
    for rank in (0, 1):
        source.on_exchange_done(ExchangeDone(rank, batch.id, 100))


def test_stages_then_a_short_stop_then_commit():
    src, dst, req, source, target, reply = setup()
    first = src.last(ExchangeBatch, to=0)[0]
    assert src.last(ExchangeBatch, to=1) == [first]  # the same batch for both movers
    assert first.id == BatchId(MovePurpose.MIGRATION, 7, 1) and len(first.moves) == LAYERS
    assert [len(m.src_pages) for m in first.moves] == [5, 5]  # 20 tokens = 5 pages of 4
    grow(src.driver, req, 10)  # decoding went on during the copy: 10 new tokens > a page
    finish_stage(source, first)
    second = src.last(ExchangeBatch, to=0)[1]
    assert [m.src_pages for m in second.moves] == [req.block_table[layer][5:8] for layer in range(LAYERS)]
    assert [m.dst_pages for m in second.moves] == [reply.block_table[layer][5:8] for layer in range(LAYERS)]
    grow(src.driver, req, 2)  # 2 new tokens: few enough to stop the request
    finish_stage(source, second)
    assert source.out[7].state == MigrationState.STOPPING and req.seq_id in src.driver.held
    source.poll()  # nothing in flight: the last stage goes
    final = src.last(ExchangeBatch, to=0)[2]
    assert source.out[7].state == MigrationState.FINAL
    # only page 7 again: it was partly filled when the last stage copied it
    assert [m.src_pages for m in final.moves] == [req.block_table[layer][7:8] for layer in range(LAYERS)]
    finish_stage(source, final)
    commit = src.last(MigrationCommit)[0]
    assert commit.migration_id == 7 and src.driver.handed[0][1] == reply.block_table
    done = src.to_ctl[-1]
    assert isinstance(done, MigrationDone) and done.ok and done.stages == 3 and done.bytes_moved == 300
    assert free_pages(src.driver.scheduler.blocks) == src.driver.scheduler.blocks.num_pages
    target.on_commit(commit)
    assert dst.driver.adopted and not target.reserved
    assert source.forward_abort(req.request_id) == 1  # a late abort is forwarded


def test_request_that_finishes_mid_copy_stays_and_the_reservation_is_freed():
    src, dst, req, source, target, _reply = setup()
    req.status = RequestStatus.FINISHED_STOPPED
    finish_stage(source, src.last(ExchangeBatch, to=0)[0])
    cancel = src.last(MigrationCancel)[0]
    done = src.to_ctl[-1]
    assert not done.ok and "left the running set" in done.reason and not source.out
    held_before = free_pages(dst.driver.scheduler.blocks)
    target.on_cancel(cancel)
    assert free_pages(dst.driver.scheduler.blocks) > held_before
    assert free_pages(dst.driver.scheduler.blocks) == dst.driver.scheduler.blocks.num_pages


def test_request_that_outgrows_the_reservation_is_not_moved():
    src, _dst, req, source, _target, _reply = setup()
    grow(src.driver, req, HEADROOM_TOKENS + 2 * PAGE)  # beyond what was reserved
    for _ in range(4):  # stages until the last one stops it
        batch = src.last(ExchangeBatch, to=0)[-1]
        finish_stage(source, batch)
        if source.out[7].state == MigrationState.STOPPING:
            break
    source.poll()
    done = src.to_ctl[-1]
    assert not done.ok and "outgrew" in done.reason
    assert req.seq_id not in src.driver.held and src.last(MigrationCancel)


def test_abort_during_the_final_stop_cancels_the_move():
    src, _dst, req, source, _target, _reply = setup()
    finish_stage(source, src.last(ExchangeBatch, to=0)[0])  # no new tokens: stop at once
    src.driver.pending_aborts.add(req.request_id)
    source.poll()
    done = src.to_ctl[-1]
    assert not done.ok and "aborted" in done.reason and not src.driver.handed


def test_destination_without_room_refuses():
    dst = FakeLoop(1, FakeDriver(pages=4))
    MigrationTarget(dst).on_offer(MigrationOffer(3, src=0, request_id="x", num_tokens=100))
    reply = dst.last(MigrationReply)[0]
    assert reply.block_table is None and "no free KV pages" in reply.reason


def _deliver_cancels(src: FakeLoop, target: MigrationTarget) -> None:
    for cancel in src.last(MigrationCancel, to=1):
        target.on_cancel(cancel)


@pytest.mark.parametrize("stage", list(MigrationState)[:-1])
def test_a_migration_ended_at_each_stage_keeps_the_request_and_frees_the_reservation(stage):
    """The migration ends early in OFFERED (the destination refuses), COPYING (the request
    finished), STOPPING (an abort while it waits to stop) or FINAL (an abort while the last
    pages travel): the request stays at the source with its pages, runs again (not held),
    nothing is handed over, and the destination's reservation is freed."""
    src, dst = FakeLoop(0, FakeDriver()), FakeLoop(1, FakeDriver(pages=4 if stage == MigrationState.OFFERED else 64))
    req = src.driver.start(20)
    pages_before = [list(row) for row in req.block_table]
    source, target = MigrationSource(src), MigrationTarget(dst)
    source.start(StartMigration(7, dst=1, dst_free_tokens=1000))
    target.on_offer(src.last(MigrationOffer)[0])
    source.on_reply(dst.last(MigrationReply)[0])
    if stage == MigrationState.COPYING:
        req.status = RequestStatus.FINISHED_STOPPED
        finish_stage(source, src.last(ExchangeBatch, to=0)[0])
    elif stage == MigrationState.STOPPING:
        finish_stage(source, src.last(ExchangeBatch, to=0)[0])
        assert source.out[7].state == MigrationState.STOPPING
        src.driver.pending_aborts.add(req.request_id)
        source.poll()
    elif stage == MigrationState.FINAL:
        finish_stage(source, src.last(ExchangeBatch, to=0)[0])
        source.poll()
        assert source.out[7].state == MigrationState.FINAL
        src.driver.pending_aborts.add(req.request_id)  # arrives while the last pages travel
        finish_stage(source, src.last(ExchangeBatch, to=0)[-1])
    _deliver_cancels(src, target)
    done = src.to_ctl[-1]
    assert isinstance(done, MigrationDone) and not done.ok, done
    assert not source.out and not src.driver.handed and req.seq_id not in src.driver.held
    assert req.block_table == pages_before  # its KV never left the source's pool
    assert not target.reserved and not dst.driver.adopted
    blocks = dst.driver.scheduler.blocks
    assert free_pages(blocks) == blocks.num_pages, "the destination kept a reservation"
