"""Simulated replicas run the project's own scheduler with modelled step times: a lone
request's token times are the cost model's steps added up; a pool too small for the load
makes the real scheduler preempt (and every request still ends); a run is deterministic;
and ``python -m perf.sim``'s run on a tiny preset writes perf.bench's reports."""

from __future__ import annotations

import json

import pytest

from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.kunserve.cost_model import CostModel
from perf.sim.__main__ import run
from perf.sim.cluster import simulate
from perf.sim.replica import ReplicaSpec, SimRequest
from tests.perf.bench_helpers import tiny_preset

COST = CostModel(fixed_s=0.010, per_token_s=1e-4, per_attention_s=1e-7, per_seq_s=2e-4, layers=4)
LAYERS, PAGE = 4, 4


def spec(pages: int, budget: int = 64, seqs: int = 8) -> ReplicaSpec:
    return ReplicaSpec(LAYERS, pages, PAGE, 512, SchedulerConfig(budget, seqs, enable_prefix_caching=False))


def test_a_lone_requests_tokens_come_at_the_cost_models_step_times():
    sim = SimRequest("a", 1.0, list(range(100)), max_tokens=4)
    result = simulate([sim], 1, spec(pages=400), COST)
    # Prefill: 100 tokens in chunks of 64 and 36 (the token budget), the second samples.
    t = 1.0 + COST.step_cost([(64, 0)], LAYERS) + COST.step_cost([(36, 64)], LAYERS)
    want = [t]
    for s in range(100, 103):  # each decode attends everything before it
        t += COST.step_cost([(1, s)], LAYERS)
        want.append(t)
    assert sim.token_times_s == pytest.approx(want) and sim.finish_s == pytest.approx(want[-1])
    assert sim.error is None and sim.preemptions == 0 and result.steps == 5


def _burst(n: int, prompt: int, out: int) -> list[SimRequest]:
    return [SimRequest(f"r{i}", 0.01 * i, [i % 50] * prompt, out) for i in range(n)]


def test_a_pool_too_small_makes_the_real_scheduler_preempt_and_everything_still_ends():
    tight = simulate(_burst(8, 40, 40), 1, spec(pages=4 * 50), COST)  # 50 blocks: room for about 2.5 requests
    roomy = simulate(_burst(8, 40, 40), 1, spec(pages=4 * 1000), COST)
    assert sum(s.preemptions for s in tight.requests) > 0 and sum(s.preemptions for s in roomy.requests) == 0
    assert all(len(s.token_times_s) == 40 and s.error is None for s in tight.requests + roomy.requests)
    assert tight.makespan_s > roomy.makespan_s  # recomputation costs time


def test_a_request_that_cannot_fit_fails_with_the_schedulers_reason():
    [sim] = simulate([SimRequest("big", 0.0, [1] * 300, 4)], 1, spec(pages=4 * 20), COST).requests
    assert "does not fit the KV cache" in sim.error and not sim.token_times_s


def test_the_same_stream_gives_the_same_times():
    a = simulate(_burst(12, 30, 20), 2, spec(pages=4 * 60), COST)
    b = simulate(_burst(12, 30, 20), 2, spec(pages=4 * 60), COST)
    assert [s.token_times_s for s in a.requests] == [s.token_times_s for s in b.requests]


def test_perf_sim_runs_a_preset_and_writes_the_bench_reports(small_trace, tiny_store, tmp_path):
    p = tiny_preset(small_trace, tiny_store)
    text = run(p, "tiny", ["vllm", "oracle"], COST, tmp_path / "sim")
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert set(summary["policies"]) == {"vllm", "oracle"} and "| vllm |" in text
    assert summary["meta"]["runs"]["vllm"]["steps"] > 0
    lines = (tmp_path / "sim" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 2 * summary["policies"]["vllm"]["requests"]


def test_ranks_that_outnumber_the_cores_share_them():
    def lone_steps(cores):
        reqs = [SimRequest(f"r{i}", 0.0, [7] * 10, 1) for i in range(2)]  # one prefill step each, at once
        simulate(reqs, 2, spec(pages=400), COST, host_cores=cores)
        return [s.finish_s for s in reqs]
    step = COST.step_cost([(10, 0)], LAYERS)
    assert lone_steps(None) == pytest.approx([step, step])
    assert lone_steps(2) == pytest.approx([step, step])  # a core each
    assert lone_steps(1) == pytest.approx([2 * step, 2 * step])  # half a core each
