"""Model architecture config, stored in the engine store's ``config.json``.

Field names follow TensorRT-LLM's checkpoint ``config.json`` (``head_size``,
``norm_epsilon``, ``rotary_base``, ``rotary_scaling``, ...), so a store can feed
TensorRT-LLM tooling; ``from_hf_config`` maps a Hugging Face config onto it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from engines.errors import StoreError

#: Architectures the reference engine runs (Hugging Face ``architectures`` names).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name (``float32``, ``bfloat16``, ``float16``, or ``fp32``/``bf16``/``fp16``)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, Qwen2, SmolLM2)."""

    architecture: str
    """Hugging Face architecture name, one of ``SUPPORTED_ARCHITECTURES``."""
    dtype: str
    """Dtype the weights are stored in (``float32``, ``bfloat16``, ``float16``)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    """KV heads; fewer than attention heads means grouped-query attention."""
    head_size: int
    max_position_embeddings: int
    """Context length: prompt plus generated tokens never exceed it."""
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    rotary_scaling: dict[str, Any] | None = None
    """Hugging Face ``rope_parameters``/``rope_scaling`` for non-default RoPE (``llama3``, ``linear``)."""
    tie_word_embeddings: bool = False
    attn_bias: bool = False
    """Bias on the fused QKV projection (Qwen2)."""
    hidden_act: str = "silu"
    position_embedding_type: str = "rope_gpt_neox"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Token ids that end a generation."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise StoreError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype {self.dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise StoreError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "silu":
            raise StoreError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise StoreError(f"config field {name} must be positive")

    # Derived sizes used by the runner and the KV pool.
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def kv_bytes_per_token_per_layer(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V that one token occupies in one layer."""
        itemsize = torch.empty((), dtype=dtype or self.torch_dtype).element_size()
        return 2 * self.kv_size * itemsize

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in data]
        if missing:
            raise StoreError(f"config.json lacks required fields: {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["eos_token_ids"] = tuple(kwargs.get("eos_token_ids") or ())
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong value types in a hand-edited file
            raise StoreError(f"config.json is malformed: {exc}") from exc

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], dtype: str = "float32") -> "ModelConfig":
        """Map a Hugging Face ``config.json`` (transformers 4.x or 5.x) onto this config."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}.get(hf.get("model_type", ""), "")
        heads = hf["num_attention_heads"]
        head_size = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        base = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = rope if rope_type not in ("default", None) else None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        if arch == "LlamaForCausalLM" and (hf.get("mlp_bias") or hf.get("attention_bias")):
            raise StoreError("Llama checkpoints with attention_bias or mlp_bias are not supported")
        return cls(
            architecture=arch, dtype=dtype, vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads, head_size=head_size,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=float(base),
            rotary_scaling=scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attn_bias=arch == "Qwen2ForCausalLM", hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama 3 or linear scaling when configured."""
    dim = cfg.head_size
    inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rotary_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scale(inv, scaling)
    raise StoreError(f"rope scaling type {kind!r} is not supported (only linear and llama3)")


def _llama3_scale(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1's frequency-dependent scaling: long wavelengths are divided by `factor`,
    # short ones kept, and the band between interpolated smoothly.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
