"""Dispatch policies and --groups parsing (pure functions, no cluster)."""

from __future__ import annotations

import pytest

from orchestrator.contracts import Topology
from orchestrator.policy.dispatch import InstanceLoad, dispatch_policies, make_dispatch_policy


def load(i, ranks=1, free=1.0, outstanding=0):
    return InstanceLoad(i, ranks, free, 0, 0, outstanding)


def test_registry_knows_the_policies():
    assert dispatch_policies() == ["least_loaded", "round_robin"]
    with pytest.raises(ValueError, match="unknown dispatch policy 'x'; known: least_loaded, round_robin"):
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


def test_topology_fuses_replicas_and_splits_groups():
    t = Topology.parse(None, 4)
    fused = t.fuse((2, 3))
    assert fused.instances == ((0,), (1,), (2, 3)) and fused.split((2, 3)) == t
    assert fused.fuse((0, 1)).instances == ((0, 1), (2, 3))
    with pytest.raises(ValueError, match=r"ranks \[2\] are not replicas"):
        fused.fuse((1, 2))
    with pytest.raises(ValueError, match="is not a group"):
        fused.split((0, 1))
