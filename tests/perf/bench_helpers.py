"""Helpers the perf tests share: a trace file writer and a bench preset for the tiny model."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

from perf.bench_presets import BenchPreset
from perf.traces import Trace


def write_azure_csv(path: Path, trace: Trace) -> Path:
    """``trace`` as an Azure LLM inference trace file."""
    t0 = datetime(2023, 11, 16, 18, 0, 0)
    rows = [f"{(t0 + timedelta(seconds=r.arrival_s)).isoformat(sep=' ')},{r.input_len},{r.output_len}"
            for r in trace]
    path.write_text("\n".join(["TIMESTAMP,ContextTokens,GeneratedTokens", *rows]) + "\n")
    return path


def tiny_preset(trace: Path, store: Path, **changes) -> BenchPreset:
    base = BenchPreset(name="tiny", trace=str(trace), store=str(store), ranks=2, device="cpu",
                       device_memory="64MiB", max_input=64, max_output=16, policies=("vllm", "kunserve"))
    return replace(base, **changes)
