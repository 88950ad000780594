"""An mpirun job: ``serve`` whose rank 1 runs out of memory building its engine.

Run by ``test_startup_oom.py``: ``python -m tests.orchestrator.startup_oom_job SERVE_ARGS...``.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

import engines.rank_engine
from orchestrator.cli import main


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


if __name__ == "__main__":
    if MPI.COMM_WORLD.Get_rank() == 1:
        engines.rank_engine.RankEngine.__init__ = _oom
    sys.exit(main(["serve", *sys.argv[1:]]))
