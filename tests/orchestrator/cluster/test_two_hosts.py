"""The cross-host path, on two hosts simulated with network namespaces (``tests/two_hosts.py``).

Ranks 0 and 1 run on different hosts: a drop that fuses their replicas and a restore that
splits them again while requests run, then a pp=2 group across the hosts serving new
requests, give the single-process engine's greedy tokens, with the KV moved live (bytes in
every exchange batch, nothing recomputed); and the transport took the cross-host path
(each rank found the other on another host, so rows went as MPI indexed datatypes over
TCP, not by cross-memory attach).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import aiohttp
import pytest

from perf.cluster_client import ServingCluster, run
from perf.mpi_launch import mpirun_command
from tests.mpi_util import requires_mpirun
from tests.orchestrator.cluster.test_drop_restore import MAX_TOKENS, PROMPTS, _check, _check_live, _cycle, _generate
from tests.two_hosts import TwoHosts

WHY_NOT = TwoHosts.unavailable()
pytestmark = [requires_mpirun, pytest.mark.skipif(WHY_NOT is not None, reason=f"two hosts cannot be made here: "
                                                                              f"{WHY_NOT}")]


@pytest.fixture(scope="module")
def expected(tiny_store):
    from perf.cluster_client import reference_completions
    return reference_completions(tiny_store, PROMPTS, MAX_TOKENS)


class TwoHostCluster(ServingCluster):
    """Two ranks, one per host; the ingress on the first, reached through its front link."""

    def __init__(self, hosts: TwoHosts, store: Path, *args: str) -> None:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        super().__init__(2, store, *args, "--host", "0.0.0.0", env={"PATH": path})
        self.cmd = hosts.mpirun() + self.cmd[len(mpirun_command(2)):]
        self.url = f"http://{hosts.front_address}:{self.port}"


def test_drop_restore_and_a_group_across_two_hosts(tiny_store, expected):
    with TwoHosts() as hosts, TwoHostCluster(hosts, tiny_store, "--max-num-batched-tokens", "24") as cluster:
        a, b = hosts.names
        log = cluster.output()
        assert f"rank 0 (host {a}): ranks [1] are on other hosts" in log, log[-3000:]
        assert f"rank 1 (host {b}): ranks [0] are on other hosts" in log, log[-3000:]
        # Replicas on different hosts fuse and split again while requests run.
        results, drop, restored = run(_cycle(cluster.url, [0, 1], restore=True))
        assert drop[0] == 200 and restored[0] == 200, (drop, restored)
        state = _check(cluster, results, expected)
        _check_live(results, state, restored=True)
        assert sum(e["stale"] for e in state["events"] if e["event"] == "drop") > 0, "nothing had KV at the drop"
        # A drop that stays: a pp=2 group across the hosts serves what runs and what comes.
        results, drop, _ = run(_cycle(cluster.url, [0, 1], restore=False))
        assert drop[0] == 200
        state = _check(cluster, results, expected)
        assert [r["role"] for r in state["ranks"]] == ["group", "group"]
        results = run(_fresh(cluster.url))
        assert [r.token_ids for r in results] == expected


async def _fresh(url: str):
    async with aiohttp.ClientSession() as s:
        return await _generate(s, url)
