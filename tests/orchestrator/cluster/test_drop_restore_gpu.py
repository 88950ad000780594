"""Two ranks sharing one GPU: a drop remaps the dropped weights' memory onto the KV pool
through CUDA's virtual-memory API, a restore maps it back, and greedy tokens are the same
as without a drop. (Needs a GPU; the transport is mpi, staged through host memory, since
NCCL refuses two ranks on one device.)"""

from __future__ import annotations

import pytest
import torch

from perf.cluster_client import ServingCluster, run
from tests.mpi_util import requires_mpirun
from tests.orchestrator.cluster.test_drop_restore import _check, _check_live, _cycle, _generate

pytestmark = [requires_mpirun, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ARGS = ("--device", "cuda", "--dtype", "float32", "--device-memory", "512MiB", "--kv-extension", "remap",
        "--max-num-batched-tokens", "24")


async def _baseline(url):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        return await _generate(s, url)


def test_two_ranks_on_one_gpu_drop_and_restore_by_remapping(tiny_store):
    with ServingCluster(2, tiny_store, *ARGS) as cluster:
        baseline = [r.token_ids for r in run(_baseline(cluster.url))]
        for _ in range(2):
            results, drop, restored = run(_cycle(cluster.url, [0, 1], restore=True))
            assert drop[0] == 200 and restored[0] == 200, (drop, restored)
            _check_live(results, _check(cluster, results, baseline), restored=True)
        events = cluster.state()["events"]
        drops = [e for e in events if e["event"] == "drop"]
        assert sum(e["stale"] for e in drops) > 0, "no request had KV at the drops: the test missed its moment"
        dropped = [e for e in events if e["event"] == "weights_dropped"]
        assert len(dropped) == 4 and all(e["remapped"] > 0 and e["kv_pages_added"] > 0 for e in dropped)
        remap_ms = sorted(e["seconds"] * 1e3 for e in dropped)
        print(f"remap time per rank and drop (ms): {remap_ms}")
