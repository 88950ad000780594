"""Parsing request bodies into ``GenerateRequest``s, without a server."""

from __future__ import annotations

import pytest

from orchestrator.ingress.openai_protocol import (
    DEFAULT_TEMPERATURE,
    ApiError,
    ModelNotFound,
    error_body,
    parse_request,
)
from orchestrator.ingress.openai_responses import ChoiceResult, full_response


def test_completion_defaults(backend):
    p = parse_request("completion", {"prompt": "hi"}, backend, "cmpl-1", arrival_time=12.5)
    s = p.request.sampling
    assert p.request.prompt_token_ids == backend.tokenizer.encode("hi")
    assert p.request.arrival_time == 12.5 and p.request.request_id == "cmpl-1"
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.ignore_eos, s.stop_token_ids) == (
        16, DEFAULT_TEMPERATURE, 1.0, 0, None, False, ())
    assert not p.stream and not p.include_usage and p.model == "tiny"


def test_sampling_fields(backend):
    body = {"prompt": [5, 6], "max_tokens": 3, "temperature": 0, "top_p": 0.5, "top_k": -1,
            "seed": 7, "ignore_eos": True, "stop_token_ids": [1, 2], "stream": True,
            "stream_options": {"include_usage": True}}
    p = parse_request("completion", body, backend, "cmpl-2")
    s = p.request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.ignore_eos, s.stop_token_ids) == (
        3, 0.0, 0.5, 0, 7, True, (1, 2))
    assert p.stream and p.include_usage


def test_chat_template_and_max_completion_tokens(backend):
    messages = [{"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "y"}]}]
    p = parse_request("chat", {"messages": messages, "max_completion_tokens": 4, "max_tokens": 9},
                      backend, "chatcmpl-1")
    tok = backend.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hey"}])
    assert p.request.prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert p.request.prompt_token_ids[0] != tok.token_to_id("<|begin_of_text|>")
    assert p.request.sampling.max_tokens == 4


def test_errors_carry_status(backend):
    with pytest.raises(ModelNotFound) as exc:
        parse_request("completion", {"prompt": "a", "model": "m"}, backend, "x")
    assert exc.value.status == 404 and exc.value.type == "NotFoundError"
    with pytest.raises(ApiError) as exc:
        parse_request("completion", {"prompt": "a" * 60, "max_tokens": 10}, backend, "x")
    assert exc.value.status == 400
    assert exc.value.message.startswith(
        "This model's maximum context length is 64 tokens. However, you requested 71 tokens "
        "(61 in the messages, 10 in the completion)")


def test_max_model_len_boundary(backend):
    parse_request("completion", {"prompt": "a" * 47, "max_tokens": 16}, backend, "x")  # 48 + 16 = 64
    with pytest.raises(ApiError):
        parse_request("completion", {"prompt": "a" * 48, "max_tokens": 16}, backend, "x")


def test_chat_without_template(backend):
    backend.tokenizer.chat_template, saved = None, backend.tokenizer.chat_template
    try:
        with pytest.raises(ApiError) as exc:
            parse_request("chat", {"messages": [{"role": "user", "content": "a"}]}, backend, "x")
        assert exc.value.status == 400
    finally:
        backend.tokenizer.chat_template = saved


def test_response_shapes(backend):
    p = parse_request("chat", {"messages": [{"role": "user", "content": "a"}]}, backend, "chatcmpl-9")
    body = full_response(p, [ChoiceResult(0, "ok", [1, 2], "stop")])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert body["usage"]["total_tokens"] == len(p.request.prompt_token_ids) + 2
    assert error_body(429, "busy") == {"error": {"message": "busy", "type": "TooManyRequestsError", "code": 429}}
