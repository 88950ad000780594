"""Simulated instances run the project's own scheduler with modelled step times: a lone
request's token times are the cost model's steps added up, on a replica and through a
pipeline's stages and links; a pool too small for the load makes the real scheduler
preempt (and every request still ends); swap preemption books its copies on the host path;
a run is deterministic; ranks that outnumber the cores share them."""

from __future__ import annotations

import pytest

from engines.mapping import LayerRange
from orchestrator.core.block_manager import PoolSpec
from perf.sim.loop_turns import Controller
from perf.sim.instance import SimInstance, SimRequest
from tests.perf.sim.sim_helpers import COST, LAYERS, burst, context, simulate


def _decode_times(t: float, start: int, n: int, step) -> list[float]:
    out = []
    for s in range(start, start + n):  # each decode attends everything before it
        t += step([(1, s)])
        out.append(t)
    return out


def test_a_lone_requests_tokens_come_at_the_cost_models_step_times():
    sim = SimRequest("a", 1.0, list(range(100)), max_tokens=4)
    result = simulate([sim], 1, context(pages=400))
    # Prefill: 100 tokens in chunks of 64 and 36 (the token budget), the second samples.
    t = 1.0 + COST.step_cost([(64, 0)], LAYERS) + COST.step_cost([(36, 64)], LAYERS)
    want = [t] + _decode_times(t, 100, 3, lambda c: COST.step_cost(c, LAYERS))
    assert sim.token_times_s == pytest.approx(want) and sim.finish_s == pytest.approx(want[-1])
    assert sim.error is None and sim.preemptions == 0 and result.steps == 5


def test_a_pipeline_runs_each_stage_on_its_rank_and_sends_activations_between_them():
    ctx = context(pages=400)
    lay = ctx.layout
    group = SimInstance(ctx, (0, 1), [LayerRange(0, 2), LayerRange(2, 4)],
                        [PoolSpec(LayerRange(0, 2), 400), PoolSpec(LayerRange(2, 4), 400)])
    sim = SimRequest("a", 0.0, list(range(20)), max_tokens=3)
    group.add(sim)
    ctx.clock.run()
    bus = ctx.fabric.path(0, 1)[0]

    def step(chunks):  # two half-model stages, the activations and the sampled token's return
        tokens = sum(n for n, _ in chunks)
        return (2 * COST.step_cost(chunks, 2) + tokens * ctx.activation_bytes / bus.bandwidth
                + 8 / bus.bandwidth + 2 * bus.latency)
    t = step([(20, 0)])
    assert lay.num_layers == LAYERS
    assert sim.token_times_s == pytest.approx([t] + _decode_times(t, 20, 2, step))
    assert ctx.rank(0).jobs == ctx.rank(1).jobs == 3


def test_a_pool_too_small_makes_the_real_scheduler_preempt_and_everything_still_ends():
    tight = simulate(burst(8, 40, 40), 1, context(pages=4 * 50))  # 50 blocks: room for about 2.5 requests
    roomy = simulate(burst(8, 40, 40), 1, context(pages=4 * 1000))
    assert sum(s.preemptions for s in tight.requests) > 0 and sum(s.preemptions for s in roomy.requests) == 0
    assert all(len(s.token_times_s) == 40 and s.error is None for s in tight.requests + roomy.requests)
    assert tight.makespan_s > roomy.makespan_s  # recomputation costs time


def test_swap_preemption_moves_kv_over_the_host_path_instead_of_recomputing():
    ctx = context(pages=4 * 50, swap=1 << 30)
    result = simulate(burst(8, 40, 40), 1, ctx, policy="swap")
    assert all(len(s.token_times_s) == 40 and s.error is None for s in result.requests)
    moved = ctx.net.bytes_moved.get("host memory bus", 0)
    assert moved > 0 and sum(s.preemptions for s in result.requests) > 0  # each swap-out counts as one
    pages = moved / ctx.layout.page_bytes  # whole pages of computed tokens, out and back in
    assert pages == pytest.approx(round(pages)) and round(pages) % (2 * LAYERS) == 0


def test_a_request_that_cannot_fit_fails_with_the_schedulers_reason():
    [sim] = simulate([SimRequest("big", 0.0, [1] * 300, 4)], 1, context(pages=4 * 20)).requests
    assert "does not fit the KV cache" in sim.error and not sim.token_times_s


def test_the_same_stream_gives_the_same_times():
    a = simulate(burst(12, 30, 20), 2, context(pages=4 * 60))
    b = simulate(burst(12, 30, 20), 2, context(pages=4 * 60))
    assert [s.token_times_s for s in a.requests] == [s.token_times_s for s in b.requests]


def test_ranks_that_outnumber_the_cores_share_them():
    def lone_steps(cores):
        reqs = [SimRequest(f"r{i}", 0.0, [7] * 10, 1) for i in range(2)]  # one prefill step each, at once
        ctx = context(pages=400, cores=cores)
        ctx.controller = Controller(rank=-1)  # on no serving rank: both dispatched at once
        simulate(reqs, 2, ctx)
        return [s.finish_s for s in reqs]
    step = COST.step_cost([(10, 0)], LAYERS)
    assert lone_steps(None) == pytest.approx([step, step])
    assert lone_steps(2) == pytest.approx([step, step])  # a core each
    assert lone_steps(1) == pytest.approx([2 * step, 2 * step])  # half a core each
