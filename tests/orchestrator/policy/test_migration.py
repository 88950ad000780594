"""The Llumnix pairing policy on synthetic load reports."""

from orchestrator.contracts import InstanceStats, Topology
from orchestrator.policy.migration import LlumnixPolicy
from orchestrator.policy.bundles import POLICIES, get_policy

import pytest


def stats(inst, used, waiting=0, queued=0, capacity=1000, running=4):
    return InstanceStats(inst, waiting, running, [], capacity, used + queued, used, queued, capacity - used)


def test_loaded_replica_sheds_to_the_roomiest_idle_one():
    s = {0: stats(0, 950, waiting=3, queued=600), 1: stats(1, 500), 2: stats(2, 100), 3: stats(3, 700)}
    out = LlumnixPolicy().decide(s, Topology.parse(None, 4), busy=set(), now=10.0)
    assert [(d.src, d.dst, d.dst_free_tokens) for d in out] == [(0, 2, 900)]


def test_no_pairs_when_everyone_is_loaded_or_busy_and_cooldown_applies():
    p = LlumnixPolicy()
    loaded = {i: stats(i, 960, waiting=2, queued=500) for i in range(2)}
    assert p.decide(loaded, Topology.parse(None, 2), set(), 1.0) == []
    s = {0: stats(0, 950, waiting=1, queued=200), 1: stats(1, 0)}
    assert p.decide(s, Topology.parse(None, 2), busy={1}, now=1.0) == []
    assert len(p.decide(s, Topology.parse(None, 2), set(), now=2.0)) == 1
    assert p.decide(s, Topology.parse(None, 2), set(), now=2.1) == []  # cooldown of the source
    assert len(p.decide(s, Topology.parse(None, 2), set(), now=2.6)) == 1


def test_groups_take_no_part():
    s = {0: stats(0, 990, waiting=3, queued=900), 2: stats(2, 0)}
    assert LlumnixPolicy().decide(s, Topology.parse("0-1", 3), set(), 5.0) == []


def test_policy_registry_bundles_mechanisms():
    from orchestrator.policy.migration import MIGRATION
    from orchestrator.policy.reshape import RESHAPE

    assert set(POLICIES) == {"vllm", "kunserve", "swap", "llumnix", "oracle"}
    assert get_policy("swap").preemption == "swap" and get_policy("llumnix").migration == "llumnix"
    for bundle in POLICIES.values():  # every policy a bundle names is registered
        RESHAPE.get(bundle.reshape)
        assert bundle.migration is None or MIGRATION.get(bundle.migration).name == bundle.migration
    with pytest.raises(ValueError, match="unknown migration policy 'x'; known: llumnix"):
        MIGRATION.make("x")
    assert get_policy("oracle").unlimited_kv and get_policy("kunserve").reshape == "kunserve"
    with pytest.raises(ValueError, match="unknown --policy 'x'"):
        get_policy("x")
