"""The served cluster as a client sees it: bad input, disconnects, the bounded queue, memory
accounting, re-grouping, shutdown and a dead rank."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import aiohttp
import pytest

from tests.mpi_util import assert_gone, requires_mpirun
from perf.cluster_client import ServingCluster, complete, run

pytestmark = requires_mpirun

GOOD = {"prompt": "A good request", "max_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tiny_store):
    with ServingCluster(2, tiny_store, "--groups", "0-1", device_memory="256MiB") as c:
        yield c


async def post_raw(url: str, data: bytes | str, path: str = "/v1/completions") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=data, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()


@pytest.mark.parametrize("body,status,words", [
    ("{not json", 400, "JSON"),
    ('{"max_tokens": 5}', 400, "prompt"),
    ('{"prompt": "' + "x" * 600 + '", "max_tokens": 5}', 400, "context length"),
    ('{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "hi", "max_tokens": 100000000}', 400, "context length"),
    ('{"prompt": "hi", "max_tokens": 5, "temperature": -1}', 400, "temperature"),
    ('{"model": "gpt-17", "prompt": "hi"}', 404, "gpt-17"),
])
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(cluster, body, status, words):
    code, data = run(post_raw(cluster.url, body))
    assert code == status, data
    assert words.lower() in data["error"]["message"].lower(), data
    async def good():
        async with aiohttp.ClientSession() as s:
            return await complete(s, cluster.url, GOOD)
    assert run(good()).status == 200


def test_client_disconnect_cancels_the_request_and_frees_its_kv(cluster):
    async def disconnect_after_first_chunk():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "a long generation", "max_tokens": 400, "ignore_eos": True, "stream": True}
            async with s.post(cluster.url + "/v1/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        break  # leaving the block closes the connection mid-stream
    run(disconnect_after_first_chunk())
    state = cluster.wait_all_free(timeout=10)
    assert all(r["kv_pages_used"] == 0 for r in state["ranks"]), state
    assert all(i["running"] == 0 and i["waiting"] == 0 for i in state["instances"]), state


def test_memory_accounting_matches_resident_memory(cluster):
    for rank in cluster.state()["ranks"]:
        accounted = rank["weight_bytes"] + rank["kv_bytes"] + rank["workspace_bytes"]
        assert accounted <= rank["device_memory_bytes"]
        assert abs(rank["resident_bytes"] - accounted) <= 0.1 * accounted, rank


def test_regroup_idle_ranks_at_run_time(tiny_store):
    with ServingCluster(2, tiny_store) as c:
        async def go():
            async with aiohttp.ClientSession() as s:
                before = await complete(s, c.url, {**GOOD, "max_tokens": 8, "ignore_eos": True})
                async with s.post(c.url + "/admin/regroup", json={"groups": "0-1"}) as r:
                    assert r.status == 200, await r.text()
                after = await complete(s, c.url, {**GOOD, "max_tokens": 8, "ignore_eos": True})
                return before, after
        before, after = run(go())
        state = c.state()
        assert [i["ranks"] for i in state["instances"]] == [[0, 1]]
        assert [r["role"] for r in state["ranks"]] == ["group", "group"]
        assert [r["layer_range"] for r in state["ranks"]] == [[0, 3], [3, 6]]
        assert before.token_ids == after.token_ids and len(after.token_ids) == 8


def test_bounded_queue_answers_429(tiny_store):
    with ServingCluster(2, tiny_store, "--max-queued-requests", "2") as c:
        async def flood():
            async with aiohttp.ClientSession() as s:
                body = {"prompt": "queue me " * 40, "max_tokens": 4, "temperature": 0}
                return await asyncio.gather(*(complete(s, c.url, body) for _ in range(24)))
        results = run(flood())
        codes = [r.status for r in results]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        assert all("max-queued-requests" in r.error["message"] for r in results if r.status == 429)
        assert all(len(r.token_ids) == 4 for r in results if r.status == 200)
        assert c.wait_all_free()["queued"] == 0


async def _stream_until_error(url: str, on_first_chunk) -> tuple[bool, bool, float]:
    """Stream a long request; call ``on_first_chunk``; return (saw_tokens, ended_with_error,
    the time ``on_first_chunk`` was called). The server failing the request (an error
    chunk, or the connection going down) counts as an error; the client's own timeout is
    a test failure (a server that hangs a stream must not pass)."""
    saw, errored, at = False, False, 0.0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            body = {"prompt": "keep going", "max_tokens": 450, "ignore_eos": True, "stream": True}
            async with s.post(url + "/v1/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: {\"error\""):
                        errored = True
                    elif line.startswith(b"data: {") and not saw:
                        saw, at = True, time.monotonic()
                        on_first_chunk()
    except asyncio.TimeoutError:
        pytest.fail("the stream hung: the client's 60 s timeout ran out before the server ended it")
    except aiohttp.ClientError:
        errored = True  # the connection went down before the stream completed
    return saw, errored, at


def test_sigterm_stops_every_rank_and_fails_in_flight_requests(tiny_store):
    c = ServingCluster(2, tiny_store, "--groups", "0-1")
    c.start()
    pids = c.rank_pids()
    assert len(pids) == 2
    saw, errored, signalled = run(_stream_until_error(c.url, lambda: os.killpg(c.proc.pid, signal.SIGTERM)))
    c.proc.wait(timeout=20)
    assert saw and errored
    assert_gone(pids, signalled, within=10)


def test_a_dead_rank_fails_requests_and_the_job_exits_nonzero(tiny_store):
    c = ServingCluster(2, tiny_store, "--groups", "0-1")
    c.start()
    pids = c.rank_pids()
    saw, errored, killed = run(_stream_until_error(c.url, lambda: os.kill(pids[1], signal.SIGKILL)))
    code = c.proc.wait(timeout=30)
    assert saw and errored
    assert code != 0
    assert c.health() is None or c.health() == 503
    assert_gone(pids, killed, within=10)


def test_chat_streaming_and_metrics(cluster):
    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 6,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            chunks = []
            async with s.post(cluster.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        chunks.append(line)
            async with s.get(cluster.url + "/metrics") as r:
                return chunks, await r.text()
    chunks, metrics = run(go())
    assert len(chunks) >= 6
    for name in ("kunserve_time_to_first_token_seconds_bucket", "kunserve_time_per_output_token_seconds_bucket",
                 'kunserve_kv_pages_total{rank="1"}', 'kunserve_num_requests_running{instance="0"}',
                 "kunserve_num_requests_queued"):
        assert name in metrics, name
    # vLLM's names, labelled with the served model, with values a few requests give.
    samples = {}
    for line in metrics.splitlines():
        if line.startswith("vllm:"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    model = re.search(r'vllm:num_requests_running\{model_name="([^"]+)"', metrics).group(1)
    label = f'model_name="{model}"'
    def value(name, extra=""):
        return next(v for k, v in samples.items() if k.startswith(name + "{") and label in k and extra in k)
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert value(name) >= 1, name
    assert value("vllm:request_success_total", 'finished_reason="length"') >= 1
    assert 0.0 <= value("vllm:kv_cache_usage_perc") <= 1.0
    assert value("vllm:num_requests_running") >= 0 and value("vllm:num_requests_waiting") >= 0
    assert value("vllm:num_preemptions_total") >= 0


@pytest.mark.parametrize("args,words", [
    (["--groups", "0-5"], "outside"),
    (["--device-memory", "1MiB"], "no room for KV"),
    (["--policy", "magic"], "invalid choice"),
])
def test_bad_startup_options_stop_every_rank_with_one_message(tiny_store, args, words):
    import subprocess
    import sys

    from perf.mpi_launch import REPO_ROOT, mpirun_command
    cmd = mpirun_command(2) + [sys.executable, "-m", "orchestrator", "serve", "--engine-dir", str(tiny_store),
                               "--http-port", "0", *args]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
