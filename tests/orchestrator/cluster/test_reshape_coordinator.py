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
