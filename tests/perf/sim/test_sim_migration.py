"""Llumnix in the simulator: the real llumnix policy picks the pairs, ``SimMigration`` moves
a running request's KV in stages over the fabric while it keeps decoding, stops it for the
last pages, and the destination adopts it on the pages it reserved. The bytes on the bus are
the pages the stages carried, nothing is recomputed, and the pages are audited."""

from __future__ import annotations

import pytest

from engines.paging import pages_for_tokens
from orchestrator.cluster.migration import MAX_STAGES
from perf.sim.cluster import SimCluster
from perf.sim.migration import MigrationPhase, SimMigration
from perf.sim.fabric import CpuHost, CpuHostSpec
from tests.perf.sim.sim_helpers import LAYERS, PAGE, burst, context

PAGES = 4 * 60  # 240 tokens per replica


def _loaded_on_rank_0(monkeypatch, n: int = 6, prompt: int = 30, out: int = 60):
    """Two replicas; every request arrives at replica 0 (a dispatcher that went wrong), so
    only migration can use replica 1."""
    ctx = context(pages=PAGES, seqs=16)
    cluster = SimCluster(ctx, 2, "llumnix")
    monkeypatch.setattr(cluster, "_arrive", lambda sim: cluster.instances[0].add(sim))
    result = cluster.run(burst(n, prompt, out, gap=0.02))
    return ctx, cluster, result


def test_llumnix_moves_running_requests_with_their_kv_from_the_loaded_replica(monkeypatch):
    ctx, cluster, result = _loaded_on_rank_0(monkeypatch)
    done = [m for m in result.migrations if m.ok]
    assert done, [m.reason for m in result.migrations]
    lay = ctx.layout
    for m in done:
        assert (m.src, m.dst) == (0, 1) and 1 <= m.stages <= MAX_STAGES + 1
        assert m.kv_bytes % (LAYERS * lay.page_bytes) == 0 and m.kv_bytes > 0
        assert m.done_s > m.started_s and m.stop_s >= 0
    # The bus carried exactly the stages' pages (replicas send no activations).
    assert ctx.net.bytes_moved["host memory bus"] == pytest.approx(sum(m.kv_bytes for m in result.migrations))
    moved_ids = {m.request_id for m in done}
    for sim in result.requests:
        assert len(sim.token_times_s) == sim.max_tokens and sim.error is None
        assert sim.migrations == (sim.request_id in moved_ids)
        if sim.request_id in moved_ids:
            assert sim.preemptions == 0  # its KV went with it: nothing recomputed
    assert ctx.rank(1).jobs > 0  # replica 1 served the migrated requests' steps
    for inst in cluster.instances.values():
        inst.scheduler.blocks.audit([r for r, _ in inst.requests.values()])
        assert all(a.num_free == a.num_pages for a in inst.scheduler.blocks.allocators)


def test_a_migration_carries_at_least_the_request_s_pages_and_ends_within_the_stage_limit(monkeypatch):
    ctx, _, result = _loaded_on_rank_0(monkeypatch, n=8, prompt=40, out=80)
    lay = ctx.layout
    prompt_bytes = pages_for_tokens(40, PAGE) * LAYERS * lay.page_bytes
    done = [m for m in result.migrations if m.ok]
    assert done and all(m.kv_bytes >= prompt_bytes for m in done)
    assert all(m.reason for m in result.migrations if not m.ok)


def test_a_request_that_finishes_during_the_copy_cancels_the_migration_and_frees_the_reservation():
    ctx = context(pages=PAGES, seqs=16)
    ctx.fabric = CpuHost(CpuHostSpec(None, copy_bandwidth=1e3), 8)  # a copy of seconds
    cluster = SimCluster(ctx, 2, "llumnix")
    src, dst = cluster.instances[0], cluster.instances[1]
    (sim,) = burst(1, 30, 4)
    src.add(sim)
    ctx.clock.run(until=0.03)  # prefilled, decoding
    assert src.scheduler.running and src.scheduler.running[0].num_computed_tokens >= 30
    ends = []
    m = SimMigration(ctx, 1, src, dst, 200, ends.append)
    m.start()
    assert m.phase == MigrationPhase.COPYING and dst.scheduler.blocks.allocators[0].num_free < PAGES
    ctx.clock.run(until=60.0)
    assert ends == [m] and m.phase == MigrationPhase.CANCELLED and not m.record.ok
    assert "left the running set" in m.record.reason
    assert len(sim.token_times_s) == 4 and sim.finish_s < 1.0  # it finished at the source meanwhile
    assert dst.scheduler.blocks.allocators[0].num_free == PAGES and not src.held
