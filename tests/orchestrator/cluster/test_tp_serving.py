"""``serve --tp 2`` under ``mpirun -n 4``: two TP2 replicas. Each instance's leader is the
cluster's rank and its follower mirrors the leader's steps on its own shard (half the heads,
half the MLP, its own KV heads), so the greedy tokens must be the single-process engine's
(tp = 1, no caching). The followers' logs prove they ran the steps."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from build_scripts.sources.tiny import TinySpec
from perf.cluster_client import ServingCluster, complete, reference_completions, run
from tests.conftest import build_tiny_store
from tests.mpi_util import requires_mpirun

pytestmark = requires_mpirun

PROMPTS = [f"TP request {i}: " + "words of context " * (1 + 2 * (i % 3)) for i in range(8)]
MAX_TOKENS = [12 + 5 * (i % 4) for i in range(8)]


@pytest.fixture(scope="module")
def tp_store(tmp_path_factory):
    return build_tiny_store(tmp_path_factory.mktemp("tp_serving"), TinySpec(), splits=(1,), tp_sizes=(1, 2))[1]


async def _burst(url: str):
    async with aiohttp.ClientSession() as s:
        return await asyncio.gather(*(complete(s, url, {"prompt": p, "max_tokens": n, "temperature": 0,
                                                        "ignore_eos": True, "stream": True})
                                      for p, n in zip(PROMPTS, MAX_TOKENS)))


def test_two_tp2_replicas_give_the_single_process_engines_tokens(tp_store):
    expected = reference_completions(tp_store, PROMPTS, MAX_TOKENS)
    with ServingCluster(4, tp_store, "--tp", "2", "--max-num-batched-tokens", "16") as cluster:
        results = run(_burst(cluster.url))
        assert [r.token_ids for r in results] == expected
        state = cluster.wait_all_free(timeout=10)
        assert len(state["ranks"]) == 2, state["ranks"]  # the cluster sees one rank per TP set
    log = cluster.output()
    assert len(re.findall(r"tp rank 1 of 2", log)) == 2, "each follower loads its shard"
    ran = re.findall(r"\[rank (\d)\] INFO orchestrator.cluster.tp_set: tp follower: ran the leader's first step", log)
    assert sorted(ran) == ["1", "3"], "both followers ran steps (a leader would wait in its all-reduce otherwise)"


def test_a_tp_the_job_cannot_take_is_refused(tp_store):
    cluster = ServingCluster(3, tp_store, "--tp", "2")
    with pytest.raises(RuntimeError, match="--tp 2 needs a multiple of 2 ranks; the job has 3"):
        cluster.start()
