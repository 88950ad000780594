"""Weight containers with TensorRT-LLM tensor names, one flat buffer per decoder layer.

Each decoder layer's tensors live as views in a single contiguous buffer. That makes a
layer the unit of memory: dropping it frees one allocation (the memory really goes back
to the OS or the CUDA allocator), and restoring it from a peer is one transfer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from engines.config import ModelConfig
from engines.errors import StoreError

logger = logging.getLogger(__name__)

EMBEDDING = "transformer.vocab_embedding.weight"
FINAL_NORM = "transformer.ln_f.weight"
LM_HEAD = "lm_head.weight"
_ALIGN = 64  # elements; keeps every view cache-line aligned for the GEMM kernels


def layer_prefix(index: int) -> str:
    """Prefix of a layer's tensors; ``index`` is local to the rank file (TensorRT-LLM style)."""
    return f"transformer.layers.{index}."


def layer_tensor_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names (without the layer prefix) and shapes of one layer's tensors, in buffer order."""
    h, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
    shapes = [("attention.qkv.weight", (qkv, h))]
    if cfg.attn_bias:
        shapes.append(("attention.qkv.bias", (qkv,)))
    shapes += [
        ("attention.dense.weight", (h, cfg.q_size)),
        ("mlp.fc.weight", (cfg.intermediate_size, h)),    # gate_proj, goes through SiLU
        ("mlp.gate.weight", (cfg.intermediate_size, h)),  # up_proj
        ("mlp.proj.weight", (h, cfg.intermediate_size)),
        ("input_layernorm.weight", (h,)),
        ("post_layernorm.weight", (h,)),
    ]
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class LayerWeights:
    """One decoder layer's weights: a flat buffer and named views into it."""

    def __init__(self, cfg: ModelConfig, flat: torch.Tensor) -> None:
        expected = self.buffer_numel(cfg)
        if flat.dim() != 1 or flat.numel() != expected:
            raise ValueError(f"layer buffer has {flat.numel()} elements, expected {expected}")
        self.flat = flat
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in layer_tensor_shapes(cfg):
            n = _numel(shape)
            self.views[name] = flat[offset:offset + n].view(shape)
            offset = _aligned(offset + n)
        self.qkv_w = self.views["attention.qkv.weight"]
        self.qkv_b = self.views.get("attention.qkv.bias")
        self.o_w = self.views["attention.dense.weight"]
        self.fc_w = self.views["mlp.fc.weight"]
        self.gate_w = self.views["mlp.gate.weight"]
        self.down_w = self.views["mlp.proj.weight"]
        self.ln1 = self.views["input_layernorm.weight"]
        self.ln2 = self.views["post_layernorm.weight"]

    @staticmethod
    def buffer_numel(cfg: ModelConfig) -> int:
        return sum(_aligned(_numel(shape)) for _, shape in layer_tensor_shapes(cfg))

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> "LayerWeights":
        return cls(cfg, torch.zeros(cls.buffer_numel(cfg), dtype=dtype, device=device))

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor],
                     dtype: torch.dtype, device: torch.device | str) -> "LayerWeights":
        """Copy named tensors (names without the layer prefix) into a fresh buffer."""
        layer = cls.empty(cfg, dtype, device)
        for name, view in layer.views.items():
            if name not in tensors:
                raise StoreError(f"missing tensor {name!r} for a decoder layer")
            src = tensors[name]
            if tuple(src.shape) != tuple(view.shape):
                raise StoreError(f"tensor {name!r} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(view.shape)}")
            view.copy_(src)
        return layer

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


@dataclass
class ModelWeights:
    """The weights one rank holds: some decoder layers, and the embedding/head if its stage needs them.

    Layers are keyed by their global index. Several engine sets (pp=1 and the stages of
    pp=g splits) can share one ``ModelWeights``: they differ only in which layers they run.
    """

    cfg: ModelConfig
    device: torch.device
    dtype: torch.dtype
    layers: dict[int, LayerWeights] = field(default_factory=dict)
    embedding: torch.Tensor | None = None
    final_norm: torch.Tensor | None = None
    lm_head: torch.Tensor | None = None

    def resident_bytes(self) -> int:
        """Bytes of weight memory held (tied embedding and head counted once)."""
        seen: set[int] = set()
        total = sum(layer.nbytes for layer in self.layers.values())
        for t in (self.embedding, self.final_norm, self.lm_head):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def drop_layers(self, layer_ids: Iterable[int]) -> int:
        """Free the given layers' buffers and return the bytes released.

        The caller must hold no other reference to them (runners look layers up here at
        every step, so they do not).
        """
        ids = sorted(set(layer_ids))
        missing = [i for i in ids if i not in self.layers]
        if missing:
            raise KeyError(f"layer {missing[0]} is not resident")
        # Pop without keeping a reference: the trim below must see the buffers already freed.
        freed = sum(self.layers.pop(i).nbytes for i in ids)
        release_freed_memory(self.device)
        logger.debug("dropped layers, %d bytes released", freed)
        return freed

    def load_layers(self, layers: Mapping[int, Mapping[str, torch.Tensor] | LayerWeights]) -> None:
        """Make the given layers resident again from given tensors (copied into new buffers)."""
        for i, tensors in layers.items():
            if not 0 <= i < self.cfg.num_hidden_layers:
                raise KeyError(f"layer {i} does not exist in a {self.cfg.num_hidden_layers}-layer model")
            if isinstance(tensors, LayerWeights):
                tensors = tensors.views
            self.layers[i] = LayerWeights.from_tensors(self.cfg, tensors, self.dtype, self.device)


def release_freed_memory(device: torch.device) -> None:
    """Hand freed memory back: ``malloc_trim`` for the CPU heap, the caching allocator on CUDA.

    glibc keeps freed heap blocks (and mmap'd blocks below its dynamic threshold) in the
    process, so without the trim the resident size would not fall after a drop.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - probe: musl and macOS have no malloc_trim
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
