"""Groups of groups, under ``mpirun -n 4``: two pipelined instances (pp2 + pp2) fuse into
one pp4 group while requests stream, and the restore returns each to the pair it was.

The fused group's stages nest in the pairs' (``ReshapeCoordinator._stage_order``): the
first stages of the pairs keep halves of their layers, so do the second ones, and the
group runs (0, 2, 1, 3). Each rank drops the weights outside its new stage and grows its
pool; the requests' KV of the layers that changed hands moves to the new owners while the
group serves; the restore moves it back into the pairs' base pools and pulls each rank's
weights from the peer that kept them. Greedy tokens must be the single-process engine's
with nothing recomputed, and the pages are audited after each exchange.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from build_scripts.sources.tiny import TinySpec
from perf.cluster_client import ServingCluster, complete, reference_completions, run
from tests.conftest import build_tiny_store
from tests.mpi_util import requires_mpirun

pytestmark = requires_mpirun

PROMPTS = [f"Nested request {i}: " + "some context words " * (2 + 3 * (i % 5)) for i in range(8)]
MAX_TOKENS = [100 + 13 * (i % 4) for i in range(8)]


@pytest.fixture(scope="module")
def store8(tmp_path_factory):
    """8 layers: pp2's stages [0, 4) and [4, 8) split evenly into pp4's."""
    return build_tiny_store(tmp_path_factory.mktemp("nested"), TinySpec(num_layers=8), splits=(1, 2, 4))[1]


@pytest.fixture(scope="module")
def expected(store8):
    return reference_completions(store8, PROMPTS, MAX_TOKENS)


async def _post(session, url, path, body=None):
    async with session.post(url + path, json=body or {}) as r:
        return r.status, await r.json()


async def _state(session, url):
    async with session.get(url + "/admin/state") as r:
        return await r.json()


async def _nest_while_streaming(url: str, before: list[list[int]]):
    """Form the pairs first (when ``before`` names them), stream, fuse them, restore one level."""
    async with aiohttp.ClientSession() as s:
        for pair in before:
            assert (await _post(s, url, "/admin/drop", {"group": pair}))[0] == 200
        gen = asyncio.ensure_future(asyncio.gather(*(
            complete(s, url, {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True})
            for p, n in zip(PROMPTS, MAX_TOKENS))))
        await asyncio.sleep(0.4)
        drop = await _post(s, url, "/admin/drop", {"group": [0, 1, 2, 3]})
        fused = await _state(s, url)
        await asyncio.sleep(0.3)
        restored = await _post(s, url, "/admin/restore", {"group": drop[1].get("group")})
        return await gen, drop, fused, restored


def _events(state, kind):
    return [e for e in state["events"] if e["event"] == kind]


def _check_no_recompute(results, state):
    assert all(r.num_preemptions == 0 for r in results), [r.num_preemptions for r in results]
    counters = state["counters"]
    assert counters.get("exchange_recomputes", 0) == 0 and counters.get("restore_recomputes", 0) == 0, counters


@pytest.mark.parametrize("start", ["replicas", "groups"])
def test_two_pp2_instances_fuse_into_pp4_and_restore_to_the_pairs(store8, expected, start):
    """``replicas``: the pairs are themselves drops (each rank holds half its weights when the
    second drop comes, two levels deep); ``groups``: they start as pairs (--groups 0-1,2-3)."""
    args = ("--groups", "0-1,2-3") if start == "groups" else ()
    before = [[0, 1], [2, 3]] if start == "replicas" else []
    with ServingCluster(4, store8, "--max-num-batched-tokens", "24", *args) as cluster:
        start_ranks = {r["rank"]: r for r in cluster.state()["ranks"]}
        results, drop, fused, restored = run(asyncio.wait_for(_nest_while_streaming(cluster.url, before), 120))
        assert drop == (200, {"status": "ok", "group": [0, 2, 1, 3]}), drop
        assert [i["shape"] for i in fused["instances"]] == ["tp1xpp4"]
        assert {r["rank"]: tuple(r["layer_range"]) for r in fused["ranks"]} == {0: (0, 2), 2: (2, 4), 1: (4, 6),
                                                                                3: (6, 8)}
        assert restored[0] == 200 and restored[1]["restored"] == [[0, 2, 1, 3]], restored
        assert [r.token_ids for r in results] == expected
        state = cluster.wait_all_free(timeout=10)
        assert [i["ranks"] for i in state["instances"]] == [[0, 1], [2, 3]]
        _check_no_recompute(results, state)
        [nested] = [e for e in _events(state, "drop") if e["ranks"] == [0, 2, 1, 3]]
        [exchange] = [e for e in _events(state, "exchange") if e["ranks"] == [0, 2, 1, 3]]
        assert nested["stale"] > 0 and exchange["bytes"] > 0 and exchange["recomputed"] == 0, (nested, exchange)
        [moves] = [e for e in _events(state, "restore_moves") if e["ranks"] == [0, 2, 1, 3]]
        assert moves["slices"] > 0 and moves["recomputed"] == 0, moves
        # Every rank dropped to a quarter of the layers and got back what it had before.
        dropped = [e for e in _events(state, "weights_dropped") if e["ranks"] == [0, 2, 1, 3]]
        assert sorted(e["rank"] for e in dropped) == [0, 1, 2, 3] and all(e["bytes"] > 0 for e in dropped)
        for r in fused["ranks"]:
            assert r["weight_bytes"] < start_ranks[r["rank"]]["weight_bytes"] / 2 + 2**16, r
        pulled = [e for e in _events(state, "weights_pulled") if e["ranks"] == [0, 2, 1, 3]]
        assert sorted(e["rank"] for e in pulled) == [0, 1, 2, 3] and all(e["bytes"] > 0 for e in pulled), pulled
        back = {r["rank"]: r for r in state["ranks"]}
        if start == "groups":  # the pairs started with every weight on every rank, and have them again
            assert all(back[r]["weight_bytes"] == start_ranks[r]["weight_bytes"] for r in back)
        # One more level up: the pairs (drops themselves) split into replicas; a pair it started as too.
        assert run(_restore_all(cluster.url))[0] == 200
        final = cluster.state()
        assert [i["ranks"] for i in final["instances"]] == [[0], [1], [2], [3]]
        assert [(r["weight_bytes"], r["kv_pages_total"]) for r in final["ranks"]] == \
            [(start_ranks[r]["weight_bytes"], start_ranks[r]["kv_pages_total"]) for r in range(4)]


async def _restore_all(url):
    async with aiohttp.ClientSession() as s:
        return await _post(s, url, "/admin/restore")
