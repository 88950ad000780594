"""``supervise``'s own errors: options it refuses before starting anything, and a job whose
ranks refuse theirs, which is not restarted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from perf.mpi_launch import REPO_ROOT
from tests.mpi_util import requires_mpirun


def _supervise(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "supervise", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--ranks", "0", "--", "--engine-dir", "x"], "--ranks must be >= 1"),
    (["--ranks", "2", "--", "--engine-dir", "{store}", "--bogus"], "unknown serve options: --bogus"),
    (["--ranks", "2", "--", "--engine-dir", "{store}", "--supervisor-socket", "/tmp/s"], "the supervisor's own"),
    (["--ranks", "2", "--", "--engine-dir", "/nonexistent/store"], "/nonexistent/store"),
])
def test_bad_options_are_refused_before_anything_starts(tiny_store, args, message):
    res = _supervise(*[a.format(store=tiny_store) for a in args])
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "starting job" not in res.stderr


@requires_mpirun
def test_a_job_that_refuses_its_options_is_not_restarted(tiny_store):
    res = _supervise("--ranks", "2", "--", "--engine-dir", str(tiny_store), "--http-port", "0", "--groups", "0-2")
    assert res.returncode == 2, res.stderr
    assert "error: --groups '0-2' names ranks outside 0-1" in res.stderr
    assert "not restarting it" in res.stderr and "starting job 2" not in res.stderr
