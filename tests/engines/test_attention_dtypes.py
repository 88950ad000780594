"""The decode mask is in the queries' dtype, in every dtype the engine supports.

CUDA's SDPA takes no mask in flash attention and its memory-efficient kernel refuses a
mask of another dtype than the queries' ("invalid dtype for bias"); CPU accepts a mixed
one, so ``decode_attention`` refuses it on every device and these tests would catch a
float32 mask under bfloat16 queries here, without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from engines.config import DTYPES
from engines.ops import decode_attention
from engines.sampling import SamplingParams
from engines.step import SeqChunk
from engines.step_meta import build_step_meta
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine

FLOATS = sorted({d for d in DTYPES.values() if d.is_floating_point}, key=str)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_the_decode_mask_takes_the_queries_dtype(dtype):
    chunks = [SeqChunk(0, 5, 1, [[0, 1]], sample=True), SeqChunk(1, 2, 1, [[2]], sample=True)]
    meta = build_step_meta(chunks, 1, 4, torch.device("cpu"), dtype)
    assert meta.decode_mask.dtype == dtype
    assert meta.decode_mask[1, 0, 0, :3].tolist() == [0, 0, 0] and meta.decode_mask[1, 0, 0, 3] == float("-inf")


def test_a_mask_of_another_dtype_is_refused_as_cuda_would():
    q = torch.zeros(1, 4, 8, dtype=torch.bfloat16)
    kv = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="decode mask is torch.float32 but the queries are torch.bfloat16"):
        decode_attention(q, kv, kv, torch.zeros(1, 1, 1, 4))


@pytest.mark.parametrize("dtype", [n for n, d in DTYPES.items() if d.is_floating_point])
def test_decoding_sixteen_tokens_in_each_dtype(tiny_store, dtype):
    engine = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu", dtype=dtype, pp_size=2, page_size=4))
    out = engine.generate(["a prompt for every dtype"], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert len(out.token_ids) == 16


def test_a_steps_index_tensors_reach_the_device_in_one_copy(monkeypatch):
    """Off the CPU (here the ``meta`` device, which needs no GPU), ``build_step_meta``
    ships its index tensors in one flat copy, not one small blocking copy each."""
    moves = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device.type == "meta" and self.device.type == "cpu":
            moves.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    chunks = [SeqChunk(0, 0, 6, [[0, 1]], token_ids=list(range(6)), sample=True),
              SeqChunk(1, 5, 1, [[2, 3]], sample=True), SeqChunk(2, 3, 2, [[4]])]
    meta = build_step_meta(chunks, 1, 4, torch.device("meta"), torch.bfloat16)
    assert len(moves) == 1, moves
    assert meta.positions.shape == (9,) and meta.write_slots.shape == (1, 9) and meta.block_tables.shape == (3, 1, 2)
    assert meta.decode_mask.dtype == torch.bfloat16 and meta.decode_mask.shape == (1, 1, 1, 8)
    assert [g.rows.shape for g in meta.fresh_prefills] == [(6,)] and meta.sample_rows.shape == (2,)
