"""The stage runner: executes one step over a contiguous layer range of the model.

A runner for ``[0, L)`` is a full replica. A runner for ``[a, b)`` is one pipeline stage:
it takes token ids only if ``a == 0`` (embedding), returns hidden states unless
``b == L``, in which case it applies the final norm and LM head and samples.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from engines.config import ModelConfig, rope_inv_freq
from engines.kv_cache import KVPool
from engines.mapping import LayerRange
from engines.ops import (apply_rope, decode_attention, fresh_prefill_attention, gated_mlp,
                         prefill_attention, rms_norm)
from engines.sampling import TokenLogprob, logprobs_of, sample
from engines.step import StepInput, StepOutput
from engines.step_meta import StepMeta, build_step_meta, context_slots
from engines.weights import ModelWeights


class StageRunner:
    """Runs the layers ``layer_range`` of ``weights`` over the KV pages of ``kv``."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, layer_range: LayerRange,
                 kv: KVPool, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """``cfg`` is what this rank computes: for a tensor-parallel rank, its shard
        (``tensor_parallel.shard_config``), with ``all_reduce`` summing a tensor in place
        over the TP set (after the attention output and the down projection)."""
        if layer_range.end > cfg.num_hidden_layers:
            raise ValueError(f"layer range {layer_range} exceeds {cfg.num_hidden_layers} layers")
        self.cfg = cfg
        self.weights = weights
        self.layer_range = layer_range
        self.kv = kv
        self.all_reduce = all_reduce
        self.is_first = layer_range.start == 0
        self.is_last = layer_range.end == cfg.num_hidden_layers
        self.device = kv.data.device
        self.dtype = kv.data.dtype
        self._inv_freq = rope_inv_freq(cfg).to(self.device)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        """Run one mixed step of prefill chunks and decodes through this stage's layers."""
        meta = build_step_meta(step.chunks, len(self.layer_range), self.kv.page_size, self.device, self.dtype)
        x = self._embed(step) if self.is_first else self._check_hidden(step, meta)
        cos, sin = self._rope(meta.positions)
        for local, layer_id in enumerate(self.layer_range):
            x = self._layer(x, local, layer_id, meta, cos, sin)
        if not self.is_last:
            return StepOutput(hidden=x)
        return self._sample(step, meta, x)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows ``[T, 1, head]`` for the step's positions (computed in float32)."""
        freqs = torch.outer(positions.float(), self._inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _embed(self, step: StepInput) -> torch.Tensor:
        if self.weights.embedding is None:
            raise RuntimeError("first stage has no embedding weights loaded")
        ids = [t for c in step.chunks for t in (c.token_ids or [])]
        if len(ids) != sum(c.num_tokens for c in step.chunks):
            raise ValueError("first stage needs token_ids for every chunk")
        return F.embedding(torch.tensor(ids, device=self.device), self.weights.embedding)

    def _check_hidden(self, step: StepInput, meta: StepMeta) -> torch.Tensor:
        if step.hidden is None or step.hidden.shape[0] != meta.positions.shape[0]:
            raise ValueError("a non-first stage needs hidden states for every token of the step")
        return step.hidden.to(device=self.device, dtype=self.dtype)

    def _layer(self, x: torch.Tensor, local: int, layer_id: int, meta: StepMeta,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        w = self.weights.layers.get(layer_id)
        if w is None:
            raise RuntimeError(f"layer {layer_id} is not resident on this rank (dropped?)")
        cfg = self.cfg
        h = rms_norm(x, w.ln1, cfg.norm_epsilon)
        qkv = F.linear(h, w.qkv_w, w.qkv_b)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        t = x.shape[0]
        q = apply_rope(q.view(t, cfg.num_attention_heads, cfg.head_size), cos, sin)
        k = apply_rope(k.view(t, cfg.num_key_value_heads, cfg.head_size), cos, sin)
        v = v.view(t, cfg.num_key_value_heads, cfg.head_size)
        self.kv.write(meta.write_slots[local], k, v)
        attn = self._attention(q, k, v, local, meta)
        if self.all_reduce is None:
            x = torch.addmm(x, attn, w.o_w.t())  # residual add inside the GEMM
            return gated_mlp(rms_norm(x, w.ln2, cfg.norm_epsilon), w.fc_w, w.gate_w, w.down_w, residual=x)
        part = torch.mm(attn, w.o_w.t())  # row-parallel: this rank's heads' share of the output
        self.all_reduce(part)
        x = x + part
        part = gated_mlp(rms_norm(x, w.ln2, cfg.norm_epsilon), w.fc_w, w.gate_w, w.down_w, residual=None)
        self.all_reduce(part)
        return x + part

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: int,
                   meta: StepMeta) -> torch.Tensor:
        out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        ps = self.kv.page_size
        if meta.decode_rows.numel():
            tables = meta.block_tables[meta.decode_chunks]
            ck, cv = self.kv.gather(context_slots(tables, local, meta.decode_mask.shape[-1], ps))
            out[meta.decode_rows] = decode_attention(q[meta.decode_rows], ck, cv, meta.decode_mask)
        for g in meta.fresh_prefills:  # the whole context is the chunk: no need to read it back
            shape = (g.batch, g.length)
            if g.batch * g.length == q.shape[0]:  # the step is this group alone: no gathers
                return fresh_prefill_attention(q.unflatten(0, shape), k.unflatten(0, shape), v.unflatten(0, shape))
            out[g.rows] = fresh_prefill_attention(q[g.rows].unflatten(0, shape), k[g.rows].unflatten(0, shape),
                                                  v[g.rows].unflatten(0, shape))
        for p in meta.prefills:
            tables = meta.block_tables[p.chunk_index:p.chunk_index + 1]
            ck, cv = self.kv.gather(context_slots(tables, local, p.context_len, ps)[0])
            out[p.rows] = prefill_attention(q[p.rows], ck, cv, p.num_computed)
        return out

    def _sample(self, step: StepInput, meta: StepMeta, x: torch.Tensor) -> StepOutput:
        chosen = [c for c in step.chunks if c.sample]
        scored = [c for c in step.chunks if c.prompt_targets]
        if not chosen and not scored:
            return StepOutput()
        h = rms_norm(x[meta.sample_rows], self._final_norm(), self.cfg.norm_epsilon)
        logits = F.linear(h, self.weights.lm_head).float()
        sampled = sample(logits, [c.sample_row() for c in chosen], self.cfg.eos_token_ids)
        return StepOutput(sampled_seq_ids=[c.seq_id for c in chosen], tokens=sampled.tokens, logits=logits,
                          logprobs=sampled.logprobs if any(sampled.logprobs) else [],
                          prompt_logprobs=self._prompt_logprobs(step, x) if scored else {})

    def _final_norm(self) -> torch.Tensor:
        w = self.weights
        if w.final_norm is None or w.lm_head is None:
            raise RuntimeError("last stage has no final norm / LM head loaded")
        return w.final_norm

    def _prompt_logprobs(self, step: StepInput, x: torch.Tensor) -> dict[int, list[TokenLogprob]]:
        """Log-probabilities of each scored chunk's prompt targets, from its own rows' logits
        (computed only for the chunks that asked: the LM head over a whole prompt is costly)."""
        out, row = {}, 0
        for c in step.chunks:
            if c.prompt_targets:
                first = row + c.prompt_target_row
                rows = x[first:first + len(c.prompt_targets)]
                logits = F.linear(rms_norm(rows, self._final_norm(), self.cfg.norm_epsilon), self.weights.lm_head)
                k = c.sampling.prompt_logprobs or 0
                out[c.seq_id] = logprobs_of(logits, c.prompt_targets, [k] * len(c.prompt_targets))
            row += c.num_tokens
        return out
