"""The controller refuses a drop that a rank could not carry out, before anything moves."""

from __future__ import annotations

import pytest

from orchestrator.cluster.controller import Controller
from orchestrator.cluster.messages import RankInfo
from orchestrator.contracts import Refused, Topology
from orchestrator.policy.dispatch import make_dispatch_policy


def test_a_rank_whose_kv_pool_cannot_grow_is_refused_with_the_fix_named():
    sent = []
    c = Controller(Topology.parse(None, 2), "model", None, 128, 8, make_dispatch_policy("least_loaded"),
                   lambda *msg: sent.append(msg), lambda topology: None, splits=[1, 2], num_layers=6)
    c.on_rank_info(RankInfo(0, 10, 100, 100, 1000, 0))
    c.on_rank_info(RankInfo(1, 10, 100, 100, 1000, 0, can_grow_kv=False))  # CUDA, no cuda-bindings
    with pytest.raises(Refused, match=r"ranks \[1\] cannot turn dropped weights into KV.*\[cuda\]"):
        c.drop([0, 1], wait_s=1)
    c.poll()  # the main loop's turn: a drop that had started would send its orders now
    assert not sent and not c.reshapes.busy, sent  # nothing started
    c.on_rank_info(RankInfo(1, 10, 100, 100, 1000, 0))  # the same rank, able to grow its pool
    assert c._begin_drop((0, 1)).ranks == (0, 1)  # accepted: the drop order is queued for the main loop
    c.poll()
    assert [(dst, type(msg).__name__, msg.ranks) for dst, msg in sent] == [(0, "DropGroup", (0, 1)),
                                                                          (1, "DropGroup", (0, 1))]
