"""Sampling: greedy, top-k, top-p, and seeded streams that do not depend on the batch."""

from __future__ import annotations

import pytest
import torch

from engines.errors import RequestError
from engines.sampling import SamplingParams, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert sample(logits, [SamplingParams()] * 4, [0] * 4) == logits.argmax(-1).tolist()


def test_top_k_only_draws_from_the_k_best():
    logits = torch.randn(1, 100)
    best = set(torch.topk(logits[0], 3).indices.tolist())
    p = SamplingParams(temperature=5.0, top_k=3, seed=1)
    assert {sample(logits, [p], [n])[0] for n in range(200)} <= best


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=2)
    drawn = {sample(logits, [p], [n])[0] for n in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are never drawn


def test_seeded_stream_depends_on_seed_and_position_only():
    logits = torch.randn(3, 64)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = sample(logits[1:2], [p], [5])
    batched = sample(logits, [SamplingParams(), p, SamplingParams(temperature=0.5, seed=1)], [0, 5, 9])
    assert batched[1] == alone[0]
    draws = [sample(logits[1:2], [p], [n])[0] for n in range(50)]
    assert len(set(draws)) > 1  # different positions draw differently


@pytest.mark.parametrize("kwargs,word", [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                                         ({"top_k": -2}, "top_k"), ({"top_p": 1.5}, "top_p")])
def test_invalid_parameters_are_named(kwargs, word):
    with pytest.raises(RequestError, match=word):
        SamplingParams(**kwargs)
