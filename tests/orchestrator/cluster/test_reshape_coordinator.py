"""The controller's book of drops and restores, without ranks: what it refuses, how the
topology follows a drop and a restore, and that waiters wake only when a reshape is over."""

from __future__ import annotations

import threading

import pytest

from orchestrator.cluster.messages import GroupFormed, Restored
from orchestrator.cluster.reshape_coordinator import ReshapeCoordinator, ReshapeKind
from orchestrator.contracts import Refused, ReshapeTimeout, Topology


def coordinator(world: int = 4) -> ReshapeCoordinator:
    return ReshapeCoordinator(Topology.parse(None, world), splits=[1, 2, 4], num_layers=6)


@pytest.mark.parametrize("ranks, migrating, cannot_grow, why", [
    ((0, 7), set(), set(), r"unknown ranks \[7\]: the cluster has ranks 0-3"),
    ((1, 1), set(), set(), "at least 2 distinct ranks"),
    ((0, 1), {1}, set(), r"ranks \[1\] are migrating"),
    ((0, 1), set(), {0}, r"ranks \[0\] cannot turn dropped weights into KV"),
    ((0, 1, 2), set(), set(), r"no 3-way split: the store has splits \[1, 2, 4\]"),
])
def test_a_drop_it_cannot_carry_out_is_refused_and_nothing_is_recorded(ranks, migrating, cannot_grow, why):
    c = coordinator()
    with pytest.raises(Refused, match=why):
        c.begin_drop(ranks, migrating, cannot_grow)
    assert not c.busy


def test_drop_then_restore_moves_the_topology_and_wakes_waiters_when_over():
    c = coordinator()
    drop = c.begin_drop((2, 3), set(), set())
    assert (drop.kind, drop.ranks, drop.epoch) == (ReshapeKind.DROP, (2, 3), 1) and c.reshaping(3)
    with pytest.raises(Refused, match="already in progress"):
        c.begin_drop((0, 1), set(), set())
    with pytest.raises(ReshapeTimeout, match=r"ranks \[2, 3\] did not finish"):
        c.wait((2, 3), 0.05)
    c.group_formed(GroupFormed(2, (2, 3), [], drop.epoch))
    assert c.topology.instances == ((0,), (1,), (2, 3))
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: (c.wait((2, 3), 5), woke.set()))
    waiter.start()
    assert not woke.wait(0.05)  # formed, but the controller has not caught up yet
    c.finish((2, 3))
    waiter.join(5)
    assert woke.is_set() and not c.busy

    with pytest.raises(Refused, match=r"ranks \[0, 1\] do not form a group"):
        c.begin_restore((0, 1))
    [restore] = c.begin_restore(None)
    assert (restore.kind, restore.ranks, restore.epoch) == (ReshapeKind.RESTORE, (2, 3), 2)
    assert c.member_restored(Restored(3, restore.epoch, [])) is None  # one member of two
    assert c.topology.instances == ((0,), (1,), (2, 3))
    assert c.member_restored(Restored(2, restore.epoch, [])) == (2, 3)
    assert c.topology.instances == ((0,), (1,), (2,), (3,))
    c.finish((2, 3))
    with pytest.raises(Refused, match="nothing is dropped"):
        c.begin_restore(None)


def _formed(c: ReshapeCoordinator, drop) -> None:
    c.group_formed(GroupFormed(drop.ranks[0], drop.ranks, [], drop.epoch, 0, 0))
    c.finish(drop.ranks)


def test_two_groups_fuse_into_one_whose_stages_nest_in_theirs_and_split_back_into_them():
    c = ReshapeCoordinator(Topology.parse("0-1,2-3", 4), splits=[1, 2, 4], num_layers=8)
    drop = c.begin_drop((0, 1, 2, 3), set(), set())
    # Stage s of the pair runs layers [4s, 4s+4); stages 2s and 2s+1 of the four run halves of
    # them: the first stages keep [0, 2) and [2, 4), the second ones [4, 6) and [6, 8).
    assert drop.ranks == (0, 2, 1, 3) and drop.parts == ((0, 1), (2, 3))
    _formed(c, drop)
    assert c.topology.instances == ((0, 2, 1, 3),)
    [restore] = c.begin_restore(None)
    assert restore.parts == ((0, 1), (2, 3))
    for r in (0, 2, 1, 3):
        c.member_restored(Restored(r, restore.epoch, []))
    assert c.topology == Topology.parse("0-1,2-3", 4)


def test_a_replica_and_a_group_fuse_where_the_replica_takes_the_straddling_stage():
    c = ReshapeCoordinator(Topology.parse("0-1", 3), splits=[1, 2, 3], num_layers=6)
    drop = c.begin_drop((2, 0, 1), set(), set())
    # [0, 2) fits rank 0 ([0, 3)), [2, 4) only the replica, [4, 6) rank 1 ([3, 6)).
    assert drop.ranks == (0, 2, 1) and drop.parts == ((0, 1), (2,))


@pytest.mark.parametrize("topology, ranks, why", [
    ("0-1,2-3", (0, 1, 2, 3), r"cannot fuse into a 4-stage group: its stages' layers \['\[0, 2\)', '\[2, 4\)'"),
    ("0-1", (1, 2), r"take only part of the instances \[\[0, 1\]\]"),
    ("0-1", (0, 1), r"are one instance already"),
])
def test_a_fusion_whose_layers_do_not_nest_or_that_splits_an_instance_is_refused(topology, ranks, why):
    c = ReshapeCoordinator(Topology.parse(topology, 4), splits=[1, 2, 4], num_layers=6)  # pp4 of 6: 2,2,1,1
    with pytest.raises(Refused, match=why):
        c.begin_drop(ranks, set(), set())
    assert not c.busy
