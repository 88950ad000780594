"""KunServePolicy's restore decision: never split a group whose demand the replicas could not hold."""

from orchestrator.contracts import InstanceStats, Topology
from orchestrator.kunserve.planner import ModelMemory
from orchestrator.policy.reshape import KunServePolicy

# A replica's pool holds 1,000 tokens; the group's (after the drop) 6,000.
MEM = ModelMemory(num_layers=8, kv_bytes_per_token=1000, layer_weight_bytes=10 ** 6, kv_pool_bytes=10 ** 6,
                  splits=(1, 2))


def feed(policy, demand, capacity=6000, samples=12):
    for i in range(samples):
        s = InstanceStats(0, 0, 3, [], capacity, demand, demand, 0, capacity - demand)
        policy.observe({0: s}, now=10.0 + i * 0.1)


def test_low_group_level_but_too_much_for_the_replicas_does_not_restore():
    p = KunServePolicy(MEM, min_group_age_s=0.0)
    feed(p, demand=1500)  # 25% of the group, but 75% of the two replicas' 2,000 tokens
    assert p.decide(Topology.parse("0-1", 2), now=20.0) == []


def test_demand_the_replicas_hold_with_room_restores():
    p = KunServePolicy(MEM, min_group_age_s=0.0)
    feed(p, demand=800)  # 40% of the replicas' pools (restore level 0.5)
    actions = p.decide(Topology.parse("0-1", 2), now=20.0)
    assert [(a.kind, a.ranks) for a in actions] == [("restore", (0, 1))]


def test_an_overloaded_group_grows_and_the_drop_names_every_rank_of_both_groups():
    mem = ModelMemory(num_layers=8, kv_bytes_per_token=1000, layer_weight_bytes=10 ** 6, kv_pool_bytes=10 ** 6,
                      splits=(1, 2, 4))
    p = KunServePolicy(mem, min_group_age_s=0.0)
    for i in range(12):  # instance 0 (ranks 0-1) full with a queue, instance 2 (ranks 2-3) idle
        p.observe({0: InstanceStats(0, 4, 3, [], 5000, 9000, 5000, 4000, 0),
                   2: InstanceStats(2, 0, 0, [], 5000, 100, 100, 0, 4900)}, now=10.0 + i * 0.1)
    actions = p.decide(Topology.parse("0-1,2-3", 4), now=20.0)
    assert [(a.kind, a.ranks) for a in actions] == [("drop", (0, 1, 2, 3))], actions
