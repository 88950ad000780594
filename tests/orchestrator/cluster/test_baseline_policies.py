"""The baselines on the same cluster: under a burst that overloads the replicas' KV, swap
preemption and the oracle's unbounded pool give the single-process engine's greedy tokens;
swap really swaps (and never recomputes), the oracle never preempts."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from perf.cluster_client import ServingCluster, complete, reference_completions, run
from tests.conftest import build_tiny_store
from tests.mpi_util import requires_mpirun
from tests.orchestrator.cluster.test_kunserve_policy import MAX_TOKENS, PROMPTS, WIDE

pytestmark = requires_mpirun


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    store = build_tiny_store(tmp_path_factory.mktemp("wide_baselines"), WIDE, splits=(1, 2))[1]
    return store, reference_completions(store, PROMPTS, MAX_TOKENS)


async def burst(url: str):
    async with aiohttp.ClientSession() as s:
        bodies = [{"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                  for p, n in zip(PROMPTS, MAX_TOKENS)]
        return await asyncio.gather(*(complete(s, url, b) for b in bodies))


@pytest.mark.parametrize("policy,caching", [("vllm", False), ("swap", False), ("oracle", False),
                                            ("vllm", True), ("swap", True)])
def test_burst_tokens_match_and_the_mechanism_acted(wide, policy, caching):
    """With prefix caching too: recompute preemption and swap of requests whose pages may
    be shared give the same tokens, and no page is left in use."""
    store, expected = wide
    extra = () if caching else ("--no-enable-prefix-caching",)
    with ServingCluster(2, store, "--policy", policy, "--dispatch", "round_robin", *extra,
                        device_memory="112MiB") as c:
        plan = c.plan()
        assert (plan["policy"], plan["reshape_policy"], plan["groups"]) == (policy, "never", []), plan
        results = run(burst(c.url))
        assert [r.token_ids for r in results] == expected
        state = c.wait_all_free(timeout=10)
        counters = state["counters"]
        assert all(r["kv_pages_used"] == 0 for r in state["ranks"]), state["ranks"]
    # every request's final chunk carries its own count; together they are the cluster's
    assert sum(r.num_preemptions for r in results) == counters.get("preemptions", 0)
    if caching and policy == "vllm":  # a recomputed request found its own prefix in the cache
        assert counters.get("prefix_cache_hits", 0) > 0, counters
    if policy == "vllm":
        assert counters.get("preemptions", 0) > 0 and counters.get("swaps", 0) == 0, counters
    elif policy == "swap":
        assert counters.get("swaps", 0) > 0 and counters["swaps"] == counters["preemptions"], counters
    else:
        assert counters.get("preemptions", 0) == 0, counters


# Round robin puts every long request on rank 0 and every short one on rank 1: rank 0's KV
# overloads while rank 1 empties, so Llumnix migrates running requests from 0 to 1.
SKEWED_PROMPTS = [f"skew {i}: " + ("tokens of context " * 10 if i % 2 == 0 else "hi") for i in range(14)]
SKEWED_MAX = [80 if i % 2 == 0 else 4 for i in range(14)]


@pytest.mark.parametrize("caching", [False, True])
def test_llumnix_migrates_running_requests_and_keeps_their_tokens(wide, caching):
    """With prefix caching, the prompts share a prefix, so migrated requests leave shared
    pages behind (their source keeps them cached) and arrive with pages of their own."""
    store, _ = wide
    prompts = [("A shared opening for every request. " if caching else "") + p for p in SKEWED_PROMPTS]
    expected = reference_completions(store, prompts, SKEWED_MAX)

    async def skewed(url):
        async with aiohttp.ClientSession() as s:
            bodies = [{"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                      for p, n in zip(prompts, SKEWED_MAX)]
            return await asyncio.gather(*(complete(s, url, b) for b in bodies))

    extra = () if caching else ("--no-enable-prefix-caching",)
    with ServingCluster(2, store, "--policy", "llumnix", "--dispatch", "round_robin", *extra,
                        device_memory="112MiB") as c:
        assert (c.plan()["policy"], c.plan()["reshape_policy"]) == ("llumnix", "never")
        results = run(skewed(c.url))
        assert [r.token_ids for r in results] == expected
        state = c.wait_all_free(timeout=10)
        assert all(r["kv_pages_used"] == 0 for r in state["ranks"]), state["ranks"]
    migrations = [e for e in state["events"] if e["event"] == "migration"]
    if caching:  # the shared opening was served from the cache
        assert state["counters"].get("prefix_cache_hits", 0) > 0, state["counters"]
    assert state["counters"].get("migrations", 0) == len(migrations) > 0, state["counters"]
    assert sum(r.num_migrations for r in results) == len(migrations)  # per request, as the final chunk says
    assert all(e["ranks"] == [0, 1] and e["bytes"] > 0 for e in migrations), migrations
    # each moved live: at least one copy while decoding, then the final stop's copy
    assert all(e["stages"] >= 2 and 0 < e["stop_seconds"] < e["seconds"] for e in migrations), migrations
