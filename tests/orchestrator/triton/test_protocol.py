"""TensorRT-LLM tensors -> completion requests, and the ingress relay's frames -> responses."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.triton.protocol import (
    FrameAssembler,
    IngressStreamError,
    InputError,
    TritonGenerateRequest,
    output_arrays,
    parse_inputs,
    triton_error_code,
)


def tensors(**kw):
    base = {"text_input": np.array([[b"hello"]], dtype=object), "max_tokens": np.array([[5]], np.int32)}
    base.update(kw)
    return base


def test_minimal_request_is_greedy_and_always_streamed_to_the_ingress():
    req = parse_inputs(tensors())
    assert req == TritonGenerateRequest(prompt="hello", max_tokens=5)
    assert req.completion_body() == {"prompt": "hello", "max_tokens": 5, "stream": True, "temperature": 0.0}


def test_all_optional_inputs_map_onto_the_completion_body():
    req = parse_inputs(tensors(stream=np.array([[True]]), exclude_input_in_output=np.array([[True]]),
                               temperature=np.array([[0.7]], np.float32), top_k=np.array([[40]], np.int32),
                               top_p=np.array([[0.9]], np.float32), random_seed=np.array([[7]], np.uint64),
                               end_id=np.array([[2]], np.int32), pad_id=np.array([[0]], np.int32),
                               stop_words=np.array([[b"\n\n", b"END", b""]], dtype=object)))
    assert req.stream and req.exclude_input_in_output
    body = req.completion_body()
    assert body["temperature"] == pytest.approx(0.7) and body["top_k"] == 40
    assert body["top_p"] == pytest.approx(0.9) and body["seed"] == 7
    assert body["stop_token_ids"] == [2] and body["stop"] == ["\n\n", "END"]


@pytest.mark.parametrize("extra,temperature", [
    ({"top_k": np.array([[1]], np.int32)}, 0.0),    # top_k=1 is greedy
    ({"top_k": np.array([[50]], np.int32)}, 1.0),   # sampling asked for: TensorRT-LLM's default temperature
    ({"top_p": np.array([[0.5]], np.float32)}, 1.0),
])
def test_sampling_defaults_follow_tensorrt_llm(extra, temperature):
    assert parse_inputs(tensors(**extra)).completion_body()["temperature"] == temperature


@pytest.mark.parametrize("change,message", [
    ({"text_input": None}, "text_input is required"),
    ({"max_tokens": None}, "max_tokens is required"),
    ({"max_tokens": np.array([[0]], np.int32)}, "max_tokens must be at least 1, got 0"),
    ({"max_tokens": np.array([[-3]], np.int32)}, "at least 1, got -3"),
    ({"max_tokens": np.array([[1, 2]], np.int32)}, "max_tokens must hold one value, got shape [1, 2]"),
    ({"text_input": np.array([[b"a", b"b"]], dtype=object)}, "text_input must hold one prompt, got shape [1, 2]"),
    ({"text_input": np.array([[b"ab\xffcd"]], dtype=object)}, "not valid UTF-8: byte 0xff at offset 2"),
    ({"text_input": np.array([[b""]], dtype=object)}, "text_input is empty"),
    ({"temperature": np.array([[np.nan]], np.float32)}, "temperature must be a finite number"),
    ({"stop_words": np.array([[b"\xc3"]], dtype=object)}, "stop_words holds a word that is not valid UTF-8"),
])
def test_bad_inputs_name_the_tensor(change, message):
    t = tensors()
    for k, v in change.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    with pytest.raises(InputError, match=__import__("re").escape(message)):
        parse_inputs(t)


def frame(text, ids, finish=None, **extra):
    return {"id": 1, "text": text, "token_ids": ids, "finish_reason": finish, **extra}


def feed_all(asm, *frames):
    return [c for f in frames if (c := asm.feed(f)) is not None]


def test_streamed_chunks_are_relayed_one_per_frame():
    asm = FrameAssembler(TritonGenerateRequest(prompt="p", max_tokens=3, stream=True))
    out = feed_all(asm, frame(" a", [1]), frame(" b", [2]), frame("", [], "length"))
    assert [(c.text, c.token_ids, c.final) for c in out] == [(" a", [1], False), (" b", [2], False), ("", [], True)]
    assert out[-1].finish_reason == "length"


@pytest.mark.parametrize("exclude,text", [(True, " a b"), (False, "p a b")])
def test_unstreamed_answer_is_one_final_chunk_with_or_without_the_prompt(exclude, text):
    asm = FrameAssembler(TritonGenerateRequest(prompt="p", max_tokens=2, exclude_input_in_output=exclude))
    out = feed_all(asm, frame(" a", [1]), frame(" b", [2], "length"))
    assert len(out) == 1 and out[0].final and out[0].text == text and out[0].token_ids == [1, 2]


def test_final_chunk_carries_the_requests_preemptions_and_migrations():
    asm = FrameAssembler(TritonGenerateRequest(prompt="p", max_tokens=2))
    (out,) = feed_all(asm, frame(" a", [1]), frame(" b", [2], "length", num_preemptions=2, num_migrations=1))
    arrays = output_arrays(out)
    assert arrays["num_preemptions"].tolist() == [[2]] and arrays["num_migrations"].tolist() == [[1]]


def test_error_frame_raises_with_the_ingress_message_and_status():
    asm = FrameAssembler(TritonGenerateRequest(prompt="p", max_tokens=2, stream=True))
    asm.feed(frame(" a", [1]))
    with pytest.raises(IngressStreamError, match="the request failed in the cluster: rank 1 died") as info:
        asm.feed({"id": 1, "error": "the request failed in the cluster: rank 1 died", "status": 500})
    assert info.value.status == 500


def test_output_arrays_have_the_batch_dimension_and_counts_only_when_final():
    from orchestrator.triton.protocol import Chunk
    out = output_arrays(Chunk("é", [5, 6]))
    assert out["text_output"].shape == (1, 1) and out["text_output"][0, 0] == "é".encode()
    assert out["output_ids"].dtype == np.int32 and out["output_ids"].tolist() == [[5, 6]]
    assert set(out) == {"text_output", "output_ids"}
    final = output_arrays(Chunk("", [], final=True))
    assert final["output_ids"].shape == (1, 0) and final["num_migrations"].tolist() == [[0]]


@pytest.mark.parametrize("status,code", [(400, "INVALID_ARG"), (404, "INVALID_ARG"), (429, "UNAVAILABLE"),
                                         (503, "UNAVAILABLE"), (500, "INTERNAL")])
def test_ingress_statuses_map_onto_triton_error_codes(status, code):
    assert triton_error_code(status) == code


def test_tensorrt_llm_sampling_controls_map_onto_the_completion_body():
    req = parse_inputs(tensors(presence_penalty=np.array([[0.5]], np.float32),
                               frequency_penalty=np.array([[0.25]], np.float32),
                               repetition_penalty=np.array([[1.3]], np.float32), min_length=np.array([[4]], np.int32),
                               bad_words=np.array([[b"foo", b"bar"]], dtype=object),
                               embedding_bias_words=np.array([[b"yes"]], dtype=object),
                               embedding_bias_weights=np.array([[2.5]], np.float32),
                               return_log_probs=np.array([[True]]), beam_width=np.array([[1]], np.int32)))
    body = req.completion_body()
    assert body["presence_penalty"] == pytest.approx(0.5) and body["frequency_penalty"] == pytest.approx(0.25)
    assert body["repetition_penalty"] == pytest.approx(1.3) and body["min_tokens"] == 4
    assert body["bad_words"] == ["foo", "bar"] and body["embedding_bias"] == [["yes", 2.5]]
    assert body["logprobs"] == 0
    assert parse_inputs(tensors(min_tokens=np.array([[3]], np.int32))).completion_body()["min_tokens"] == 3


@pytest.mark.parametrize("change,message", [
    ({"beam_width": np.array([[2]], np.int32)}, "beam_width 2: beam search is not supported"),
    ({"return_context_logits": np.array([[True]])}, "return_context_logits"),
    ({"return_generation_logits": np.array([[True]])}, "return_generation_logits"),
    ({"min_length": np.array([[2]], np.int32), "min_tokens": np.array([[3]], np.int32)}, "disagree"),
    ({"embedding_bias_words": np.array([[b"a", b"b"]], dtype=object),
      "embedding_bias_weights": np.array([[1.0]], np.float32)}, "2 words but embedding_bias_weights 1"),
    ({"presence_penalty": np.array([[np.nan]], np.float32)}, "presence_penalty must be a finite"),
])
def test_inputs_that_cannot_be_honoured_are_refused_by_name(change, message):
    with pytest.raises(InputError, match=message):
        parse_inputs(tensors(**change))


def test_log_probs_come_per_chunk_with_their_running_sum():
    req = TritonGenerateRequest(prompt="p", max_tokens=3, stream=True, return_log_probs=True)
    asm = FrameAssembler(req)
    first = asm.feed({"text": "a", "token_ids": [1], "logprobs": [-0.5], "finish_reason": None})
    last = asm.feed({"text": "b", "token_ids": [2, 3], "logprobs": [-1.0, -0.25], "finish_reason": "length"})
    assert (first.log_probs, first.cum_log_prob) == ([-0.5], -0.5)
    assert (last.log_probs, last.cum_log_prob) == ([-1.0, -0.25], -1.75)
    arrays = output_arrays(last)
    assert arrays["output_log_probs"].shape == (1, 1, 2) and arrays["cum_log_probs"].tolist() == [[-1.75]]
    whole = FrameAssembler(TritonGenerateRequest(prompt="p", max_tokens=3, return_log_probs=True))
    whole.feed({"text": "a", "token_ids": [1], "logprobs": [-0.5], "finish_reason": None})
    final = whole.feed({"text": "b", "token_ids": [2], "logprobs": [-1.0], "finish_reason": "length"})
    assert final.log_probs == [-0.5, -1.0] and final.cum_log_prob == -1.5
    assert "output_log_probs" not in output_arrays(FrameAssembler(TritonGenerateRequest("p", 3)).feed(
        {"text": "a", "token_ids": [1], "finish_reason": "length"}))


def test_request_parameters_are_refused_by_name_except_tritons_own():
    with pytest.raises(InputError, match="len_penalty: not an input"):
        parse_inputs(tensors(), {"len_penalty": 1.0})
    assert parse_inputs(tensors(), {"triton_enable_empty_final_response": True}).max_tokens == 5
