"""Prefix caching in the served cluster (``--enable-prefix-caching``): greedy tokens are
the single-process engine's, requests after the first hit the shared system prompt (in
usage, the request log, /admin/state and /metrics), no page is left in use, and a drop is
refused while caching is on; two replicas (-n 2) and a pipelined group beside a replica."""

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
    with ServingCluster(n, tiny_store, "--enable-prefix-caching", "--page-size", "4", "--request-log", str(log),
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
        async def drop():
            async with aiohttp.ClientSession() as s:
                async with s.post(cluster.url + "/admin/drop", json={"group": [0, 1]}) as r:
                    return r.status, await r.json()
        status, body = run(drop())
        assert status == 409 and "prefix caching is on" in body["error"]["message"], body
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["cached_tokens"] for r in records) == sorted(cached)
