"""``tiny``: a small random-weight Llama (or Qwen2) made on the spot, deterministic from a seed.

It is written as a real Hugging Face model directory first, so that the store is built by
the same converter as any checkpoint, and tests can load the very same directory with
transformers as an independent reference.
"""

from __future__ import annotations

import dataclasses

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from build_scripts.sources import SourceModel

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model; the defaults are the ``tiny`` source."""

    arch: str = "llama"
    """``llama`` (untied, no bias) or ``qwen2`` (QKV bias, tied embeddings)."""
    num_layers: int = 6
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    seed: int = 0


def make_tokenizer() -> Tokenizer:
    """A byte-level tokenizer: 256 byte tokens plus four special tokens, BOS prepended."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def write_tiny_hf_dir(out: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a Hugging Face checkpoint directory (config, safetensors, tokenizer) for ``spec``."""
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1], "chat_template": CHAT_TEMPLATE}))
    qwen = spec.arch == "qwen2"
    head_dim = spec.hidden_size // spec.num_heads
    eos = [tok.token_to_id(SPECIAL_TOKENS[1]), tok.token_to_id(SPECIAL_TOKENS[3])]
    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": spec.arch, "vocab_size": vocab, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": head_dim, "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6, "rope_theta": spec.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": qwen, "bos_token_id": tok.token_to_id(SPECIAL_TOKENS[0]),
        "eos_token_id": eos, "torch_dtype": "float32",
    }
    if spec.rope_scaling:
        config["rope_scaling"] = spec.rope_scaling
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_random_weights(spec, vocab, head_dim), str(out / "model.safetensors"))
    return out


def _random_weights(spec: TinySpec, vocab: int, head_dim: int) -> dict[str, torch.Tensor]:
    # Weights at 1/sqrt(fan_in) scale keep activations O(1) and logits peaked, so greedy
    # choices are far from ties and comparisons against other implementations are stable.
    gen = torch.Generator().manual_seed(spec.seed)
    h, i = spec.hidden_size, spec.intermediate_size

    def lin(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / cols ** 0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(h, generator=gen)

    w = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen), "model.norm.weight": norm()}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        w[p + "self_attn.q_proj.weight"] = lin(spec.num_heads * head_dim, h)
        w[p + "self_attn.k_proj.weight"] = lin(spec.num_kv_heads * head_dim, h)
        w[p + "self_attn.v_proj.weight"] = lin(spec.num_kv_heads * head_dim, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, spec.num_heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = lin(i, h)
        w[p + "mlp.up_proj.weight"] = lin(i, h)
        w[p + "mlp.down_proj.weight"] = lin(h, i)
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        if spec.arch == "qwen2":
            for proj, rows in (("q", spec.num_heads), ("k", spec.num_kv_heads), ("v", spec.num_kv_heads)):
                w[p + f"self_attn.{proj}_proj.bias"] = 0.1 * torch.randn(rows * head_dim, generator=gen)
    if spec.arch != "qwen2":
        w["lm_head.weight"] = lin(vocab, h)
    return w


def parse_tiny_spec(text: str, seed: int = 0) -> TinySpec:
    """``num_layers=12,hidden_size=1024,...``: a ``TinySpec`` with those fields (integers, or
    ``arch=qwen2``); empty text is the default spec."""
    from engines.errors import StoreError

    names = {f.name for f in dataclasses.fields(TinySpec)} - {"rope_scaling", "seed"}
    values: dict[str, object] = {"seed": seed}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in names:
            raise StoreError(f"--source tiny: unknown field {key!r} (fields: {', '.join(sorted(names))})")
        try:
            values[key] = value if key == "arch" else float(value) if key == "rope_theta" else int(value)
        except ValueError:
            raise StoreError(f"--source tiny: {key}={value!r} is not a number") from None
    return TinySpec(**values)


def open_tiny(seed: int = 0, dtype: str = "float32", spec: TinySpec | None = None) -> SourceModel:
    """The ``tiny`` source: a temporary Hugging Face directory, converted like any other."""
    from build_scripts.sources.hf_dir import open_hf_dir

    spec = spec or TinySpec(seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix="kunserve-tiny-"))
    source = open_hf_dir(write_tiny_hf_dir(tmp, spec), dtype=dtype)
    source.name = (f"tiny:arch={spec.arch},num_layers={spec.num_layers},hidden_size={spec.hidden_size},"
                   f"num_heads={spec.num_heads},num_kv_heads={spec.num_kv_heads},seed={spec.seed}")
    source.cleanup.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    return source
