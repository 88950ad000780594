"""Lookahead batch formulation: the next g micro-batches of a pipeline group, formed jointly.

DESIGN.md section 2, step 6. A g-stage group keeps g micro-batches in flight; each stage
works on them in turn, so the slowest micro-batch sets the pace and the others leave
bubbles. The leader therefore forms the next g micro-batches together, so that their
estimated costs (``CostModel``) are as equal as possible.

The algorithm, for ``D`` decodes, ``P`` prefills and ``g`` micro-batches:

1. Decodes (in the given order, up to the ``g * token_budget`` slots) are indivisible:
   each goes whole into one micro-batch. Two placements are tried, because neither wins
   always. *Spread*: longest first onto the least loaded micro-batch with a slot left
   (LPT, a heap, ``O(D log D)``), best when the budgets leave room. *Early*: in order,
   each micro-batch filled up to the target below before the next (``O(D + g)``), best
   when the token budgets bind: every micro-batch is then full, a prefill's later tokens
   attend more context and cost more, so the later micro-batches should hold fewer of
   the other tokens.
2. Prefill tokens are then *poured* in FCFS order: micro-batch ``k`` takes tokens from the
   current prefill until its estimated cost reaches a target ``T`` or its token budget is
   spent, then the prefill continues in micro-batch ``k + 1`` where its chunk in ``k``
   ended. The split point ``n`` solves ``chunk_cost(n, s) <= T - load``, a quadratic in
   ``n``, in closed form. A later prefill gets tokens only once every earlier one is fully
   placed, so nothing overtakes an earlier prefill. One pour is ``O(P + g)``.
3. ``T`` is found by bisection: the smallest target at which every decode and as many
   prefill tokens as the budgets take at all (``min(prefill tokens, g * budget - D)``)
   are still placed. The amount a pour places only grows with ``T`` (the cost of a
   contiguous range of tokens only grows with the range), and the attention work of a
   prefill does not depend on where it is split, so with decodes fixed this is the
   min-max split up to the per-chunk overhead. About 15 pours per placement.
4. The plan with the lower estimated maximum is kept. At ``T = inf`` the early placement
   is the plain fill-in-order plan, so the result is never worse than that.

A uniform layer count scales every cost alike, so ``layers`` changes the estimates but not
the plan. Micro-batches that end up empty are left out.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.kunserve.cost_model import CostModel

logger = logging.getLogger(__name__)

# Bisection on the target stops when its bracket is this fraction of the target: finer
# than a split point resolves (with a budget of a few hundred tokens, one token is ~1e-3
# of a micro-batch), in about 15 pours.
_REL_TOLERANCE = 1e-4
_MAX_BISECTIONS = 60


@dataclass(frozen=True)
class WorkItem:
    """A sequence with work pending: a decode, or the rest of a prompt's prefill."""

    seq_id: int
    """The sequence (request) id; unique among the items of one call."""
    num_computed: int
    """Tokens already in the KV cache: the prefix ``s`` of the next chunk."""
    remaining: int
    """Tokens still to compute: 1 for a decode, the rest of the prompt for a prefill."""
    is_decode: bool
    """A decode goes whole into one micro-batch; a prefill may be split."""

    def __post_init__(self) -> None:
        if self.num_computed < 0 or self.remaining < 1:
            raise ValueError(f"sequence {self.seq_id}: num_computed must be >= 0 and remaining "
                             f">= 1, got {self.num_computed} and {self.remaining}")
        if self.is_decode and self.remaining != 1:
            raise ValueError(f"sequence {self.seq_id}: a decode has 1 token, got {self.remaining}")


@dataclass(frozen=True)
class PlannedChunk:
    """One sequence's share of one micro-batch."""

    seq_id: int
    """The sequence."""
    num_tokens: int
    """Tokens it computes in this micro-batch, continuing where its previous chunk ended."""


@dataclass
class _Pour:
    """The micro-batches one pour produced (decodes included)."""

    batches: list[list[PlannedChunk]]
    loads: list[float]
    placed: int
    """Prefill tokens placed."""

    @property
    def makespan(self) -> float:
        """Estimated seconds of the costliest non-empty micro-batch."""
        return max((load for b, load in zip(self.batches, self.loads) if b), default=0.0)


Placement = tuple[list[list[PlannedChunk]], list[float]]
"""Decodes placed in micro-batches, and each micro-batch's load so far."""


def form_microbatches(items: list[WorkItem], g: int, cost: CostModel, token_budget: int,
                      layers: int | None = None) -> list[list[PlannedChunk]]:
    """Form the next ``g`` micro-batches from ``items`` with near-equal estimated costs.

    ``items`` are in queue order; prefills keep that order (FCFS). Each micro-batch holds at
    most ``token_budget`` tokens and a sequence at most once. Work that does not fit waits
    for the next call. Returns at most ``g`` non-empty micro-batches, in pipeline order.
    """
    if g < 1 or token_budget < 1:
        raise ValueError(f"g and token_budget must be >= 1, got {g} and {token_budget}")
    ids = [it.seq_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("a sequence appears twice among the work items")
    decodes = [it for it in items if it.is_decode][:g * token_budget]
    prefills = [it for it in items if not it.is_decode]
    want = min(sum(p.remaining for p in prefills), g * token_budget - len(decodes))
    spread = _spread_decodes(decodes, g, cost, token_budget)
    # Costed once: the early placement is redone at every target of the bisection.
    costed = [(PlannedChunk(d.seq_id, 1), cost.chunk_cost(1, d.num_computed)) for d in decodes]
    plans = [_balance(lambda t: spread, prefills, cost, token_budget, want),
             _balance(lambda t: _early_decodes(costed, g, cost.fixed_s, token_budget, t),
                      prefills, cost, token_budget, want)]
    best = min(plans, key=lambda p: p.makespan)
    result = [b for b in best.batches if b]
    if logger.isEnabledFor(logging.DEBUG):
        costs = microbatch_costs(result, items, cost, layers)
        logger.debug("lookahead: %d micro-batches, estimated %s s", len(result),
                     ", ".join(f"{c:.4f}" for c in costs))
    return result


def _spread_decodes(decodes: list[WorkItem], g: int, cost: CostModel, token_budget: int) -> Placement:
    """Longest decode first onto the least loaded micro-batch with a slot left.

    Loads start at the step's fixed cost, so they are what ``step_cost`` would say once a
    micro-batch holds anything.
    """
    batches: list[list[PlannedChunk]] = [[] for _ in range(g)]
    loads = [cost.fixed_s] * g
    heap = [(cost.fixed_s, k) for k in range(g)]
    for d in sorted(decodes, key=lambda d: -d.num_computed):  # longest context, costliest
        load, k = heapq.heappop(heap)
        batches[k].append(PlannedChunk(d.seq_id, 1))
        loads[k] = load + cost.chunk_cost(1, d.num_computed)
        if len(batches[k]) < token_budget:  # a full micro-batch leaves the heap for good
            heapq.heappush(heap, (loads[k], k))
    return batches, loads


def _early_decodes(costed: list[tuple[PlannedChunk, float]], g: int, fixed_s: float,
                   token_budget: int, target: float) -> Placement | None:
    """Decodes (with their costs) in order, each micro-batch filled up to ``target`` before
    the next; None if they do not all fit."""
    batches: list[list[PlannedChunk]] = [[] for _ in range(g)]
    loads = [fixed_s] * g
    k = 0
    for chunk, c in costed:
        while k < g and (len(batches[k]) == token_budget or loads[k] + c > target):
            k += 1
        if k == g:
            return None
        batches[k].append(chunk)
        loads[k] += c
    return batches, loads


def _balance(place_decodes: Callable[[float], Placement | None], prefills: list[WorkItem],
             cost: CostModel, token_budget: int, want: int) -> _Pour:
    """The plan of least makespan, bisecting on the target, that places every decode and
    ``want`` prefill tokens. ``place_decodes(target)`` gives a Placement or None."""

    def attempt(target: float) -> _Pour | None:
        placement = place_decodes(target)
        if placement is None:
            return None
        trial = _pour(*placement, prefills, cost, token_budget, target)
        return trial if trial.placed == want else None

    best = attempt(math.inf)
    assert best is not None, "with no target every decode and prefill token that fits is placed"
    lo, hi = 0.0, best.makespan
    for _ in range(_MAX_BISECTIONS):
        if hi - lo <= _REL_TOLERANCE * hi:
            break
        mid = (lo + hi) / 2
        trial = attempt(mid)
        if trial is None:
            lo = mid
            continue
        hi = mid
        if trial.makespan <= best.makespan:
            best = trial
    return best


def _pour(batches: list[list[PlannedChunk]], loads: list[float], prefills: list[WorkItem],
          cost: CostModel, token_budget: int, target: float) -> _Pour:
    """Fill micro-batches in order with prefill tokens (FCFS) up to ``target`` seconds each."""
    out = [list(b) for b in batches]
    out_loads = list(loads)
    used = [len(b) for b in batches]
    k, placed = 0, 0
    for item in prefills:
        s, rem = item.num_computed, item.remaining
        while rem and k < len(out):
            n = min(rem, token_budget - used[k],
                    _max_tokens(cost, s, target - out_loads[k]))
            if n > 0:
                out[k].append(PlannedChunk(item.seq_id, n))
                out_loads[k] += cost.chunk_cost(n, s)
                used[k] += n
                s, rem, placed = s + n, rem - n, placed + n
            if rem:  # micro-batch k is full (by cost or by tokens): go on in the next
                k += 1
        if k == len(out):
            break
    return _Pour(out, out_loads, placed)


def _max_tokens(cost: CostModel, s: int, room: float) -> int | float:
    """The largest ``n`` with ``chunk_cost(n, s) <= room`` (inf when ``room`` is).

    ``chunk_cost(n, s) = a*n^2 + b*n + per_seq_s`` with ``a = per_attention_s / 2`` and
    ``b = per_token_s + per_attention_s * (s + 1/2)``: the positive root, then a check of
    the neighbours against rounding.
    """
    if room == math.inf:
        return math.inf
    c = room - cost.per_seq_s
    if c < 0:
        return 0
    a = cost.per_attention_s / 2
    b = cost.per_token_s + cost.per_attention_s * (s + 0.5)
    if a == 0 and b == 0:
        return math.inf  # a free chunk: only the token budget bounds it
    if a == 0:
        n = int(c / b)
    else:
        n = int((-b + math.sqrt(b * b + 4 * a * c)) / (2 * a))
    while n > 0 and cost.chunk_cost(n, s) > room:
        n -= 1
    while cost.chunk_cost(n + 1, s) <= room:
        n += 1
    return n


def microbatch_chunks(batch: list[PlannedChunk], items: list[WorkItem],
                      earlier: list[list[PlannedChunk]] | None = None) -> list[tuple[int, int]]:
    """The ``(n, s)`` of each chunk of ``batch``; ``earlier`` are the micro-batches before it.

    A sequence's prefix in a micro-batch is its ``num_computed`` plus the tokens its chunks
    in earlier micro-batches compute.
    """
    base = {it.seq_id: it.num_computed for it in items}
    for prev in earlier or ():
        for c in prev:
            base[c.seq_id] += c.num_tokens
    return [(c.num_tokens, base[c.seq_id]) for c in batch]


def microbatch_costs(microbatches: list[list[PlannedChunk]], items: list[WorkItem],
                     cost: CostModel, layers: int | None = None) -> list[float]:
    """Estimated seconds of each micro-batch, prefixes advanced through the earlier ones."""
    return [cost.step_cost(microbatch_chunks(b, items, microbatches[:k]), layers)
            for k, b in enumerate(microbatches)]


def imbalance(microbatches: list[list[PlannedChunk]], items: list[WorkItem],
              cost: CostModel) -> float:
    """Max over mean of the micro-batches' estimated costs: 1.0 is perfectly balanced."""
    costs = microbatch_costs(microbatches, items, cost)
    if not costs or sum(costs) == 0:
        return 1.0
    return max(costs) / (sum(costs) / len(costs))
