"""The drop planner on synthetic snapshots: capacities, grouping, invariants, complexity."""

from __future__ import annotations

import math
import random

import pytest

from orchestrator.kunserve import planner
from orchestrator.kunserve.planner import (
    DropPlan, InstanceSnapshot, ModelMemory, allowed_group_sizes, group_capacity_tokens,
    plan_drop)

# 8 layers, 256 KV bytes per layer per token, a 1,000-token pool, and layers whose weights
# are worth 125 tokens each: a g-group holds g*1000 + (g-1)*1000 tokens.
MEM = ModelMemory(num_layers=8, kv_bytes_per_token=8 * 256, layer_weight_bytes=125 * 2048,
                  kv_pool_bytes=1000 * 2048, splits=(1, 2, 4, 8))
C1 = 1000


def replica(instance: int, demand: int, *, overloaded: bool | None = None) -> InstanceSnapshot:
    """A 1,000-token replica; past capacity, the excess is queued and the pool is full."""
    if overloaded is None:
        overloaded = demand > C1
    used = min(demand, C1)
    return InstanceSnapshot(instance=instance, ranks=(instance,), capacity_tokens=C1,
                            demand_tokens=demand, queued_tokens=demand - used,
                            free_tokens=C1 - used, overloaded=overloaded)


# --- capacity formula ---------------------------------------------------------------------------

def test_group_capacity_even_split():
    assert group_capacity_tokens(MEM, 1) == MEM.kv_pool_bytes // MEM.kv_bytes_per_token == 1000
    assert group_capacity_tokens(MEM, 2) == 3000
    assert group_capacity_tokens(MEM, 4) == 7000
    assert group_capacity_tokens(MEM, 8) == 15000


def test_group_capacity_uneven_split_uses_largest_stage():
    mem = ModelMemory(num_layers=30, kv_bytes_per_token=30 * 100, layer_weight_bytes=50_000,
                      kv_pool_bytes=3_000_000, splits=(1, 2, 4))
    # g=4: stages [8, 8, 7, 7]; an 8-layer stage drops 22 layers and pays 8/30 per token.
    pool = 3_000_000 + 22 * 50_000
    assert group_capacity_tokens(mem, 4) == pool * 30 // (3000 * 8) == 5125
    # An even 7.5-layer split would promise more than the 8-layer stage can hold.
    assert group_capacity_tokens(mem, 4) < (3_000_000 + 22.5 * 50_000) / (3000 * 7.5 / 30)
    assert group_capacity_tokens(mem, 1) == 1000


def test_group_capacity_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="the model's 8 layers cannot be split 9 ways"):
        group_capacity_tokens(MEM, 9)
    with pytest.raises(ValueError):
        group_capacity_tokens(MEM, 0)


# --- simple plans ---------------------------------------------------------------------------------

def test_nobody_overloaded_gives_empty_plan():
    plan = plan_drop([replica(i, 900) for i in range(4)], MEM)
    assert plan.empty and plan.groups == ()
    assert (plan.deficit_tokens, plan.added_tokens, plan.unmet_tokens) == (0, 0, 0)
    assert plan.reason == "no instance votes overload"
    assert plan.to_json() == {"groups": [], "deficit_tokens": 0, "added_tokens": 0,
                              "unmet_tokens": 0, "reason": "no instance votes overload"}


def test_one_overloaded_merges_with_the_idlest():
    snap = [replica(0, 2500), replica(1, 400), replica(2, 50), replica(3, 700), replica(4, 200)]
    plan = plan_drop(snap, MEM)
    assert plan.groups == ((0, 2),)  # 2550 tokens fit a 2-group's 3000
    assert plan.deficit_tokens == 1500
    assert plan.added_tokens == 1000
    assert plan.unmet_tokens == 0
    assert "merging 0+2 adds 1,000 tokens" in plan.reason
    assert plan.to_json()["groups"] == [[0, 2]]


def test_smallest_covering_size_is_chosen():
    snap = [replica(0, 5000)] + [replica(i, 100 * i) for i in range(1, 8)]
    plan = plan_drop(snap, MEM)
    # A 2-group holds 3000 < 5100; a 4-group holds 7000 >= 5000 + 100 + 200 + 300.
    assert plan.groups == ((0, 1, 2, 3),)
    assert plan.unmet_tokens == 0
    assert plan.added_tokens == 7000 - 4000


def test_two_overloaded_with_enough_partners_form_two_groups():
    snap = [replica(0, 1800), replica(1, 2600)] + [replica(i, 100 * i) for i in range(2, 7)]
    plan = plan_drop(snap, MEM)
    # The most overloaded (1) takes the idlest partner (2), then 0 takes the next (3).
    assert plan.groups == ((1, 2), (0, 3))
    assert plan.unmet_tokens == 0
    assert plan.deficit_tokens == 800 + 1600


def test_without_partners_overloaded_replicas_merge_together():
    snap = [replica(0, 1400), replica(1, 1300), replica(2, 1200), replica(3, 100)]
    plan = plan_drop(snap, MEM, max_group_size=2)
    # 0 takes the only partner; 1 then merges with 2 (2500 tokens fit 3000).
    assert plan.groups == ((0, 3), (1, 2))
    assert plan.unmet_tokens == 0


def test_unmet_when_even_the_largest_group_is_too_small():
    snap = [replica(0, 10_000), replica(1, 10_000)]
    plan = plan_drop(snap, MEM)
    assert plan.groups == ((0, 1),)
    assert plan.deficit_tokens == 18_000
    assert plan.added_tokens == 1000
    assert plan.unmet_tokens == 20_000 - 3000
    assert "17,000 tokens unmet" in plan.reason


def test_lone_overloaded_replica_is_unmet():
    plan = plan_drop([replica(0, 1500)], MEM)
    assert plan.empty
    assert plan.unmet_tokens == plan.deficit_tokens == 500
    assert "nothing to merge" in plan.reason


def test_max_group_size_caps_the_group():
    snap = [replica(0, 12_000)] + [replica(i, 0) for i in range(1, 10)]
    capped = plan_drop(snap, MEM, max_group_size=4)
    assert [len(g) for g in capped.groups] == [4]
    assert capped.unmet_tokens == 12_000 - 7000
    free = plan_drop(snap, MEM)
    assert [len(g) for g in free.groups] == [8]
    assert free.unmet_tokens == 0


def test_sizes_follow_the_store_splits():
    mem = ModelMemory(MEM.num_layers, MEM.kv_bytes_per_token, MEM.layer_weight_bytes,
                      MEM.kv_pool_bytes, splits=(1, 4))
    snap = [replica(0, 1500)] + [replica(i, 0) for i in range(1, 6)]
    plan = plan_drop(snap, mem)
    assert plan.groups == ((0, 1, 2, 3),)  # 2 would do, but the store has no pp2 engine


def test_groups_and_indebted_partners_are_not_merged():
    group = InstanceSnapshot(instance=9, ranks=(9, 10), capacity_tokens=3000, demand_tokens=4000,
                             queued_tokens=1000, free_tokens=0, overloaded=True)
    snap = [group, replica(0, 1200, overloaded=False), replica(1, 300)]
    plan = plan_drop(snap, MEM)
    assert plan.empty  # replica 0 has a deficit but no vote: not a partner, not a lead
    assert plan.unmet_tokens == plan.deficit_tokens == 1000
    assert "group 9 has no same-size partner or split to grow into" in plan.reason


def group(instance: int, ranks: tuple[int, ...], demand: int, *, overloaded: bool | None = None) -> InstanceSnapshot:
    """A group fused from replicas: its pool holds ``group_capacity_tokens``."""
    cap = group_capacity_tokens(MEM, len(ranks))
    overloaded = demand > cap if overloaded is None else overloaded
    used = min(demand, cap)
    return InstanceSnapshot(instance, ranks, cap, demand, demand - used, cap - used, overloaded)


def test_an_overloaded_group_grows_with_a_same_size_group_that_has_room():
    # Two pp2 groups of 3,000 tokens; fused into pp4 they hold 7,000 (as if fused from replicas).
    snap = [group(0, (0, 1), 4500), group(2, (2, 3), 1000), replica(4, 200)]
    plan = plan_drop(snap, MEM)
    assert plan.groups == ((0, 2),) and plan.added_tokens == 7000 - 6000 and plan.unmet_tokens == 0, plan
    # Without a split twice their size, or with one whose stages cut theirs, it cannot grow.
    for splits, layers in (((1, 2), 8), ((1, 2, 4), 6)):
        mem = ModelMemory(layers, MEM.kv_bytes_per_token // 8 * layers, MEM.layer_weight_bytes,
                          MEM.kv_pool_bytes, splits=splits)
        stuck = plan_drop(snap, mem)
        assert stuck.empty and stuck.unmet_tokens == 1500, (splits, stuck)
    assert planner.grows_into(8, 2, 4) and not planner.grows_into(6, 2, 4) and not planner.grows_into(30, 2, 4)


def test_voter_without_deficit_stays_alone():
    exact = InstanceSnapshot(instance=0, ranks=(0,), capacity_tokens=C1, demand_tokens=960,
                             queued_tokens=40, free_tokens=40, overloaded=True)
    plan = plan_drop([exact, replica(1, 0)], MEM)
    assert plan.empty and plan.unmet_tokens == 0


def test_deficit_counts_resident_plus_queued_when_demand_lags():
    # Demand says 900, but 950 are resident and 300 more wait: 250 do not fit.
    lagging = InstanceSnapshot(instance=0, ranks=(0,), capacity_tokens=C1, demand_tokens=900,
                               queued_tokens=300, free_tokens=50, overloaded=True)
    assert lagging.need_tokens == 1250 and lagging.deficit_tokens == 250


def test_uneven_layers_plan_against_the_largest_stage():
    mem30 = ModelMemory(num_layers=30, kv_bytes_per_token=30 * 100, layer_weight_bytes=50_000,
                        kv_pool_bytes=3_000_000, splits=(1, 2, 4))
    snap = [replica(0, 5200)] + [replica(i, 0) for i in range(1, 6)]
    plan = plan_drop(snap, mem30)
    # An even 7.5-layer split would hold 5,500 tokens; the 8-layer stage holds 5,125.
    assert [len(g) for g in plan.groups] == [4]
    assert plan.unmet_tokens == 5200 - 5125
    assert plan.added_tokens == 5125 - 4 * C1


def test_a_group_that_would_do_worse_is_not_formed():
    # Reported capacities far above the model's: fusing would shrink the pool.
    big = [InstanceSnapshot(instance=i, ranks=(i,), capacity_tokens=5000, demand_tokens=d,
                            queued_tokens=q, free_tokens=0 if q else 1000, overloaded=bool(q))
           for i, d, q in ((0, 6000, 1000), (1, 4000, 0))]
    plan = plan_drop(big, MEM)
    assert plan.empty
    assert plan.unmet_tokens == plan.deficit_tokens == 1000


# --- errors ---------------------------------------------------------------------------------------

def test_group_size_errors():
    mem30 = ModelMemory(30, 3000, 50_000, 3_000_000, splits=(1, 2, 4))
    with pytest.raises(ValueError, match="the model's 30 layers cannot be split 64 ways"):
        plan_drop([], mem30, max_group_size=64)
    only_one = ModelMemory(30, 3000, 50_000, 3_000_000, splits=(1,))
    with pytest.raises(ValueError, match="the store has no pipeline split larger than 1"):
        plan_drop([], only_one)
    too_big = ModelMemory(30, 3000, 50_000, 3_000_000, splits=(1, 64))
    with pytest.raises(ValueError, match="cannot be split 64 ways"):
        allowed_group_sizes(too_big)
    with pytest.raises(ValueError, match="max_group_size"):
        allowed_group_sizes(MEM, max_group_size=1)
    with pytest.raises(ValueError, match="max_group_size=3"):
        allowed_group_sizes(ModelMemory(8, 2048, 1, 1, splits=(1, 4)), max_group_size=3)
    assert allowed_group_sizes(MEM, max_group_size=4) == (2, 4)
    assert allowed_group_sizes(mem30) == (2, 4)


def test_duplicate_instances_rejected():
    with pytest.raises(ValueError, match="more than once"):
        plan_drop([replica(0, 2000), replica(0, 10)], MEM)


# --- large random snapshots: invariants and N log N work --------------------------------------

def random_snapshot(n: int, seed: int) -> list[InstanceSnapshot]:
    rng = random.Random(seed)
    snap = []
    for i in range(n):
        if rng.random() < 0.05:
            snap.append(InstanceSnapshot(instance=i, ranks=(10_000 + 2 * i, 10_001 + 2 * i),
                                         capacity_tokens=3000, demand_tokens=rng.randrange(5000),
                                         queued_tokens=0, free_tokens=1000, overloaded=False))
        elif rng.random() < 0.3:
            snap.append(replica(i, rng.randrange(1001, 9000)))
        else:
            snap.append(replica(i, rng.randrange(0, 1000)))
    rng.shuffle(snap)
    return snap


def check_invariants(plan: DropPlan, snap: list[InstanceSnapshot], mem: ModelMemory,
                     max_group_size: int | None) -> None:
    by_id = {s.instance: s for s in snap}
    sizes = allowed_group_sizes(mem, max_group_size)
    seen: set[int] = set()
    added = unmet_bound = 0
    for group in plan.groups:
        assert len(group) in sizes
        assert seen.isdisjoint(group), "an instance appears in two groups"
        seen.update(group)
        members = [by_id[i] for i in group]
        assert all(m.is_replica for m in members)
        assert members[0].overloaded and members[0].deficit_tokens > 0
        assert all(m.overloaded or m.deficit_tokens == 0 for m in members)
        cap = group_capacity_tokens(mem, len(group))
        added += cap - sum(m.capacity_tokens for m in members)
        shortfall = sum(m.need_tokens for m in members) - cap
        voters_deficit = sum(m.deficit_tokens for m in members if m.overloaded)
        unmet_bound += min(max(0, shortfall), voters_deficit)
    voters = [s for s in snap if s.overloaded]
    assert plan.deficit_tokens == sum(s.deficit_tokens for s in voters)
    assert plan.added_tokens == added
    assert 0 <= plan.unmet_tokens <= plan.deficit_tokens
    assert plan.unmet_tokens >= unmet_bound
    for s in voters:  # a voter left out of every group stays unmet
        if s.instance not in seen:
            assert plan.unmet_tokens >= s.deficit_tokens
    if plan.unmet_tokens == 0:
        assert all(s.instance in seen for s in voters if s.deficit_tokens > 0)


@pytest.mark.parametrize("n", [64, 1024])
@pytest.mark.parametrize("max_group_size", [None, 2, 4])
def test_random_snapshots_keep_invariants(n, max_group_size):
    snap = random_snapshot(n, seed=n + (max_group_size or 0))
    plan = plan_drop(snap, MEM, max_group_size)
    assert plan.groups
    check_invariants(plan, snap, MEM, max_group_size)


def test_plenty_of_partners_cover_everything():
    rng = random.Random(7)
    snap = [replica(i, rng.randrange(1001, 2000)) for i in range(50)]
    snap += [replica(i, rng.randrange(0, 300)) for i in range(50, 300)]
    plan = plan_drop(snap, MEM)
    assert plan.unmet_tokens == 0
    assert len(plan.groups) == 50
    check_invariants(plan, snap, MEM, None)


class _Counting:
    """A sort key that counts the comparisons made on it."""

    __slots__ = ("key", "counter")

    def __init__(self, key, counter: list[int]) -> None:
        self.key = key
        self.counter = counter

    def __lt__(self, other: "_Counting") -> bool:
        self.counter[0] += 1
        return self.key < other.key


def count_work(monkeypatch, n: int) -> int:
    """Comparisons made by the planner's sorts plus group-capacity evaluations."""
    counter = [0]
    real_capacity = planner.group_capacity_tokens

    def counting_sorted(iterable, *, key=lambda x: x):
        return sorted(iterable, key=lambda x: _Counting(key(x), counter))

    def counting_capacity(mem, g):
        counter[0] += 1
        return real_capacity(mem, g)

    monkeypatch.setattr(planner, "sorted", counting_sorted, raising=False)
    monkeypatch.setattr(planner, "group_capacity_tokens", counting_capacity)
    snap = random_snapshot(n, seed=1)
    plan = planner.plan_drop(snap, MEM)
    monkeypatch.undo()
    check_invariants(plan, snap, MEM, None)
    return counter[0]


def count_lines(n: int) -> int:
    """Python lines executed during one whole ``plan_drop`` call, in any module it reaches
    (the planner, the snapshots' properties, the plan's validation): a quadratic loop
    anywhere in the call shows here, whatever it sorts."""
    import sys

    snap = random_snapshot(n, seed=1)
    counter = [0]

    def tracer(frame, event, arg):
        if event == "line":
            counter[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        plan = planner.plan_drop(snap, MEM)
    finally:
        sys.settrace(None)
    check_invariants(plan, snap, MEM, None)
    return counter[0]


def test_whole_call_grows_like_n_log_n():
    small, large = count_lines(64), count_lines(1024)
    assert small > 0
    # 16x the instances: N log N grows ~27x, N^2 256x; at most 16 lines per N log N (about 4-7 measured).
    assert large / small < 64, (small, large)
    for n, work in ((64, small), (1024, large)):
        assert work <= 16 * n * math.log2(n), (n, work)


def test_work_grows_like_n_log_n(monkeypatch):
    small, large = count_work(monkeypatch, 64), count_work(monkeypatch, 1024)
    assert small > 0
    for n, work in ((64, small), (1024, large)):
        assert work <= 2 * n * math.log2(n), (n, work)
    # 16x the instances: N log N grows ~27x, N^2 256x.
    assert large / small < 64
