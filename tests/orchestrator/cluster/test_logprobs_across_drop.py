"""Log-probabilities survive a drop, its live KV exchange and a restore: requests in flight
across them answer with the same tokens, the same output log-probabilities and (echoed)
the same prompt log-probabilities as without them. They travel in the requests' exported
state (``ExportedRequest.logprobs``), so a lost or duplicated one would show here."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from perf.cluster_client import ServingCluster, run
from tests.mpi_util import requires_mpirun

pytestmark = requires_mpirun

PROMPTS = [f"Logprob request {i}: " + "some context words " * (2 + 3 * (i % 4)) for i in range(8)]


async def _one(s: aiohttp.ClientSession, url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "logprobs": 2, "echo": True,
            "stream": True}
    text, tokens, lps, tops = "", [], [], []
    async with s.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: {"):
                import json
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                tokens += choice["token_ids"]
                if choice["logprobs"]:
                    lps += choice["logprobs"]["token_logprobs"]
                    tops += [sorted(t) if t else None for t in choice["logprobs"]["top_logprobs"]]
    return {"text": text, "tokens": tokens, "logprobs": lps, "tops": tops}


async def _all(url: str, drop: bool) -> list[dict]:
    async with aiohttp.ClientSession() as s:
        work = asyncio.gather(*(_one(s, url, p) for p in PROMPTS))
        if drop:
            await asyncio.sleep(0.05)
            async with s.post(url + "/admin/drop", json={"group": [0, 1]}) as r:
                assert r.status == 200, await r.text()
            await asyncio.sleep(0.1)
            async with s.post(url + "/admin/restore", json={"group": [0, 1]}) as r:
                assert r.status == 200, await r.text()
        return await work


def test_logprobs_are_the_same_across_a_drop_and_a_restore(tiny_store):
    with ServingCluster(2, tiny_store, "--max-num-batched-tokens", "24") as cluster:
        want = run(_all(cluster.url, drop=False))
        got = run(_all(cluster.url, drop=True))
        events = cluster.state()["events"]
    assert sum(e["stale"] for e in events if e["event"] == "drop") > 0, "no request had KV at the drop"
    for g, w, prompt in zip(got, want, PROMPTS):
        assert g["tokens"] == w["tokens"] and g["text"] == w["text"] and g["text"].startswith(prompt)
        assert len(g["logprobs"]) == len(w["logprobs"])  # every prompt and output position, once
        assert g["logprobs"][0] is None and g["logprobs"][1:] == pytest.approx(w["logprobs"][1:], abs=1e-5)
        assert g["tops"] == w["tops"]
