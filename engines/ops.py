"""The decoder's math, as plain functions over tensors (no modules, no state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as Llama's reference does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the GPT-NeoX (half-split) convention; x is ``[T, heads, head]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP with the gate and up projections fused in one GEMM."""
    gu = F.linear(x, gate_up)
    gate, up = gu.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence over its padded context.

    q ``[B, heads, head]``; k, v ``[B, C, kv_heads, head]``; mask ``[B, C]`` (True = attend).
    Query heads sharing a KV head are laid out as that head's query rows, so grouped-query
    attention needs no copy of K or V.
    """
    b, heads, d = q.shape
    kv_heads = k.shape[2]
    qg = q.view(b, kv_heads, heads // kv_heads, d)
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :])
    return out.reshape(b, heads * d)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      num_computed: int) -> torch.Tensor:
    """Causal attention of a chunk of n queries over its ``num_computed + n`` context rows.

    q ``[n, heads, head]``; k, v ``[C, kv_heads, head]`` with ``C = num_computed + n``.
    """
    n, heads, d = q.shape
    c, kv_heads = k.shape[0], k.shape[1]
    group = heads // kv_heads
    # [kv_heads, group * n, head]: rows of one KV head's query group, then positions.
    qg = q.view(n, kv_heads, group, d).permute(1, 2, 0, 3).reshape(kv_heads, group * n, d)
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)
    if num_computed == 0 and group == 1:
        out = F.scaled_dot_product_attention(qg, kt, vt, is_causal=True)
    else:
        pos = torch.arange(num_computed, num_computed + n, device=q.device)
        mask = torch.arange(c, device=q.device)[None, :] <= pos[:, None]
        out = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=mask.repeat(group, 1))
    return out.view(kv_heads, group, n, d).permute(2, 0, 1, 3).reshape(n, heads * d)
