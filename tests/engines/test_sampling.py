"""Sampling: greedy, top-k, top-p, and seeded streams that do not depend on the batch."""

from __future__ import annotations

import pytest
import torch

from engines.errors import RequestError
from engines.sampling import SampleRow, SamplingParams, sample as sample_rows


def sample(logits, params, output_index):
    """The tokens ``sample`` draws for rows with these parameters and output positions."""
    return sample_rows(logits, [SampleRow(p, n) for p, n in zip(params, output_index)]).tokens


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


# ----------------------------------------------------------------------------- processors
# Each processor against a reference written out on the logits, token by token.

VOCAB = 12
HISTORY = [3, 5, 5, 7, 3, 9, 9, 9]  # 4 prompt tokens, then 4 output tokens
PROMPT_LEN = 4


def processed(params: SamplingParams, history=HISTORY, output_index=4, eos=()) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw logits, what greedy sampling with ``params`` sees): the argmax over VOCAB rows."""
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 3
    row = SampleRow(params, output_index, history, PROMPT_LEN)
    from engines.sampling import process_logits
    return logits[0], process_logits(logits[0], row, eos)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    raw, out = processed(SamplingParams(repetition_penalty=1.7))
    for t in range(VOCAB):
        v = float(raw[t])
        want = (v / 1.7 if v > 0 else v * 1.7) if t in HISTORY else v
        assert float(out[t]) == pytest.approx(want, abs=1e-6), t


def test_frequency_and_presence_penalties_count_output_tokens_only():
    raw, out = processed(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    output = HISTORY[PROMPT_LEN:]
    for t in range(VOCAB):
        n = output.count(t)
        want = float(raw[t]) - 0.5 * n - (0.25 if n else 0.0)
        assert float(out[t]) == pytest.approx(want, abs=1e-6), t
    assert float(out[5]) == float(raw[5])  # a prompt-only token is not penalised


def test_logit_bias_adds_to_the_named_tokens():
    raw, out = processed(SamplingParams(logit_bias=((2, 100.0), (4, -3.5))))
    assert float(out[2]) == pytest.approx(float(raw[2]) + 100.0)
    assert float(out[4]) == pytest.approx(float(raw[4]) - 3.5)
    assert torch.equal(out[[0, 1, 3, 5]], raw[[0, 1, 3, 5]])
    logits = raw[None].clone()
    assert sample_rows(logits, [SampleRow(SamplingParams(logit_bias=((2, 100.0),)))]).tokens == [2]


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    eos = (0,)
    params = SamplingParams(min_tokens=5, max_tokens=8, stop_token_ids=(6,))
    _, early = processed(params, output_index=4, eos=eos)
    assert early[0] == float("-inf") and early[6] == float("-inf")
    raw, late = processed(params, output_index=5, eos=eos)
    assert torch.equal(late, raw)


def test_bad_words_ban_a_sequences_last_token_only_after_its_prefix():
    raw, out = processed(SamplingParams(bad_words=((9, 4), (1,), (7, 2))))
    assert out[4] == float("-inf")   # history ends with 9: (9, 4) is banned
    assert out[1] == float("-inf")   # a single token is always banned
    assert float(out[2]) == float(raw[2])  # history does not end with 7


def test_penalties_are_batch_invariant_and_leave_other_rows_alone():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    pen = SampleRow(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, temperature=0.7, seed=5),
                    4, HISTORY, PROMPT_LEN)
    alone = sample_rows(logits[1:2], [pen]).tokens
    batched = sample_rows(logits, [SampleRow(SamplingParams()), pen, SampleRow(SamplingParams())]).tokens
    assert batched[1] == alone[0]
    assert [batched[0], batched[2]] == logits[[0, 2]].argmax(-1).tolist()


def test_logprobs_are_raw_whatever_the_processors_do():
    logits = torch.randn(1, VOCAB)
    params = SamplingParams(logit_bias=((3, 100.0),), logprobs=2)
    got = sample_rows(logits, [SampleRow(params)])
    ref = torch.log_softmax(logits[0], -1)
    assert got.tokens == [3]
    assert got.logprobs[0].logprob == pytest.approx(float(ref[3]), abs=1e-6)
    assert [t for t, _ in got.logprobs[0].top] == torch.topk(ref, 2).indices.tolist()


@pytest.mark.parametrize("kwargs,word", [
    ({"min_tokens": 20}, "min_tokens"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": ((1, 101.0),)}, "logit_bias"), ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"bad_words": ((),)}, "bad_words")])
def test_invalid_processor_parameters_are_named(kwargs, word):
    with pytest.raises(RequestError, match=word):
        SamplingParams(**kwargs)
