"""Building ``mpirun`` command lines for jobs launched from Python (benchmarks, tests): the
product's own (``orchestrator/supervisor/mpirun.py``), which the supervisor uses too."""

from __future__ import annotations

from pathlib import Path

from orchestrator.supervisor.mpirun import find_mpirun, mpirun_command

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["REPO_ROOT", "find_mpirun", "mpirun_command"]
