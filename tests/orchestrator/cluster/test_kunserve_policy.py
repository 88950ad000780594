"""--policy kunserve on its own: a burst that overloads the replicas' KV triggers a drop
without any admin call, queued requests are admitted right after, and a restore follows
once the burst has passed."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from build_scripts.sources.tiny import TinySpec
from perf.cluster_client import ServingCluster, complete, reference_completions, run
from tests.conftest import build_tiny_store
from tests.mpi_util import requires_mpirun

pytestmark = requires_mpirun

# Weights large against the KV pool, as on a real GPU: dropping half of them matters.
WIDE = TinySpec(num_layers=8, hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=4, seed=7)
PROMPTS = [f"burst {i}: " + "tokens of context " * 10 for i in range(14)]
MAX_TOKENS = [80] * 14


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    return build_tiny_store(tmp_path_factory.mktemp("wide_policy"), WIDE, splits=(1, 2))[1]


async def burst_and_watch(url: str):
    """Send the burst; sample /admin/state until the cluster is back to replicas and idle."""
    samples = []
    async with aiohttp.ClientSession() as s:
        bodies = [{"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                  for p, n in zip(PROMPTS, MAX_TOKENS)]
        gen = asyncio.gather(*(complete(s, url, b) for b in bodies))
        task = asyncio.ensure_future(gen)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            async with s.get(url + "/admin/state") as r:
                st = await r.json()
            samples.append((time.monotonic(), st))
            restored = any(e["event"] == "restore" for e in st["events"])
            if task.done() and restored:
                break
            await asyncio.sleep(0.1)
        return await task, samples


def test_burst_triggers_drop_then_restore(wide_store):
    expected = reference_completions(wide_store, PROMPTS, MAX_TOKENS)
    with ServingCluster(2, wide_store, "--policy", "kunserve", device_memory="112MiB") as cluster:
        plan = cluster.plan()
        assert (plan["policy"], plan["reshape_policy"], plan["groups"]) == ("kunserve", "kunserve", []), plan
        results, samples = run(burst_and_watch(cluster.url))
        assert [r.token_ids for r in results] == expected
        events = samples[-1][1]["events"]
        kinds = [e["event"] for e in events]
        assert "drop" in kinds and "restore" in kinds, events
        assert kinds.index("drop") < kinds.index("restore")
        drop_time = next(e["time"] for e in events if e["event"] == "drop")
        restore_time = next(e["time"] for e in events if e["event"] == "restore")
        assert restore_time > drop_time
        # The policy decided on its own, because queued demand did not fit...
        decisions = [e for e in events if e["event"] == "decision"]
        assert [d["action"] for d in decisions] == ["drop", "restore"], decisions
        assert decisions[0]["deficit_tokens"] > 0 and decisions[0]["added_tokens"] > 0
        # ...and the group admitted the queue while the burst was still running (no time
        # bound: how soon depends on this host's speed).
        grouped = [st["instances"][0] for _t, st in samples if len(st["instances"]) == 1]
        assert grouped, "never saw the group serving"
        assert any(i["waiting"] == 0 and i["running"] > 0 for i in grouped), grouped
        state = cluster.wait_all_free(timeout=10)
        assert all(r["role"] == "replica" and r["kv_pages_used"] == 0 for r in state["ranks"])
