"""The CPU host's batch-aware step model and contention (``perf.sim.host_cost``), and the
links whose crowd slows them."""

from __future__ import annotations

import json

import pytest

from orchestrator.kunserve.cost_model import CostModel, CostModelError, fit
from perf.sim.clock import EventLoop
from perf.sim.fabric import CpuHost, CpuHostSpec
from perf.sim.host_cost import BatchStepModel, contention_efficiency, fit_batch, load_host_profile, loop_overhead
from perf.sim.links import Link, Network

# A concave curve like this host's decode steps (1 row 48 ms, 8 rows 113 ms, 32 rows 162 ms).
TRUE = BatchStepModel((1, 2, 4, 8, 16, 32, 64, 128, 256), (0.048, 0.060, 0.085, 0.113, 0.140, 0.162, 0.20, 0.28, 0.45),
                      per_attention_s=2e-8, per_kv_token_s=3e-5, per_seq_s=5e-4, layers=30, r2=1.0, samples=0)


def grid() -> list[list[tuple[int, int]]]:
    steps = [[(1, c - 1)] * b for b in (1, 2, 4, 8, 16, 32) for c in (128, 1024)]
    steps += [[(n, s)] for n in (16, 64, 128, 256) for s in (0, 256, 1024)]
    steps += [[(128, 0)] + [(1, 127)] * 8, [(32, 0)] * 4 + [(1, 255)] * 16]
    return steps


def test_the_fit_recovers_a_concave_step_curve_that_the_linear_model_misses():
    samples = [(step, TRUE.step_cost(step)) for step in grid()]
    model = fit_batch(samples, 30)
    linear = fit(samples, 30)
    held = [[(1, 511)] * 8, [(1, 300)] * 24, [(96, 512)], [(200, 300)] + [(1, 700)] * 4]
    for step in held:
        assert model.step_cost(step) == pytest.approx(TRUE.step_cost(step), rel=0.02), step
    worst_linear = max(abs(linear.step_cost(s) / TRUE.step_cost(s) - 1) for s in held)
    assert worst_linear > 0.15  # what the batch-aware model is for
    assert model.step_cost([(1, 127)] * 8, layers=15) == pytest.approx(model.step_cost([(1, 127)] * 8) / 2)
    assert model.step_cost([]) == 0.0


def test_knots_sit_only_where_steps_were_timed():
    steps = [[(1, 10)], [(1, 90)], [(1, 10)] * 2, [(1, 50)] * 2, [(40, 0)], [(40, 9)], [(20, 0)] * 2, [(40, 90)]]
    model = fit_batch([(s, TRUE.step_cost(s)) for s in steps], 4)
    assert model.knots == (1, 2, 32, 64)  # nothing timed between 2 and 32
    with pytest.raises(CostModelError, match="at least 7"):
        fit_batch([(s, TRUE.step_cost(s)) for s in steps[:6]], 4)
    with pytest.raises(CostModelError):
        fit_batch([], 4)


def test_contention_efficiency_is_the_slowdown_beyond_the_core_share():
    data = {"cores": 2, "processes": [1, 2, 4], "pass_seconds": [1.0, 1.25, 2.5]}
    assert contention_efficiency(data) == pytest.approx((1.0, 0.8, 0.8, 0.8))
    data = {"cores": 2, "processes": [1, 3], "pass_seconds": [1.0, 2.0]}
    assert contention_efficiency(data) == pytest.approx((1.0, 0.875, 0.75))
    assert contention_efficiency(None) == ()


def test_the_engine_loop_s_overhead_is_a_line_through_step_less_execute():
    data = {"batches": [1, 4, 8, 16], "engine_seconds": [0.059, 0.080, 0.105, 0.156],
            "runner_seconds": [0.055, 0.0745, 0.098, 0.1465]}
    fixed, per_seq = loop_overhead(data)
    assert fixed == pytest.approx(0.0035, abs=1e-3) and per_seq == pytest.approx(0.0004, abs=2e-4)
    assert loop_overhead(None) == (0.0, 0.0)
    model = BatchStepModel((1, 2), (0.05, 0.06), 0.0, 0.0, 0.0, 30, 1.0, 0, loop_fixed_s=0.003, loop_per_seq_s=0.001)
    assert model.step_cost([(1, 0)] * 2, layers=15) == pytest.approx(0.06 / 2 + 0.003 + 0.002)


def test_a_link_whose_crowd_slows_it_gives_each_transfer_its_efficiency_share():
    clock = EventLoop()
    net = Network(clock)
    link = Link("bus", 100.0, efficiency=(1.0, 0.5))
    done = []
    net.transfer([link], 100.0, lambda t: done.append(clock.now))
    net.transfer([link], 100.0, lambda t: done.append(clock.now))
    clock.run()
    assert done == pytest.approx([4.0, 4.0])  # 2 on it: 100 x 0.5 / 2 each
    with pytest.raises(ValueError):
        Link("bad", 1.0, efficiency=(1.2,))


@pytest.mark.parametrize("busy,seconds", [(1, 1.0), (2, 1.25), (3, 1.5 / 0.8), (4, 2.5)])
def test_busy_cpu_ranks_run_at_their_core_share_times_the_measured_efficiency(busy, seconds):
    clock = EventLoop()
    net = Network(clock)
    host = CpuHost(CpuHostSpec(2.0, efficiency=(1.0, 0.8, 0.8, 0.8)), 4)
    done = []
    for r in range(busy):
        net.transfer(host.compute(r), 1.0, lambda t: done.append(clock.now))
    clock.run()
    assert done == pytest.approx([seconds] * busy)


def test_a_profile_file_gives_both_models_and_an_old_one_only_the_linear(tmp_path):
    samples = [(step, TRUE.step_cost(step)) for step in grid()]
    linear = fit(samples, 30)
    path = tmp_path / "cost_model.json"
    linear.save(path, extra={"profile": {
        "steps": [{"chunks": [list(c) for c in s], "seconds": t} for s, t in samples],
        "loop": {"batches": [1, 8], "engine_seconds": [0.06, 0.11], "runner_seconds": [0.055, 0.1]},
        "contention": {"cores": 2, "processes": [1, 2], "pass_seconds": [1.0, 1.1]}}})
    host = load_host_profile(path)
    assert host.linear == CostModel.load(path) and host.batch is not None and host.batch.loop_fixed_s > 0
    assert host.efficiency == pytest.approx((1.0, 1 / 1.1))
    linear.save(path)
    old = load_host_profile(path)
    assert old.batch is None and old.efficiency == ()
    with pytest.raises(ValueError):
        linear.save(path, extra={"layers": 3})
    assert json.loads(path.read_text())["layers"] == 30


def test_a_decode_batch_costs_what_the_engine_pads_it_to():
    """The reference engine attends a step's decodes as one batch padded to the widest
    context, rounded up to a page (``engines.step_meta``); a fresh prompt reads nothing
    back and a chunk after cached context reads its whole context."""
    import torch

    from engines.step import SeqChunk
    from engines.step_meta import build_step_meta
    from perf.sim.host_cost import attention_features

    page = 16
    chunks = [(1, 40), (1, 200), (1, 7), (30, 0), (20, 100)]
    seq = [SeqChunk(i, s, n, [list(range(-(-(s + n) // page)))]) for i, (n, s) in enumerate(chunks)]
    meta = build_step_meta(seq, 1, page, torch.device("cpu"))
    width = meta.decode_mask.shape[-1]
    assert width == 208  # 201 tokens of context, in whole pages
    pairs, slots = attention_features(chunks, page)
    assert slots == 3 * width + (20 + 100)  # the fresh prompt gathers nothing
    assert pairs == 3 * width + 30 * 31 // 2 + 20 * 100 + 20 * 21 // 2
    # So one long context makes every row of its batch cost as much, as it does on the engine.
    model = TRUE
    assert model.step_cost([(1, 127)] * 31 + [(1, 1023)]) == pytest.approx(model.step_cost([(1, 1023)] * 32))
    assert model.step_cost([(1, 127)] * 32) < model.step_cost([(1, 127)] * 31 + [(1, 1023)])
