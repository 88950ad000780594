"""Token-budget continuous batching for one instance (the vLLM-style baseline policy).

Every step: running requests first (decodes and unfinished prefill chunks), then waiting
requests in FCFS order while their KV fits. A request's computed tokens catch up with its
tokens by chunks, so chunked prefill and decode are one mechanism. When a running request
cannot grow, the newest running request is preempted: its KV is dropped and it is
recomputed later, or, with a ``swapper`` (swap preemption, see ``orchestrator.core.swap``), its
KV goes to host memory and is swapped back in when it is rescheduled.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engines.errors import RequestError
from engines.step import SeqChunk, StepInput, StepOutput
from orchestrator.core.block_manager import BlockManager
from orchestrator.core.request import Request, RequestStatus

if TYPE_CHECKING:  # the scheduler never touches tensors; only the protocol's type is used
    from orchestrator.core.swap import Swapper

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step."""

    max_num_batched_tokens: int = 512
    """Token budget of a step (prefill chunk tokens plus one per decode)."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    preemption_mode: str = "recompute"
    """What preemption does with a request's KV: ``recompute`` (drop it) or ``swap`` (to host
    memory and back; needs the instance's KV on one rank)."""
    swap_space_bytes: int = 4 << 30
    enable_prefix_caching: bool = True
    """Share full KV pages between requests with a common prefix (``prefix_cache.py``); on by
    default, as in vLLM's v1 engine. The one definition of the default."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be recompute or swap, got {self.preemption_mode!r}")


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int
    start: int | None = None
    """First position of the chunk; None means the request's computed tokens. A pipeline
    leader sets it when one request has chunks in several micro-batches in flight."""


@dataclass
class SchedulerOutput:
    """What one step computes, and the requests preempted to make room for it."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def to_step(self) -> StepInput:
        """The step message for the runners (token ids included for the first stage)."""
        out = []
        for c in self.chunks:
            r = c.request
            start = r.num_computed_tokens if c.start is None else c.start
            end = start + c.num_tokens
            sample = end == r.num_tokens
            history = sample and r.sampling.needs_history
            first_row, targets = r.prompt_targets(start, end)
            out.append(SeqChunk(
                seq_id=r.seq_id, num_computed=start, num_tokens=c.num_tokens,
                block_table=r.block_table, token_ids=r.token_ids(start, end),
                sample=sample, sampling=r.sampling, output_index=len(r.output_token_ids),
                history=r.all_token_ids if history else None,
                num_prompt_tokens=len(r.prompt_token_ids) if history else 0,
                prompt_targets=targets, prompt_target_row=first_row))
        return StepInput(chunks=out)


class Scheduler:
    """Decides each step's chunks; owns the waiting and running queues of one instance."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager,
                 eos_token_ids: tuple[int, ...] = (), swapper: Swapper | None = None) -> None:
        """``swapper``: preempt by swapping KV to host memory; None preempts by recompute."""
        if swapper is not None and len(blocks.specs) != 1:
            from orchestrator.core.swap import ONE_RANK_ONLY
            raise NotImplementedError(ONE_RANK_ONLY.format(len(blocks.specs)))
        self.config = config
        self.blocks = blocks
        self.swapper = swapper
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counts: Counter[str] = Counter()
        """Events since the instance's last report (preemptions, swaps), for the cluster's totals."""

    def add(self, req: Request) -> None:
        """Queue a request, refusing one that could never fit this instance's KV pool."""
        if not self.blocks.fits_alone(req.num_tokens + 1):
            raise RequestError(
                f"prompt of {req.num_tokens} tokens does not fit the KV cache, "
                f"which holds {self.blocks.token_capacity()} tokens per request")
        self.waiting.append(req)

    def adopt(self, req: Request) -> None:
        """Take over a request from another instance as it is (KV pages already set)."""
        if req.num_computed_tokens > 0:
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        else:
            req.status = RequestStatus.WAITING if not req.num_preemptions else RequestStatus.PREEMPTED
            self.waiting.append(req)

    def release(self, req: Request) -> None:
        """Let go of a request handed to another instance (its pages go with it).

        A swapped request's KV cannot follow it (it is in this instance's host memory):
        it is dropped, and the request leaves to be recomputed.
        """
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if req.swapped:
            self._discard_swap(req)
            req.num_computed_tokens = 0

    def preempt(self, req: Request) -> None:
        """Drop a running request's KV; it is recomputed later (a fallback, e.g. for a failed move).

        Never swaps: the KV may be stale after a failed move.
        """
        self._preempt(req, swap=False)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, busy: set[int] | frozenset[int] = frozenset(),
                 max_seqs: int | None = None, token_budget: int | None = None) -> SchedulerOutput:
        """Pick this step's chunks.

        ``busy`` holds the seq ids of requests in a micro-batch still in flight: they are
        neither scheduled nor preempted. ``max_seqs`` caps the requests in this step (a
        pipeline leader splits the work into several micro-batches); ``token_budget``
        replaces the configured one (a leader forming several micro-batches at once).
        """
        out = SchedulerOutput()
        budget = token_budget or self.config.max_num_batched_tokens
        limit = max_seqs or self.config.max_num_seqs
        running = RequestStatus.RUNNING
        for req in list(self.running):
            if budget == 0 or len(out.chunks) >= limit:
                break
            if req.status is not running or req.seq_id in busy:
                continue  # preempted earlier in this loop, or in flight
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n > 0 and self._make_room(req, n, out, busy):
                out.chunks.append(ScheduledChunk(req, n))
                budget -= n
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.chunks) < limit and not out.preempted):
            req = self.waiting[0]
            hit = self.blocks.match(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.blocks.allocate(req, n):
                if hit is not None:
                    self.blocks.unmatch(req)  # a waiting request holds no pages, shared ones included
                break  # FCFS: the head of the queue waits for pages, nobody overtakes it
            if hit is not None:
                self.counts["prefix_cache_queries"] += req.num_tokens  # tokens looked up, as vLLM counts
                self.counts["prefix_cache_hits"] += hit
                if req.first_scheduled_time is None:
                    req.num_cached_tokens = hit
            if req.swapped:  # pages for its computed tokens too: bring their KV back first
                self.swapper.swap_in(req)
                req.swapped = False
            self.waiting.popleft()
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
        return out

    def _make_room(self, req: Request, n: int, out: SchedulerOutput, busy: set[int] | frozenset[int]) -> bool:
        """Allocate for ``req``, preempting the newest idle running requests if needed."""
        while not self.blocks.allocate(req, n):
            victims = [r for r in reversed(self.running) if r.seq_id not in busy]
            victim = victims[0]  # req itself is idle, so there is always one
            if victim is req and len(self.running) == 1:
                self._finish(req, RequestStatus.FINISHED_ABORTED,
                             "the KV cache cannot hold this request alone")
                out.preempted.append(req)
                return False
            if victim is req and len(victims) == 1:
                return False  # only in-flight requests could make room: wait for them
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def requeue(self, req: Request) -> None:
        """Queue a request whose own KV pages the caller has already freed (a move that failed),
        to be recomputed from its tokens: a preemption, counted as one."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.blocks.forget(req)  # the cached blocks it shared lose a reference (and stay cached)
        req.num_computed_tokens = 0
        self._queue_preempted(req)

    def _preempt(self, req: Request, swap: bool = True) -> None:
        self.running.remove(req)
        # Swap out before freeing: the pages still hold the KV. A full swap space recomputes.
        req.swapped = swap and self.swapper is not None and self.swapper.swap_out(req)
        self.blocks.free(req)
        if req.swapped:
            req.num_swaps += 1
            self.counts["swaps"] += 1
        else:
            req.num_computed_tokens = 0
        self._queue_preempted(req)
        logger.debug("preempted %s (%s of %d tokens)", req.request_id,
                     "swap" if req.swapped else "recompute", req.num_computed_tokens or req.num_tokens)

    def _queue_preempted(self, req: Request) -> None:
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.counts["preemptions"] += 1
        self.waiting.appendleft(req)

    def update(self, sched: SchedulerOutput, result: StepOutput) -> list[Request]:
        """Apply a step's result; return the requests that finished."""
        sampled = dict(zip(result.sampled_seq_ids, result.tokens))
        logprobs = dict(zip(result.sampled_seq_ids, result.logprobs))
        scored_by_seq = result.prompt_logprobs
        cache_computed, running = self.blocks.cache_computed, RequestStatus.RUNNING
        finished = []
        for chunk in sched.chunks:
            req = chunk.request
            if req.status is not running:
                continue
            req.num_computed_tokens += chunk.num_tokens
            cache_computed(req)
            scored = scored_by_seq.get(req.seq_id) if scored_by_seq else None
            if scored:
                req.logprobs.prompt.extend(scored)
                req.logprobs.next_prompt_position += len(scored)
            if req.seq_id in sampled:
                if logprobs and logprobs.get(req.seq_id) is not None:
                    req.logprobs.output.append(logprobs[req.seq_id])
                req.output_token_ids.append(sampled[req.seq_id])
                status = self._stop_status(req)
                if status is not None:
                    self._finish(req, status)
                    finished.append(req)
        return finished

    def abort(self, req: Request, reason: str = "aborted") -> None:
        """Remove a request wherever it is and free its pages."""
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, RequestStatus.FINISHED_ABORTED, reason)

    def _stop_status(self, req: Request) -> RequestStatus | None:
        token = req.output_token_ids[-1]
        if not req.sampling.ignore_eos and token in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in req.sampling.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if req.num_tokens >= req.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus, error: str | None = None) -> None:
        if req in self.running:
            self.running.remove(req)
        self.blocks.free(req)
        if req.swapped:
            self._discard_swap(req)
        req.status = status
        req.error = error

    def _discard_swap(self, req: Request) -> None:
        self.swapper.discard(req)
        req.swapped = False
