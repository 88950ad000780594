"""Lookahead micro-batch formation: balance, budgets, legality of splits, FCFS."""

from __future__ import annotations

import random

import pytest

from orchestrator.kunserve.cost_model import CostModel
from orchestrator.kunserve.lookahead import (PlannedChunk, WorkItem, form_microbatches, imbalance,
                                             microbatch_costs)

# The shape of the SmolLM2 profile on a 2-core CPU (30 layers, fp32, one thread).
COST = CostModel(fixed_s=0.055, per_token_s=1.1e-3, per_attention_s=2.2e-6, per_seq_s=3.8e-3, layers=30)


def decode(seq_id: int, context: int) -> WorkItem:
    return WorkItem(seq_id, context, 1, True)


def prefill(seq_id: int, remaining: int, computed: int = 0) -> WorkItem:
    return WorkItem(seq_id, computed, remaining, False)


def check_legal(mbs: list[list[PlannedChunk]], items: list[WorkItem], g: int, budget: int) -> dict[int, int]:
    """Every invariant a plan must keep; returns the tokens placed per sequence."""
    by_id = {it.seq_id: it for it in items}
    assert 1 <= len(mbs) <= g or (not mbs and not items)
    placed: dict[int, int] = {}
    where: dict[int, list[int]] = {}
    for k, mb in enumerate(mbs):
        assert mb, "empty micro-batches are left out"
        assert sum(c.num_tokens for c in mb) <= budget
        ids = [c.seq_id for c in mb]
        assert len(ids) == len(set(ids)), "a sequence twice in one micro-batch"
        for c in mb:
            assert c.num_tokens >= 1
            placed[c.seq_id] = placed.get(c.seq_id, 0) + c.num_tokens
            where.setdefault(c.seq_id, []).append(k)
    for seq, total in placed.items():
        assert total <= by_id[seq].remaining
        ks = where[seq]
        # Chunks of a sequence sit in consecutive micro-batches, each continuing the last.
        assert ks == list(range(ks[0], ks[0] + len(ks)))
        if by_id[seq].is_decode:
            assert len(ks) == 1
    return placed


def check_nothing_dropped_and_fcfs(placed: dict[int, int], items: list[WorkItem], g: int, budget: int) -> None:
    decodes = [it for it in items if it.is_decode]
    prefills = [it for it in items if not it.is_decode]
    n_dec = min(len(decodes), g * budget)
    assert sum(placed.get(d.seq_id, 0) for d in decodes) == n_dec
    assert all(d.seq_id in placed for d in decodes[:n_dec])
    want = min(sum(p.remaining for p in prefills), g * budget - n_dec)
    assert sum(placed.get(p.seq_id, 0) for p in prefills) == want
    for i, p in enumerate(prefills):  # a later prefill runs only if every earlier one is whole
        if placed.get(p.seq_id):
            assert all(placed.get(q.seq_id, 0) == q.remaining for q in prefills[:i])


def test_decodes_only_are_spread_evenly():
    items = [decode(i, 500) for i in range(8)]
    mbs = form_microbatches(items, 4, COST, 512)
    check_nothing_dropped_and_fcfs(check_legal(mbs, items, 4, 512), items, 4, 512)
    assert [len(mb) for mb in mbs] == [2, 2, 2, 2]
    assert imbalance(mbs, items, COST) == pytest.approx(1.0)


def test_decodes_of_mixed_lengths_are_balanced_longest_first():
    rng = random.Random(1)
    items = [decode(i, rng.randint(10, 8000)) for i in range(40)]
    mbs = form_microbatches(items, 4, COST, 512)
    check_legal(mbs, items, 4, 512)
    assert imbalance(mbs, items, COST) < 1.02


@pytest.mark.parametrize("g", [2, 3, 4])
def test_one_long_prefill_is_split_into_equal_costs(g):
    items = [prefill(7, 3000, computed=100)]
    mbs = form_microbatches(items, g, COST, 4096)
    placed = check_legal(mbs, items, g, 4096)
    assert placed == {7: 3000} and len(mbs) == g
    # Later chunks attend more context, so they are shorter.
    sizes = [mb[0].num_tokens for mb in mbs]
    assert sizes == sorted(sizes, reverse=True)
    ours = imbalance(mbs, items, COST)
    naive = imbalance([[PlannedChunk(7, 3000)]] + [[] for _ in range(g - 1)], items, COST)
    assert ours < 1.01
    assert naive == pytest.approx(g)
    # Splitting by token count alone ignores attention: worse than the cost-based split.
    even = [[PlannedChunk(7, 3000 // g + (k < 3000 % g))] for k in range(g)]
    assert ours < imbalance(even, items, COST)


def test_mixed_decodes_and_prefills_are_balanced():
    items = ([decode(i, 300 + 50 * i) for i in range(12)]
             + [prefill(100, 900), prefill(101, 400, computed=200), prefill(102, 150)])
    mbs = form_microbatches(items, 4, COST, 512)
    placed = check_legal(mbs, items, 4, 512)
    check_nothing_dropped_and_fcfs(placed, items, 4, 512)
    assert placed[100] == 900 and placed[101] == 400 and placed[102] == 150
    assert imbalance(mbs, items, COST) < 1.05


def test_token_budget_is_respected_and_the_rest_waits():
    items = [decode(i, 100) for i in range(5)] + [prefill(50, 5000), prefill(51, 100)]
    mbs = form_microbatches(items, 2, COST, 256)
    placed = check_legal(mbs, items, 2, 256)
    check_nothing_dropped_and_fcfs(placed, items, 2, 256)
    assert [sum(c.num_tokens for c in mb) for mb in mbs] == [256, 256]
    assert placed[50] == 512 - 5 and 51 not in placed


def test_chunks_continue_where_the_previous_ended():
    items = [prefill(1, 700, computed=64), prefill(2, 300)]
    mbs = form_microbatches(items, 3, COST, 512)
    placed = check_legal(mbs, items, 3, 512)
    assert placed == {1: 700, 2: 300}
    prefix = {1: 64, 2: 0}
    expected = []
    for mb in mbs:
        for c in mb:
            expected.append(COST.chunk_cost(c.num_tokens, prefix[c.seq_id]))
            prefix[c.seq_id] += c.num_tokens
    costs = microbatch_costs(mbs, items, COST)
    assert sum(costs) == pytest.approx(len(mbs) * COST.fixed_s + sum(expected))
    assert prefix == {1: 764, 2: 300}


def test_fcfs_an_earlier_prefill_is_never_starved():
    items = [prefill(1, 2000), prefill(2, 10)]  # the later one is short and cheap
    mbs = form_microbatches(items, 2, COST, 512)
    placed = check_legal(mbs, items, 2, 512)
    assert placed == {1: 1024}
    items = [prefill(1, 300), prefill(2, 2000), prefill(3, 5)]
    placed = check_legal(form_microbatches(items, 2, COST, 512), items, 2, 512)
    assert placed == {1: 300, 2: 724}


def test_g1_is_one_batch_under_the_budget():
    items = [decode(0, 10), decode(1, 2000), prefill(2, 1000), prefill(3, 50)]
    mbs = form_microbatches(items, 1, COST, 512)
    assert len(mbs) == 1
    assert {c.seq_id: c.num_tokens for c in mbs[0]} == {0: 1, 1: 1, 2: 510}


def test_empty_queue_gives_no_microbatches():
    assert form_microbatches([], 4, COST, 512) == []


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="twice"):
        form_microbatches([decode(1, 5), prefill(1, 5)], 2, COST, 64)
    with pytest.raises(ValueError, match="g and token_budget"):
        form_microbatches([decode(1, 5)], 0, COST, 64)
    with pytest.raises(ValueError, match="a decode has 1 token"):
        WorkItem(1, 0, 2, True)


def naive_fill(items: list[WorkItem], g: int, budget: int) -> list[list[PlannedChunk]]:
    """Baseline: decodes then prefills in order, each micro-batch filled to the token budget."""
    mbs: list[list[PlannedChunk]] = [[] for _ in range(g)]
    k, used = 0, 0
    for it in [i for i in items if i.is_decode] + [i for i in items if not i.is_decode]:
        rem = it.remaining
        while rem and k < g:
            n = min(rem, budget - used)
            mbs[k].append(PlannedChunk(it.seq_id, n))
            rem, used = rem - n, used + n
            if used == budget:
                k, used = k + 1, 0
    return [mb for mb in mbs if mb]


def test_randomized_plans_are_legal_complete_and_no_worse_than_filling_in_order():
    rng = random.Random(2024)
    for _ in range(300):
        g, budget = rng.randint(1, 4), rng.choice([8, 32, 128, 512])
        items: list[WorkItem] = []
        for seq in range(rng.randint(0, 30)):
            if rng.random() < 0.6:
                items.append(decode(seq, rng.randint(1, 4000)))
            else:
                items.append(prefill(seq, rng.randint(1, 1500), computed=rng.choice([0, rng.randint(0, 2000)])))
        mbs = form_microbatches(items, g, COST, budget)
        placed = check_legal(mbs, items, g, budget)
        check_nothing_dropped_and_fcfs(placed, items, g, budget)
        if mbs:
            ours = max(microbatch_costs(mbs, items, COST))
            base = max(microbatch_costs(naive_fill(items, g, budget), items, COST))
            assert ours <= base * (1 + 1e-9), (g, budget, items)
