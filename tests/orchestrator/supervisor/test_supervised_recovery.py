"""``supervise --ranks 2``: a rank killed or stopped mid-stream loses no request.

The job is restarted by the supervisor; streams in flight continue on the new job where
they stopped (the client sees one stream with the tokens an uninterrupted run gives: the
single-process engine's for greedy, the same cluster's fault-free run for seeded), a
request sent while the job restarts waits and is served, ``/health`` says 503 meanwhile,
and nothing of the dead job is left running.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time

import aiohttp
import pytest

from perf.cluster_client import SupervisedCluster, complete, reference_completions, run, sse_chunks
from tests.mpi_util import requires_mpirun

pytestmark = [requires_mpirun,
              # the supervisor reports each job's end, and Open MPI each killed rank
              pytest.mark.expect_log(r"\[supervisor\] ERROR .*job \d+ ended", r"prterun|PRTE|exited on signal",
                                     r"rank \d+ failed|shutting down")]

PROMPT = "the supervisor keeps the front door open"
MAX_TOKENS = 300
SEEDED = {"temperature": 0.9, "seed": 7}


@pytest.fixture(scope="module")
def cluster(tiny_store):
    with SupervisedCluster(2, tiny_store, supervise_args=("--heartbeat-timeout-s", "3")) as c:
        yield c


@pytest.fixture(scope="module")
def greedy(tiny_store):
    return reference_completions(tiny_store, [PROMPT, "late"], [MAX_TOKENS, 20])


def _body(**kw) -> dict:
    return {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True, **kw}


async def _stream(session, url: str, body: dict, first: asyncio.Event | None = None) -> list[int]:
    """A streamed completion's token ids; ``first`` is set once tokens came."""
    tokens: list[int] = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in sse_chunks(resp):
            assert "error" not in chunk, chunk
            tokens += chunk["choices"][0].get("token_ids", [])
            if first is not None and tokens:
                first.set()
    return tokens


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] != "Z":
                    out.append(pid)
        except FileNotFoundError:
            pass
    return out


async def _fault_mid_stream(c: SupervisedCluster, sig: int, rank: int) -> dict:
    async with aiohttp.ClientSession() as session:
        seeded_ref = await _stream(session, c.url, _body(**SEEDED))  # the same cluster, no fault
        first = asyncio.Event()
        streams = [asyncio.create_task(_stream(session, c.url, _body(), first)),
                   asyncio.create_task(_stream(session, c.url, _body(**SEEDED)))]
        await asyncio.wait_for(first.wait(), 60)
        old = c.rank_pids()
        os.kill(old[rank], sig)
        down_s = await asyncio.to_thread(c.wait_health, 503, 30)
        late = await complete(session, c.url, {"prompt": "late", "max_tokens": 20, "temperature": 0,
                                               "ignore_eos": True})
        up_s = await asyncio.to_thread(c.wait_health, 200, 60)
        greedy_tokens, seeded_tokens = await asyncio.gather(*streams)
        return {"old": old, "seeded_ref": seeded_ref, "greedy": greedy_tokens, "seeded": seeded_tokens,
                "late": late, "down_s": down_s, "up_s": up_s}


def _resumed_after(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"resuming cmpl-\S+ on the new job after (\d+) tokens", log)]


@pytest.mark.parametrize("sig,rank", [(signal.SIGKILL, 1), (signal.SIGSTOP, 0)], ids=["killed", "stopped"])
def test_a_rank_killed_or_stopped_mid_stream_loses_no_request(cluster, greedy, sig, rank):
    """A killed rank ends the job at once; the stopped controller rank falls silent and the
    supervisor ends the job after --heartbeat-timeout-s. Either way both streams move."""
    before = len(_resumed_after(cluster.output()))
    r = run(_fault_mid_stream(cluster, sig, rank))
    assert r["greedy"] == greedy[0]
    assert r["seeded"] == r["seeded_ref"] and len(r["seeded"]) == MAX_TOKENS
    assert r["late"].status == 200 and r["late"].token_ids == greedy[1]  # sent while the job restarted
    # The streams were resumed after the tokens they had, not started again.
    resumed = _resumed_after(cluster.output())[before:]
    assert len(resumed) == 2 and max(resumed) > 0 and all(n < MAX_TOKENS for n in resumed), resumed
    assert _alive(r["old"]) == []  # the dead or hung job's ranks are gone
    if sig == signal.SIGSTOP:
        assert "controller rank sent nothing for" in cluster.output()


def test_a_rank_that_stops_reporting_has_its_job_restarted(cluster, greedy):
    old = cluster.rank_pids()
    os.kill(old[1], signal.SIGSTOP)
    cluster.wait_health(503, 30)
    cluster.wait_health(200, 60)
    assert "rank 1 (" in cluster.output() and "stopped reporting (--heartbeat-timeout-s 3)" in cluster.output()
    assert _alive(old) == []
    res = run(_complete_greedy(cluster))
    assert res.token_ids == greedy[1]


async def _complete_greedy(c: SupervisedCluster):
    async with aiohttp.ClientSession() as session:
        return await complete(session, c.url, {"prompt": "late", "max_tokens": 20, "temperature": 0,
                                               "ignore_eos": True})


def test_stopping_the_supervisor_leaves_no_process(cluster):
    """The module's cluster, stopped last (its fixture's exit then has nothing to do)."""
    pids = cluster.rank_pids()
    assert len(pids) == 2
    cluster.stop()
    assert cluster.proc.returncode == 0 and not cluster.killed
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert _alive(pids) == [] and str(cluster.proc.pid) not in out.split()


def test_a_killed_supervisor_takes_its_job_with_it(tiny_store):
    """SIGKILL gives the supervisor no time to stop anything: mpirun dies with it
    (PR_SET_PDEATHSIG) and the controller rank stops the job when its channel closes."""
    c = SupervisedCluster(2, tiny_store)
    with c:
        pids = c.rank_pids()
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait(10)
        deadline = time.monotonic() + 30
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)  # polling the ranks' exit
        assert _alive(pids) == []
