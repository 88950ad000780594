"""Hugging Face tensor names to TensorRT-LLM's, one layer at a time.

TensorRT-LLM fuses Q, K and V into ``attention.qkv`` and names the SwiGLU projections
``mlp.fc`` (gate_proj, the one through SiLU), ``mlp.gate`` (up_proj) and ``mlp.proj``
(down_proj).
"""

from __future__ import annotations

from typing import Callable

import torch

from engines.config import ModelConfig
from engines.weights import FINAL_NORM, LM_HEAD

GetTensor = Callable[[str], torch.Tensor]


def convert_layer(cfg: ModelConfig, get: GetTensor, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors, TensorRT-LLM names without the layer prefix."""
    p = f"model.layers.{layer}."
    attn = p + "self_attn."
    out = {
        "attention.qkv.weight": torch.cat([get(attn + f"{x}_proj.weight") for x in "qkv"]),
        "attention.dense.weight": get(attn + "o_proj.weight"),
        "mlp.fc.weight": get(p + "mlp.gate_proj.weight"),
        "mlp.gate.weight": get(p + "mlp.up_proj.weight"),
        "mlp.proj.weight": get(p + "mlp.down_proj.weight"),
        "input_layernorm.weight": get(p + "input_layernorm.weight"),
        "post_layernorm.weight": get(p + "post_attention_layernorm.weight"),
    }
    if cfg.attn_bias:
        out["attention.qkv.bias"] = torch.cat([get(attn + f"{x}_proj.bias") for x in "qkv"])
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def convert_embedding(get: GetTensor, dtype: torch.dtype) -> torch.Tensor:
    return get("model.embed_tokens.weight").to(dtype).contiguous()


def convert_head(cfg: ModelConfig, get: GetTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Final norm and LM head (a copy of the embedding when tied, as TensorRT-LLM writes it)."""
    head = get("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    return {FINAL_NORM: get("model.norm.weight").to(dtype).contiguous(),
            LM_HEAD: head.to(dtype).contiguous()}

