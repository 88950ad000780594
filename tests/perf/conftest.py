"""What the perf tests share: a small bursty trace (its writer and the tiny preset are in
``bench_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from perf.traces import LengthDist, gamma_bursty
from tests.perf.bench_helpers import write_azure_csv


@pytest.fixture
def small_trace(tmp_path) -> Path:
    """About 10 requests in 2.5 s, short prompts and outputs (the tiny model's context is 512)."""
    trace = gamma_bursty(2.5, rate=4.0, cv=1.0, seed=1, input_len=LengthDist(30, 20, max_len=60),
                         output_len=LengthDist(8, 6, max_len=16))
    return write_azure_csv(tmp_path / "trace.csv", trace)
