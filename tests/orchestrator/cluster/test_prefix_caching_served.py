"""Prefix caching in the served cluster (on by default): greedy tokens are the
single-process engine's without caching, requests after the first hit the shared system
prompt (in usage, the request log, /admin/state and /metrics), no page is left in use; two
replicas (-n 2) and a pipelined group beside a replica. Across a drop and a restore under
-n 2 and -n 4: a prefix cached before the drop is hit by requests that run across it, hit
inside the group and hit after the restore, with the same tokens and no recomputation."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from perf.cluster_client import ServingCluster, reference_completions, run
from tests.mpi_util import requires_mpirun

pytestmark = requires_mpirun

SYSTEM = "You are a careful assistant. Answer in one short sentence, and be precise. "
PROMPTS = [SYSTEM + q for q in ("What is a page?", "What is a prefix?", "What is a cache?", "Why share?",
                                "What is a page?", "Name a colour.")]
MAX_TOKENS = [6] * len(PROMPTS)


@pytest.fixture(scope="module")
def expected(tiny_store):
    return reference_completions(tiny_store, PROMPTS, MAX_TOKENS)


async def _answers(url: str, prompts: list[str]) -> list[dict]:
    async with aiohttp.ClientSession() as s:
        async def one(p):
            body = {"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json()
        first = [await one(prompts[0])]  # the system prompt is cached after this one
        return first + list(await asyncio.gather(*(one(p) for p in prompts[1:])))


@pytest.mark.parametrize("n,args", [(2, ()), (3, ("--groups", "0-1"))])
def test_served_prefix_caching_gives_the_engines_tokens_and_hits(tiny_store, expected, tmp_path, n, args):
    log = tmp_path / "requests.jsonl"
    with ServingCluster(n, tiny_store, "--page-size", "4", "--request-log", str(log),
                        *args, device_memory="128MiB") as cluster:
        answers = run(_answers(cluster.url, PROMPTS))
        assert [a["choices"][0]["token_ids"] for a in answers] == expected
        cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
        assert cached[0] == 0 and any(c > 0 for c in cached[1:]), cached
        state = cluster.wait_all_free(timeout=10)
        assert all(r["kv_pages_used"] == 0 for r in state["ranks"]), state["ranks"]  # cached pages count as free
        counters = state["counters"]
        assert counters["prefix_cache_hits"] == sum(cached) and counters["prefix_cache_queries"] > sum(cached)
        async def get(path):
            async with aiohttp.ClientSession() as s:
                async with s.get(cluster.url + path) as r:
                    return r.status, await r.text()
        _, metrics = run(get("/metrics"))
        model = tiny_store.resolve().name  # the served name: the store's folder
        assert f'vllm:prefix_cache_hits_total{{model_name="{model}"}} {sum(cached)}' in metrics, metrics
        assert f"kunserve_prefix_cache_hits_total {sum(cached)}" in metrics
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["cached_tokens"] for r in records) == sorted(cached)


LONG = [SYSTEM + f"Tell story number {i}, slowly." for i in range(8)]
LONG_TOKENS = 160
PROBES = [SYSTEM + "What is a page?", SYSTEM + "Inside the group, what is a stage?",
          SYSTEM + "After the restore, what is a replica?"]


@pytest.fixture(scope="module")
def expected_reshape(tiny_store):
    return reference_completions(tiny_store, LONG + PROBES, [LONG_TOKENS] * len(LONG) + [6] * len(PROBES))


async def _across_reshape(url: str, ranks: list[int]):
    """Cache the system prompt, start long requests that share it, drop; a probe inside the
    group; restore while the long ones still run; a probe after."""
    async with aiohttp.ClientSession() as s:
        async def one(prompt, n):
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        async def post(path):
            async with s.post(url + path, json={"group": ranks}) as r:
                return r.status, await r.json()
        before = await one(PROBES[0], 6)
        long = asyncio.gather(*(one(p, LONG_TOKENS) for p in LONG))
        await asyncio.sleep(0.1)
        drop = await post("/admin/drop")
        inside = await one(PROBES[1], 6)
        restore = await post("/admin/restore")
        after = await one(PROBES[2], 6)
        return before, await long, drop, inside, restore, after


@pytest.mark.parametrize("n", [2, 4])
def test_cached_prefixes_are_hit_across_a_drop_and_a_restore(tiny_store, expected_reshape, n):
    ranks = list(range(n))
    with ServingCluster(n, tiny_store, "--page-size", "4", "--max-num-batched-tokens", "48",
                        device_memory="128MiB") as cluster:
        before, long, drop, inside, restore, after = run(_across_reshape(cluster.url, ranks))
        assert drop[0] == 200 and restore[0] == 200, (drop, restore)
        answers = long + [before, inside, after]
        assert [a["choices"][0]["token_ids"] for a in answers] == expected_reshape[:len(LONG)] + expected_reshape[len(LONG):]
        cached = lambda a: a["usage"]["prompt_tokens_details"]["cached_tokens"]  # noqa: E731
        assert any(cached(a) > 0 for a in long), "no request hit the prefix cached before the drop"
        assert cached(inside) > 0, "no hit inside the group"
        assert cached(after) > 0, "no hit after the restore"
        state = cluster.wait_all_free(timeout=10)
        events, counters = state["events"], state["counters"]
        assert counters.get("preemptions", 0) == 0 and counters.get("exchange_recomputes", 0) == 0, counters
        [drop_event] = [e for e in events if e["event"] == "drop"]
        [exchange] = [e for e in events if e["event"] == "exchange"]
        [moves] = [e for e in events if e["event"] == "restore_moves"]
        assert drop_event["stale"] > 0 and exchange["recomputed"] == 0 and exchange["bytes"] > 0, exchange
        # The restore copies the shared blocks to each member that keeps a sharer (the layers
        # it did not run in the group): their pages move, once per member.
        assert moves["block_pages"] > 0 and moves["recomputed"] == 0, moves
        assert all(r["kv_pages_used"] == 0 and r["role"] == "replica" for r in state["ranks"]), state["ranks"]
