"""Engine configuration: one frozen dataclass, validated on creation, mapped onto the CLI."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.core.scheduler import SchedulerConfig

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
          "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int:
    """Parse a memory size such as ``768MiB``, ``2GiB`` or ``1048576``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse memory size {text!r} (examples: 768MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return device


@dataclass(frozen=True)
class EngineConfig:
    """How to run one engine instance of a store."""

    engine_dir: Path
    """The engine store (built by ``python -m build_scripts.build_engines``)."""
    pp_size: int = 1
    """Run the pp-g split's stages chained in this process (tests use it; serving uses 1)."""
    tp_size: int = 1
    """Run each stage as this many tensor-parallel ranks in this process, a thread each,
    summed by an in-process all-reduce (the store needs the tp{t}pp{g} split)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda[:N]``."""
    dtype: str | None = None
    """Compute dtype; default: the store's on CPU, bfloat16 on CUDA."""
    kv_cache_memory: int = 256 << 20
    """Bytes of the KV page pool."""
    page_size: int = 16
    """Tokens per KV page."""
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    """Token budget of one step."""
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    """Most requests running at once."""
    enable_prefix_caching: bool = SchedulerConfig.enable_prefix_caching
    """Share the KV of full pages between requests with the same prefix (``prefix_cache.py``)."""

    def __post_init__(self) -> None:
        if self.pp_size < 1:
            raise ValueError("pp_size must be >= 1")
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self, store_dtype: torch.dtype) -> torch.dtype:
        from engines.config import parse_dtype

        if self.dtype is not None:
            return parse_dtype(self.dtype)
        if self.torch_device().type == "cuda" and store_dtype == torch.float32:
            return torch.bfloat16
        return store_dtype
