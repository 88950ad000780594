"""The cluster under ``mpirun``: replicas, pipelined groups and mixes give the single-process
engine's greedy tokens, with many concurrent streaming requests; every KV page is free after."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.mpi_util import assert_gone, requires_mpirun
from perf.cluster_client import (ServingCluster, complete, reference_completions, run)

pytestmark = requires_mpirun

PROMPTS = [f"Request {i}: " + "some words to make prompts of different lengths " * (i % 4) for i in range(12)]
MAX_TOKENS = [4 + (7 * i) % 21 for i in range(12)]


@pytest.fixture(scope="module")
def expected(tiny_store):
    return reference_completions(tiny_store, PROMPTS, MAX_TOKENS)


async def burst(url: str, stream: bool = True) -> list:
    async with aiohttp.ClientSession() as session:
        bodies = [{"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream}
                  for p, n in zip(PROMPTS, MAX_TOKENS)]
        return await asyncio.gather(*(complete(session, url, b) for b in bodies))


@pytest.mark.parametrize("n,groups", [
    (2, None),          # two replicas
    (2, "0-1"),         # one pp=2 group
    (4, None),          # four replicas
    (4, "0-3"),         # one pp=4 group
    (4, "0-1"),         # mixed: ranks 0-1 grouped, 2 and 3 replicas
])
def test_greedy_outputs_match_single_process_engine(tiny_store, expected, n, groups):
    args = ["--groups", groups] if groups else []
    with ServingCluster(n, tiny_store, *args) as cluster:
        pids = cluster.rank_pids()
        assert len(pids) == n
        state = cluster.state()
        sizes = sorted(len(i["ranks"]) for i in state["instances"])
        assert sizes == sorted({None: [1] * n, "0-1": [2] if n == 2 else [1, 1, 2], "0-3": [4]}[groups])
        results = run(burst(cluster.url))
        for r, want, n_tok in zip(results, expected, MAX_TOKENS):
            assert r.status == 200 and r.error is None, r
            assert r.token_ids == want and len(want) == n_tok
            assert r.finish_reason == "length"
        plain = run(burst(cluster.url, stream=False))
        assert [r.token_ids for r in plain] == expected
        state = cluster.wait_all_free()
        assert all(r["kv_pages_used"] == 0 for r in state["ranks"]), state
        assert all(i["waiting"] == 0 and i["running"] == 0 for i in state["instances"]), state
        assert state["queued"] == 0
        stopped = time.monotonic()
    # mpirun ends on SIGTERM (status 1: it was signalled), without the SIGKILL fallback,
    # and takes every rank with it.
    assert not cluster.killed, "the job outlived SIGTERM by 20 s and was killed"
    assert_gone(pids, stopped, within=10)
