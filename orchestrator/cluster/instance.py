"""The leader of an instance: schedules for it and drives its micro-batches.

A replica runs each step locally. A pp-g group keeps up to g micro-batches in flight: the
leader computes stage 0 of a micro-batch and passes its activations on while the later
stages work on the earlier micro-batches; the last stage returns the sampled tokens. A
request belongs to at most one micro-batch in flight (its next token depends on the last).
"""

from __future__ import annotations


import itertools
import logging
import math
from collections import Counter
from dataclasses import replace

from engines.errors import RequestError
from engines.mapping import LayerRange
from engines.step import SeqChunk, StepInput, StepOutput
from orchestrator.core.block_manager import BlockManager, PoolSpec
from orchestrator.core.prefix_cache import CachedBlock
from orchestrator.cluster.messages import (AddRequest, ExportedBlock, ExportedRequest, InstanceReport, StageResult,
                                           StageStep)
from engines.rank_engine import RankEngine
from orchestrator.contracts import InstanceStats, PoolUsage, TokenEvent
from orchestrator.core.request import Request
from orchestrator.kunserve.cost_model import CostModel
from orchestrator.kunserve.lookahead import WorkItem, form_microbatches
from orchestrator.core.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput

logger = logging.getLogger(__name__)


def _swap_space(cfg: SchedulerConfig, engine: RankEngine, pools: list[PoolSpec]):
    """Host swap space for swap preemption; a pipelined group (KV on several ranks) recomputes."""
    if cfg.preemption_mode != "swap" or len(pools) != 1:
        return None
    from orchestrator.core.swap import HostSwapSpace

    return HostSwapSpace(engine.kv, cfg.swap_space_bytes)


def stage_chunks(chunks: list[SeqChunk], first_layer: int, with_tokens: bool) -> list[SeqChunk]:
    """Chunks carrying the block-table rows of layers ``first_layer`` onwards."""
    return [replace(c, block_table=c.block_table[first_layer:],
                    token_ids=c.token_ids if with_tokens else None) for c in chunks]


def instance_stats(instance: int, ranks: tuple[int, ...], sched: Scheduler) -> InstanceStats:
    """An instance's load from its scheduler, in the token figures the load monitor reads
    (a stage's pool holds only its layers' pages); its event counts since they were cleared."""
    blocks = sched.blocks
    usage = blocks.usage()
    pools = [PoolUsage(r, used, total) for r, (used, total) in zip(ranks, usage)]
    per_token = [(len(spec.layers), blocks.page_size) for spec in blocks.specs]
    free = min((total - used) // n * ps for (used, total), (n, ps) in zip(usage, per_token))
    capacity = blocks.token_capacity()
    queued = sum(r.num_tokens for r in sched.waiting)
    demand = sum(r.num_tokens + 1 for r in sched.running) + queued
    return InstanceStats(instance, len(sched.waiting), len(sched.running), pools, capacity, demand,
                         capacity - free, queued, free, dict(sched.counts))


def schedule_microbatch(sched: Scheduler, busy: set[int], held: set[int], stages: int) -> SchedulerOutput:
    """One micro-batch of a ``stages``-stage instance: the requests not in flight (``busy``)
    nor held, at most an even share of them per micro-batch so that every stage has work."""
    active = len(sched.running) + len(sched.waiting) - len(held)
    return sched.schedule(busy | held, max_seqs=max(1, math.ceil(active / stages)))


class InstanceDriver:
    """Scheduler and micro-batch pipeline of one instance, run by its leader rank."""

    def __init__(self, instance: int, ranks: tuple[int, ...], ranges: list[LayerRange], pools: list[PoolSpec],
                 engine: RankEngine, sender, sched_config: SchedulerConfig,
                 cost_model: CostModel | None = None) -> None:
        self.instance = instance
        self.cost_model = cost_model
        """When set (and the instance is a group), micro-batches are formed jointly by lookahead."""
        self.token_budget = sched_config.max_num_batched_tokens
        self.ranks = ranks
        self.ranges = ranges
        self.shape = f"tp{engine.tp.size}xpp{len(ranks)}"
        """Its devices: ``tp.size`` tensor-parallel ranks in each of its stages."""
        self.sender = sender
        self.runner = engine.runner(ranges[0])
        if len(ranks) > 1:  # a group of g stages runs g micro-batches, each as large as a replica's
            sched_config = replace(sched_config, max_num_seqs=sched_config.max_num_seqs * len(ranks))
        self.swap_space = _swap_space(sched_config, engine, pools)
        blocks = BlockManager(engine.kv.page_size, pools, sched_config.enable_prefix_caching)
        self.scheduler = Scheduler(sched_config, blocks,
                                   eos_token_ids=engine.cfg.eos_token_ids, swapper=self.swap_space)
        self.requests: dict[str, Request] = {}
        self.sent: dict[str, int] = {}
        self.inflight: dict[int, SchedulerOutput] = {}
        self.busy: Counter[int] = Counter()
        """Seq id -> micro-batches in flight that hold it (a split prefill can be in several)."""
        self.pending_aborts: set[str] = set()
        self.held: set[int] = set()
        """Seq ids whose KV is being moved (stale after a drop): not schedulable yet."""
        self.paused = False
        """No new micro-batches (a restore is draining the instance)."""
        self.updates: list[TokenEvent] = []
        self._mb_ids = itertools.count()

    # Requests in and out -------------------------------------------------------------
    def add(self, msg: AddRequest) -> None:
        req = Request(msg.request_id, msg.prompt_token_ids, msg.sampling, msg.max_model_len,
                      output_token_ids=list(msg.output_token_ids))
        if req.output_token_ids:  # resumed: its prompt's log-probabilities were sent before its first token
            req.logprobs.next_prompt_position = len(req.prompt_token_ids)
        try:
            self.scheduler.add(req)
        except RequestError as exc:
            self.updates.append(TokenEvent(msg.request_id, [], True, "abort", str(exc)))
            return
        self.requests[req.request_id] = req
        self.sent[req.request_id] = len(req.output_token_ids)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.seq_id in self.busy or req.seq_id in self.held:
            self.pending_aborts.add(request_id)  # its pages are in use until its micro-batch returns
            return
        self.scheduler.abort(req, "aborted by the client")
        self._emit(req)

    def _emit(self, req: Request) -> None:
        new = req.output_token_ids[self.sent[req.request_id]:]
        finished = req.status.finished
        if new or finished:
            prompt_lps, output_lps = req.logprobs.drain()
            first = self.sent[req.request_id] == 0 and bool(new) and req.first_scheduled_time is not None
            self.updates.append(TokenEvent(
                req.request_id, list(new), finished, req.status.finish_reason, req.error,
                req.num_preemptions, req.num_migrations,
                queue_time_s=req.first_scheduled_time - req.arrival_time if first else None,
                num_cached_tokens=req.num_cached_tokens if first and self.blocks.cache is not None else None,
                instance=self.instance if first else None,
                instance_shape=self.shape if first else None,
                logprobs=output_lps if req.sampling.logprobs is not None else None,
                prompt_logprobs=prompt_lps if req.sampling.prompt_logprobs is not None and prompt_lps else None))
            self.sent[req.request_id] += len(new)
        if finished:
            del self.requests[req.request_id], self.sent[req.request_id]

    def report(self) -> InstanceReport:
        """Token updates since the last report, and the instance's load."""
        stats = instance_stats(self.instance, self.ranks, self.scheduler)
        self.scheduler.counts.clear()
        updates, self.updates = self.updates, []
        return InstanceReport(stats, updates)

    # Hand-over between instances (drop and restore) -----------------------------------------
    def export_requests(self, home: int) -> list[ExportedRequest]:
        """Give up every request (pages included) to another leader; nothing may be in flight.
        The cached blocks they share go with them once each (``export_blocks``)."""
        assert not self.inflight, "export with micro-batches in flight"
        out = []
        for req in list(self.requests.values()):
            self.scheduler.release(req)
            out.append(self._exported(req, req.block_table, home))
        self.requests.clear()
        self.sent.clear()
        return out

    def export_blocks(self) -> list[ExportedBlock]:
        """The cached blocks the exported requests share; the unreferenced ones are given back
        (a reshaped instance keeps only the KV its requests use)."""
        self.blocks.drop_unreferenced()
        return [ExportedBlock(b.hash, b.parent, b.tokens, b.pages) for b in self.blocks.shared_blocks()]

    def adopt_blocks(self, blocks: list[ExportedBlock], pool: int | list[int]) -> None:
        """Cache blocks handed over with requests, their pages in stage ``pool``'s pool, or
        (a list) each layer's in that layer's pool (taken out of the free lists); the
        requests that share them follow (``adopt``)."""
        if blocks:
            self._take([[b.pages[layer] for b in blocks] for layer in range(len(blocks[0].pages))], pool)
        for b in blocks:
            self.blocks.cache.register(CachedBlock(b.hash, b.parent, b.tokens, tuple(b.pages)))

    def adopt(self, er: ExportedRequest, pool: int | list[int] | None = None, held: bool = False) -> Request:
        """Take over an exported request. Its own pages are taken out of the free list of
        stage ``pool``'s pool first (a list: each layer's out of that layer's pool), or
        (``pool`` None) are already this instance's; the cached blocks it shares must be
        registered here already. A ``held`` request waits, unscheduled, until
        ``release_held`` (its KV is still moving)."""
        shared = len(er.prefix_hashes)
        if pool is not None:
            self._take([row[shared:] for row in er.block_table], pool)
        req = Request(er.request_id, er.prompt_token_ids, er.sampling, er.max_model_len,
                      arrival_time=er.arrival_time, output_token_ids=list(er.output_token_ids),
                      num_computed_tokens=er.num_computed_tokens, block_table=er.block_table,
                      num_preemptions=er.num_preemptions, num_migrations=er.num_migrations,
                      logprobs=er.logprobs)
        self.blocks.link_prefix(req, er.prefix_hashes)
        req.prefix_closed = er.prefix_closed
        req.first_scheduled_time = er.first_scheduled_time
        self.scheduler.adopt(req)
        self.requests[req.request_id] = req
        self.sent[req.request_id] = er.sent
        if held:
            self.held.add(req.seq_id)
        return req

    def _take(self, rows: list[list[int]], pool: int | list[int]) -> None:
        """Take the pages of ``rows`` (row i: layer i's) out of the free lists: all of stage
        ``pool``'s pool, or (a list) each layer's of that layer's pool; one pass per pool."""
        by_pool: dict[int, list[int]] = {}
        for layer, row in enumerate(rows):
            if row:
                by_pool.setdefault(pool if isinstance(pool, int) else pool[layer], []).extend(row)
        for i, pages in by_pool.items():
            self.blocks.take(i, pages)

    def hand_over(self, req: Request, block_table: list[list[int]], home: int) -> ExportedRequest:
        """Give one request to another leader whose pool already holds its KV (a migration);
        this instance's pages for it are freed."""
        self.held.discard(req.seq_id)
        self.scheduler.release(req)
        self.blocks.free(req)
        er = self._exported(req, block_table, home, migrated=True)
        del self.requests[req.request_id], self.sent[req.request_id]
        return er

    def _exported(self, req: Request, block_table: list[list[int]], home: int,
                  migrated: bool = False) -> ExportedRequest:
        shared = [] if migrated else [b.hash for b in req.prefix_blocks]  # a migration copies them
        return ExportedRequest(req.request_id, req.prompt_token_ids, list(req.output_token_ids), req.sampling,
                               req.max_model_len, req.num_computed_tokens, block_table, home,
                               self.sent[req.request_id], req.num_preemptions, req.arrival_time,
                               req.num_migrations + migrated, logprobs=req.logprobs, prefix_hashes=shared,
                               prefix_closed=req.prefix_closed and not migrated,
                               first_scheduled_time=req.first_scheduled_time)

    def hold(self, req: Request) -> None:
        """Schedule nothing more for ``req`` until ``release_held`` (a migration's last stop)."""
        self.held.add(req.seq_id)

    def release_held(self, req: Request) -> None:
        """A held request's KV has arrived: it may run (or be aborted, if that was asked)."""
        self.held.discard(req.seq_id)
        if req.request_id in self.pending_aborts:
            self.pending_aborts.discard(req.request_id)
            self.scheduler.abort(req, "aborted by the client")
            self._emit(req)

    def recompute(self, req: Request, pages: list[tuple[int, list[int]]] | None = None) -> None:
        """The one fallback of every mechanism whose KV move cannot happen: drop the request's
        KV and queue it to be recomputed from its tokens (a preemption, counted as one).

        ``pages``: (pool, pages) to free, when the request's pages are not where its block
        table says (a stale request after a drop); otherwise its block table is freed."""
        if pages is None:
            self.scheduler.preempt(req)
        else:
            for pool, run in pages:
                self.blocks.release(pool, run)
            self.scheduler.requeue(req)
        self.release_held(req)

    def pause(self) -> None:
        """Launch no new micro-batches (a restore drains the instance before it splits)."""
        self.paused = True

    @property
    def blocks(self) -> BlockManager:
        """The instance's pages (a protocol plans its moves with them)."""
        return self.scheduler.blocks

    def running(self) -> list[Request]:
        """Requests being decoded or prefilled now."""
        return list(self.scheduler.running)

    def audit(self) -> None:
        """Check every page is owned once and none leaked (after a protocol moved pages)."""
        self.blocks.audit(self.requests.values())

    # Steps ---------------------------------------------------------------------------
    def step(self) -> bool:
        """Launch what can run now; True if anything was launched."""
        if self.cost_model is not None and len(self.ranks) > 1:
            return self._step_lookahead()
        launched = False
        while not self.paused and len(self.inflight) < len(self.ranks):
            sched = schedule_microbatch(self.scheduler, set(self.busy), self.held, len(self.ranks))
            for req in sched.preempted:
                if req.status.finished:
                    self._emit(req)
            if not sched.chunks:
                break
            launched = True
            if len(self.ranks) == 1:
                self._finish_step(sched, self.runner.execute(sched.to_step()))
                break
            self._launch(sched)
        return launched

    def _step_lookahead(self) -> bool:
        """Form the free pipeline slots' micro-batches jointly, balanced by the cost model.

        The scheduler picks and allocates the work of all free slots at once (one token
        budget per slot); ``form_microbatches`` splits it into micro-batches of near-equal
        estimated time, splitting long prefills across them at cost-optimal points.
        """
        slots = len(self.ranks) - len(self.inflight)
        if self.paused or slots == 0:
            return False
        sched = self.scheduler.schedule(set(self.busy) | self.held, token_budget=slots * self.token_budget)
        for req in sched.preempted:
            if req.status.finished:
                self._emit(req)
        if not sched.chunks:
            return False
        by_seq = {c.request.seq_id: c for c in sched.chunks}
        items = [WorkItem(c.request.seq_id, c.request.num_computed_tokens, c.num_tokens,
                          c.request.num_computed_tokens >= len(c.request.prompt_token_ids))
                 for c in sched.chunks]
        stage_layers = max(len(r) for r in self.ranges)
        offset = {seq: by_seq[seq].request.num_computed_tokens for seq in by_seq}
        for planned in form_microbatches(items, slots, self.cost_model, self.token_budget, stage_layers):
            mb = SchedulerOutput()
            for p in planned:
                mb.chunks.append(ScheduledChunk(by_seq[p.seq_id].request, p.num_tokens, offset[p.seq_id]))
                offset[p.seq_id] += p.num_tokens
            self._launch(mb)
            self.scheduler.counts["lookahead_microbatches"] += 1
        # Tokens the plan left for later keep their pages; they are scheduled again next round.
        return True

    def _launch(self, sched: SchedulerOutput) -> None:
        mb = next(self._mb_ids)
        step = sched.to_step()
        own = self.ranges[0]
        out = self.runner.execute(StepInput(chunks=[replace(c, block_table=c.block_table[own.start:own.end])
                                                    for c in step.chunks]))
        nxt = StageStep(self.instance, mb, stage_chunks(step.chunks, self.ranges[1].start, False),
                        out.hidden.shape[0], out.hidden.shape[1], str(out.hidden.dtype).removeprefix("torch."))
        self.sender.send_stage(self.ranks[1], nxt, out.hidden)
        self.inflight[mb] = sched
        self.busy.update(c.request.seq_id for c in sched.chunks)  # Counter: one count per micro-batch

    def on_result(self, msg: StageResult) -> None:
        sched = self.inflight.pop(msg.microbatch)
        self.busy.subtract(c.request.seq_id for c in sched.chunks)
        self.busy = +self.busy  # drop the zero counts
        if msg.error:
            raise RuntimeError(f"instance {self.instance}: a later stage failed: {msg.error}")
        self._finish_step(sched, msg.step_output())

    def _finish_step(self, sched: SchedulerOutput, out: StepOutput) -> None:
        self.scheduler.update(sched, out)
        for chunk in sched.chunks:
            req = chunk.request
            if req.request_id in self.pending_aborts and req.seq_id not in self.busy:
                self.pending_aborts.discard(req.request_id)
                if not req.status.finished:
                    self.scheduler.abort(req, "aborted by the client")
            if req.request_id in self.requests:
                self._emit(req)


class StageWorker:
    """A non-leader stage: runs micro-batches as they arrive and passes them on."""

    def __init__(self, instance: int, ranks: tuple[int, ...], stage: int, ranges: list[LayerRange],
                 engine: RankEngine, sender) -> None:
        self.instance = instance
        self.ranks = ranks
        self.stage = stage
        self.ranges = ranges
        self.runner = engine.runner(ranges[stage])
        self.sender = sender
        self.is_last = stage == len(ranks) - 1

    def on_step(self, msg: StageStep, hidden) -> None:
        own = len(self.ranges[self.stage])
        chunks = [replace(c, block_table=c.block_table[:own]) for c in msg.chunks]
        out = self.runner.execute(StepInput(chunks=chunks, hidden=hidden))
        if self.is_last:
            result = StageResult(self.instance, msg.microbatch, out.sampled_seq_ids, out.tokens,
                                 logprobs=out.logprobs, prompt_logprobs=out.prompt_logprobs)
            self.sender.send_result(self.ranks[0], result)
            return
        nxt = replace(msg, chunks=[replace(c, block_table=c.block_table[own:]) for c in msg.chunks])
        self.sender.send_stage(self.ranks[self.stage + 1], nxt, out.hidden)



