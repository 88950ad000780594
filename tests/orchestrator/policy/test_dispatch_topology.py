"""Dispatch policies and --groups parsing (pure functions, no cluster)."""

from __future__ import annotations

import pytest

from engines.paging import block_hashes
from orchestrator.contracts import Topology
from orchestrator.policy.dispatch import InstanceLoad, dispatch_policies, make_dispatch_policy


def load(i, ranks=1, free=1.0, outstanding=0, capacity=0):
    return InstanceLoad(i, ranks, free, 0, 0, outstanding, capacity)


def test_registry_knows_the_policies():
    assert dispatch_policies() == ["least_loaded", "prefix_aware", "round_robin"]
    with pytest.raises(ValueError, match="unknown dispatch policy 'x'; known: least_loaded, prefix_aware, round_robin"):
        make_dispatch_policy("x")


def test_round_robin_cycles():
    rr = make_dispatch_policy("round_robin")
    loads = [load(0), load(1), load(2)]
    assert [rr.choose(loads) for _ in range(5)] == [0, 1, 2, 0, 1]


def test_least_loaded_counts_per_rank_then_free_memory():
    ll = make_dispatch_policy("least_loaded")
    assert ll.choose([load(0, outstanding=3), load(1, outstanding=1)]) == 1
    # a 2-rank group with 2 outstanding is as loaded as a replica with 1
    assert ll.choose([load(0, ranks=2, outstanding=2, free=0.9), load(1, outstanding=1, free=0.5)]) == 0
    assert ll.choose([load(0, free=0.2), load(1, free=0.7)]) == 1


def test_topology_parsing():
    t = Topology.parse("0-1", 4)
    assert t.instances == ((0, 1), (2,), (3,))
    assert t.ranks_of_rank(1) == (0, 1) and t.instance_of(3) == 2
    assert str(t) == "0-1,2,3"
    assert Topology.parse(None, 2).instances == ((0,), (1,))
    assert Topology.parse("2-3,0-1", 4).instances == ((0, 1), (2, 3))
    for bad, msg in [("0-5", "outside"), ("0-1,1-2", "twice"), ("a-b", "cannot parse"), ("1-0", "backwards")]:
        with pytest.raises(ValueError, match=msg):
            Topology.parse(bad, 4)


def test_topology_fuses_instances_and_splits_groups_into_their_parts():
    t = Topology.parse(None, 4)
    fused = t.fuse((2, 3))
    assert fused.instances == ((0,), (1,), (2, 3)) and fused.split((2, 3)) == t
    pairs = fused.fuse((0, 1))
    assert pairs.instances == ((0, 1), (2, 3))
    with pytest.raises(ValueError, match=r"ranks \[1, 2\] take only part of the instances \[\[2, 3\]\]"):
        fused.fuse((1, 2))
    with pytest.raises(ValueError, match="is not a group"):
        fused.split((0, 1))
    # Groups of groups: two pairs fuse into one group of four, which splits back into the pairs.
    four = pairs.fuse((0, 2, 1, 3))
    assert four.instances == ((0, 2, 1, 3),) and four.parts_of((0, 1, 2, 3)) == ((0, 2, 1, 3),)
    assert four.split((0, 2, 1, 3), ((0, 1), (2, 3))) == pairs
    with pytest.raises(ValueError, match="do not make up the group"):
        four.split((0, 2, 1, 3), ((0, 1),))


def test_prefix_aware_follows_the_prefix_then_the_load():
    pa = make_dispatch_policy("prefix_aware", 4)
    system = list(range(40))  # 10 blocks of 4
    idle = [load(0), load(1), load(2)]
    assert pa.choose(idle, system + [100, 101, 102, 103]) == 0  # nothing cached: least loaded, lowest id
    # Equal loads: the same system prompt goes where its blocks are (1 block to prefill, not 11).
    assert pa.choose([load(0), load(1), load(2)], system + [200, 201, 202, 203]) == 0
    # An unrelated prompt goes to an idle instance rather than the busy one.
    assert pa.choose([load(0, outstanding=1), load(1), load(2)], list(range(500, 540))) == 1
    # The prefix stops winning once its instance carries more work than the prefill it saves:
    # 1 block to prefill + 1 request of 11 blocks in flight, against 11 blocks to prefill.
    assert pa.choose([load(0, outstanding=1), load(1), load(2)], system + [300, 301, 302, 303]) == 1
    # A 2-rank group counts its work per rank: half a request's blocks here, against all of them.
    group = make_dispatch_policy("prefix_aware", 4)
    group.choose([load(0, ranks=2), load(1)], system)
    assert group.choose([load(0, ranks=2, outstanding=1), load(1)], system + [7, 7, 7, 7]) == 0


def test_prefix_aware_forgets_beyond_an_instances_capacity():
    pa = make_dispatch_policy("prefix_aware", 4)
    pa.choose([load(0, capacity=16), load(1, capacity=16)], list(range(16)))  # 4 blocks on instance 0
    pa.choose([load(0, capacity=16), load(1, capacity=16, outstanding=5)], list(range(100, 116)))  # evicts them
    assert pa.choose([load(0, capacity=16), load(1, capacity=16)], list(range(16)) + [1, 2, 3, 4]) == 0  # tie
    pa2 = make_dispatch_policy("prefix_aware", 4)
    pa2.choose([load(0, capacity=16), load(1, capacity=16)], list(range(16)))
    pa2.choose([load(0, capacity=16), load(1, capacity=16, outstanding=5)], list(range(100, 116)))
    # instance 0 no longer remembers blocks 0-3, so instance 1 (tie broken by id) is not beaten by a stale hit:
    assert pa2._hit(0, block_hashes(list(range(16)), 4)) == 0
