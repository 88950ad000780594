"""KunServe over TP instances, under ``mpirun -n 4 ... --tp 2``: the two TP2 replicas fuse
into one TP2 x PP2 group while requests stream, and split back.

Every device takes part: each drops the layers outside its stage and grows its pool by the
pages it freed (the same count on both ranks of a set: page ids are shared by the set); the
live exchange moves each follower's KV heads to the peer follower alongside its leader's;
the restore pulls each device's weights from its peer across the other set. A follower
whose KV did not move would attend over stale pages for its heads, and the all-reduce would
carry that into every token: so greedy tokens identical to the single-process engine's
(tp 1), with nothing recomputed, show the followers' exchange as much as the leaders'.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from build_scripts.sources.tiny import TinySpec
from orchestrator.ingress.request_log import read_request_log
from perf.cluster_client import ServingCluster, complete, reference_completions, run
from tests.conftest import build_tiny_store
from tests.mpi_util import requires_mpirun

pytestmark = requires_mpirun

PROMPTS = [f"TP cycle {i}: " + "some context words " * (2 + 3 * (i % 5)) for i in range(8)]
MAX_TOKENS = [90 + 13 * (i % 4) for i in range(8)]


@pytest.fixture(scope="module")
def tp_store(tmp_path_factory):
    return build_tiny_store(tmp_path_factory.mktemp("tp_drop"), TinySpec(), splits=(1, 2), tp_sizes=(1, 2))[1]


async def _post(session, url, path, body):
    async with session.post(url + path, json=body) as r:
        return r.status, await r.json()


async def _cycle(url: str):
    async with aiohttp.ClientSession() as s:
        gen = asyncio.gather(*(complete(s, url, {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                                                 "stream": True}) for p, n in zip(PROMPTS, MAX_TOKENS)))
        gen = asyncio.ensure_future(gen)
        await asyncio.sleep(0.3)
        drop = await _post(s, url, "/admin/drop", {"group": [0, 1]})
        async with s.get(url + "/admin/state") as r:
            fused = await r.json()
        await asyncio.sleep(0.3)
        restored = await _post(s, url, "/admin/restore", {"group": [0, 1]})
        return await gen, drop, fused, restored


def test_two_tp2_replicas_fuse_into_a_tp2_pp2_group_and_split_back(tp_store, tmp_path):
    expected = reference_completions(tp_store, PROMPTS, MAX_TOKENS)
    log_path = tmp_path / "requests.jsonl"
    with ServingCluster(4, tp_store, "--tp", "2", "--max-num-batched-tokens", "24",
                        "--request-log", str(log_path)) as cluster:
        before = cluster.state()
        assert [(i["shape"], i["world_ranks"]) for i in before["instances"]] == [("tp2xpp1", [0, 1]),
                                                                                  ("tp2xpp1", [2, 3])]
        results, drop, fused, restored = run(_cycle(cluster.url))
        assert drop[0] == 200 and restored[0] == 200, (drop, restored)
        assert [(i["shape"], i["world_ranks"]) for i in fused["instances"]] == [("tp2xpp2", [0, 1, 2, 3])]
        assert [r.token_ids for r in results] == expected
        state = cluster.wait_all_free(timeout=10)
        assert [i["shape"] for i in state["instances"]] == ["tp2xpp1", "tp2xpp1"]
        counters, events = state["counters"], state["events"]
        assert all(r.num_preemptions == 0 for r in results)
        assert counters.get("exchange_recomputes", 0) == 0 and counters.get("restore_recomputes", 0) == 0, counters
        [drop_event] = [e for e in events if e["event"] == "drop"]
        [exchange] = [e for e in events if e["event"] == "exchange"]
        assert drop_event["stale"] > 0 and exchange["bytes"] > 0, (drop_event, exchange)
        moves = [e for e in events if e["event"] == "restore_moves"]
        assert moves and all(m["slices"] > 0 for m in moves), moves
        _check_memory(before["ranks"], [e for e in events if e["event"] == "weights_dropped"])
        pulled = [e for e in events if e["event"] == "weights_pulled"]
        assert len(pulled) == 2 and all(e["bytes"] > 0 for e in pulled), pulled
        metrics = run(_get_text(cluster.url + "/metrics"))
        for line in ('kunserve_instance_info{instance="0",shape="tp2xpp1",world_ranks="0,1"} 1',
                     'kunserve_instance_info{instance="1",shape="tp2xpp1",world_ranks="2,3"} 1'):
            assert line in metrics, metrics
    shapes = {r["instance_shape"] for r in read_request_log(log_path)}
    assert shapes <= {"tp2xpp1", "tp2xpp2"} and "tp2xpp1" in shapes, shapes
    log = cluster.output()
    # Each follower received its heads' KV in the drop's exchange and in the restore's moves.
    landed = re.findall(r"\[rank (\d)\] INFO orchestrator.cluster.tp_set: tp follower: .* landed, (\d+) bytes", log)
    assert {r for r, n in landed if int(n) > 0} == {"1", "3"}, landed
    assert len(re.findall(r"tp follower: restored [\d.]+ MiB of weights from peer followers", log)) == 2


async def _get_text(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.text()


def _check_memory(before: list[dict], dropped: list[dict]) -> None:
    """Every device dropped the layers outside its stage and grew its pool by what it freed."""
    assert sorted(e["world_rank"] for e in dropped) == [0, 1, 2, 3], dropped
    full = before[0]["weight_bytes"]  # both sets hold the same shard sizes
    for e in dropped:
        assert e["bytes"] > 0 and e["weight_bytes"] + e["bytes"] == full, e
        page = before[0]["kv_bytes"] / before[0]["kv_pages_total"]
        assert 0 <= e["bytes"] - e["kv_added"] < page, e
    for leader in (0, 2):  # a set's ranks grew alike: shared page ids
        pair = [e for e in dropped if e["world_rank"] in (leader, leader + 1)]
        assert pair[0]["kv_pages_added"] == pair[1]["kv_pages_added"] and pair[0]["bytes"] == pair[1]["bytes"], pair


async def _burst(url: str):
    async with aiohttp.ClientSession() as s:
        return await asyncio.gather(*(complete(s, url, {"prompt": p, "max_tokens": 24, "temperature": 0,
                                                        "ignore_eos": True}) for p in PROMPTS))


def test_a_tp2_pp2_instance_from_the_start_gives_the_single_process_engines_tokens(tp_store):
    expected = reference_completions(tp_store, PROMPTS, [24] * len(PROMPTS))
    with ServingCluster(4, tp_store, "--tp", "2", "--groups", "0-3", "--max-num-batched-tokens", "24") as cluster:
        [instance] = cluster.state()["instances"]
        assert (instance["shape"], instance["ranks"], instance["world_ranks"]) == ("tp2xpp2", [0, 1], [0, 1, 2, 3])
        assert [r.token_ids for r in run(_burst(cluster.url))] == expected
