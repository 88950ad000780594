"""A rank that runs out of memory at start-up tells every rank, which all stop with its
message, instead of dying alone while the others wait in a collective."""

from __future__ import annotations

from tests.mpi_util import requires_mpirun, run_mpi_module

pytestmark = requires_mpirun


def test_out_of_memory_on_one_rank_stops_all_with_its_message(tiny_store):
    res = run_mpi_module(2, "tests.orchestrator.startup_oom_job", "--engine-dir", str(tiny_store),
                         "--device-memory", "64MiB", "--http-port", "0", timeout=90)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "rank 1: out of memory while loading the weights and KV pool" in res.stderr, res.stderr[-2000:]
