"""A Hugging Face transformers model with exactly the weights of an engine store's pp1 split.

Benchmarks and tests compare the engine against it on the same weights, whatever the
store's source; ``greedy_with_logits`` is the engine's side of such a comparison.
"""

from __future__ import annotations

import torch

from engines.store import EngineStore
from engines.weights import ModelWeights


def hf_state_dict(weights: ModelWeights) -> dict[str, torch.Tensor]:
    """TensorRT-LLM-layout weights back to Hugging Face names (QKV split, MLP renamed)."""
    cfg = weights.cfg
    sd = {"model.embed_tokens.weight": weights.embedding, "model.norm.weight": weights.final_norm,
          "lm_head.weight": weights.lm_head}
    for i, layer in sorted(weights.layers.items()):
        p = f"model.layers.{i}."
        q, k, v = layer.qkv_w.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.o_w,
                   p + "mlp.gate_proj.weight": layer.views["mlp.fc.weight"],
                   p + "mlp.up_proj.weight": layer.views["mlp.gate.weight"],
                   p + "mlp.down_proj.weight": layer.down_w,
                   p + "input_layernorm.weight": layer.ln1,
                   p + "post_attention_layernorm.weight": layer.ln2})
        if layer.qkv_b is not None:
            qb, kb, vb = layer.qkv_b.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            sd.update({p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb,
                       p + "self_attn.v_proj.bias": vb})
    return {k: v.clone() for k, v in sd.items()}


def load_hf_model(store: EngineStore, dtype: torch.dtype = torch.float32):
    """Build the transformers model for the store's architecture and load its pp1 weights."""
    import transformers

    cfg = store.config
    kind = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg.architecture]
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rotary_scaling:
        rope = {**cfg.rotary_scaling, "rope_theta": cfg.rotary_base}
    hf_cfg = transformers.AutoConfig.for_model(
        kind, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_size, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    weights, _ = store.load_rank(1, 0, device="cpu", dtype=dtype)
    missing, unexpected = model.load_state_dict(hf_state_dict(weights), strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def greedy_with_logits(engine, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy-generate on an ``LLMEngine`` and collect the float32 logits every sampled token
    was drawn from (``[max_tokens, vocab]``, on the CPU)."""
    from engines.sampling import SamplingParams

    req = engine.make_request(prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    engine.add_request(req)
    logits = []
    while engine.scheduler.has_work():
        sched = engine.scheduler.schedule()
        out = engine.executor.execute(sched.to_step())
        if out.logits is not None and len(out.logits):
            logits.append(out.logits[0].float().cpu())
        engine.scheduler.update(sched, out)
    return req.output_token_ids, torch.stack(logits)
