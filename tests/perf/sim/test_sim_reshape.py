"""KunServe in the simulator: the real kunserve policy (load monitor and drop planner)
decides, the simulated cluster drops, exchanges and restores. The exchange moves exactly
the pages of the layers each request's home no longer runs, the restore pulls exactly the
layers each member dropped, both over the fabric's links; pages are audited; and the burst
that overloads the replicas is served with a lower tail TTFT than under vllm."""

from __future__ import annotations

import pytest

from engines.paging import pages_for_tokens
from orchestrator.policy.reshape import NeverReshape
from perf.bench_stats import percentiles
from perf.sim.cluster import SimCluster
from tests.perf.sim.sim_helpers import LAYERS, PAGE, burst, context

# Replicas of 4 * 60 pages (60 blocks, 240 tokens each); each layer's weights are 150 pages,
# so a pp2 stage frees 2 * 150 pages: its pool holds 4x the tokens per layer it keeps.
PAGES, WEIGHT_PAGES = 4 * 60, 150


def _run(policy: str, **kw):
    ctx = context(pages=PAGES, layer_weight_pages=WEIGHT_PAGES, seqs=16, **kw)
    cluster = SimCluster(ctx, 2, policy)
    reqs = burst(24, 40, 60, gap=0.02) + [r for r in burst(4, 20, 10, gap=0.5)]
    for i, r in enumerate(reqs[24:]):  # a trickle long after the burst, to see the restore happen
        r.request_id, r.arrival_s = f"late{i}", 30.0 + r.arrival_s
    return ctx, cluster, cluster.run(reqs)


def _ttft_p99(result) -> float:
    return percentiles([s.token_times_s[0] - s.arrival_s for s in result.requests])[2]


def test_kunserve_drops_exchanges_and_restores_with_the_bytes_its_requests_hold():
    ctx, cluster, result = _run("kunserve")
    kinds = [r.kind for r in result.reshapes]
    assert kinds[:2] == ["drop", "restore"], kinds
    drop, restore = result.reshapes[0], result.reshapes[1]
    lay = ctx.layout
    # Every member keeps 2 of 4 layers and frees the other two.
    assert drop.weight_bytes == 2 * 2 * lay.layer_weight_bytes
    assert restore.weight_bytes == 2 * 2 * lay.layer_weight_bytes
    assert drop.kv_bytes > 0 and drop.kv_bytes % (2 * lay.page_bytes) == 0  # two layers' pages per request
    assert drop.serving_s - drop.started_s >= ctx.fabric.remap_seconds(2 * lay.layer_weight_bytes)
    moved = ctx.net.bytes_moved["host memory bus"]
    activations = moved - sum(r.kv_bytes + (r.weight_bytes if r.kind == "restore" else 0) for r in result.reshapes)
    assert activations > 0  # the group's stages passed activations (and tokens) over the same bus
    assert all(len(s.token_times_s) == s.max_tokens and s.error is None for s in result.requests)
    assert cluster.topology.instances == ((0,), (1,))  # back to replicas after the burst


def test_the_exchange_moves_each_stale_requests_pages_of_the_layers_its_home_dropped(monkeypatch):
    from perf.sim.instance import SimInstance
    exported = []
    real_export = SimInstance.export

    def export(self):
        out = real_export(self)
        exported.append(out)
        return out
    monkeypatch.setattr(SimInstance, "export", export)
    ctx, cluster, result = _run("kunserve")
    drop = result.reshapes[0]
    moved = exported[0] + exported[1]  # the two replicas' requests, handed to the group
    stale = [m for m in moved if m.computed]
    assert stale and len(moved) == drop.requests and drop.recomputed == 0
    # Each one's pages of the two layers its home does not run in the group.
    want = sum(pages_for_tokens(m.computed, PAGE) * 2 * ctx.layout.page_bytes for m in stale)
    assert drop.kv_bytes == want
    assert drop.done_s > drop.serving_s  # the exchange ran while the group served


def test_kunserve_cuts_the_bursts_tail_ttft_against_vllm_on_the_same_stream():
    _, _, kun = _run("kunserve")
    _, _, base = _run("vllm")
    assert not base.reshapes and kun.reshapes
    assert _ttft_p99(kun) < 0.8 * _ttft_p99(base)
    assert sum(s.preemptions for s in kun.requests) < sum(s.preemptions for s in base.requests)


def test_the_simulator_runs_whatever_policy_it_is_given():
    ctx = context(pages=PAGES, layer_weight_pages=WEIGHT_PAGES, seqs=16)
    result = SimCluster(ctx, 2, "kunserve", reshape=NeverReshape()).run(burst(24, 40, 60, gap=0.02))
    assert not result.reshapes and result.decision_s  # the ticks ran, the policy never reshaped


def test_pages_are_audited_after_every_reshape(monkeypatch):
    from perf.sim import reshape as sim_reshape
    audits = []
    real_post = sim_reshape.SimDrop._post

    def audited(self):
        real_post(self)
        self.group.scheduler.blocks.audit(r for r, _ in self.group.requests.values())
        audits.append(len(self.group.requests))
    monkeypatch.setattr(sim_reshape.SimDrop, "_post", audited)
    _run("kunserve")
    assert audits
