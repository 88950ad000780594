"""``perf.sim.control_plane`` times the real policies: check that they acted on its load
(a burst makes the kunserve policy drop, its end makes it restore) and that it reports."""

from __future__ import annotations

import torch

from perf.sim.control_plane import measure, table
from perf.sim.gpu import GPUS, load_model
from perf.sim.memory import MemoryLayout


def test_the_burst_makes_the_real_policy_drop_and_restore():
    layout = MemoryLayout.for_model(load_model("llama-3-70b"), torch.bfloat16, GPUS["h100"].hbm_bytes, 16, (1, 2, 4),
                                    tp=2)
    row = measure(12, 300, layout)
    assert row["drops"] >= 4 and row["restores"] == row["drops"], row  # the 4 bursting instances, then back
    assert row["kunserve_tick"][0] > 0 and set(row["dispatch"]) >= {"least_loaded", "prefix_aware"}
    assert "| 12 |" in table([row])
