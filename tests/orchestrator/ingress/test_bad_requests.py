"""Every kind of bad request gets its status and a JSON error, and the server keeps serving."""

from __future__ import annotations

import pytest

from tests.orchestrator.ingress.http_client import call

CHAT = [{"role": "user", "content": "hi"}]

# (path, method, JSON body or raw bytes, status, part of the message or None)
CASES = [
    ("/v1/completions", "POST", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", "POST", b"\xff\xfe", 400, "not valid JSON"),
    ("/v1/completions", "POST", [1, 2], 400, "JSON object"),
    ("/v1/completions", "POST", {"max_tokens": 4}, 400, "prompt is required"),
    ("/v1/completions", "POST", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", "POST", {"prompt": []}, 400, "empty"),
    ("/v1/completions", "POST", {"prompt": 5}, 400, "prompt must be"),
    ("/v1/completions", "POST", {"prompt": [1, "a"]}, 400, "prompt must be"),
    ("/v1/completions", "POST", {"prompt": ["a", {"b": 1}]}, 400, "prompt[1] must be"),
    ("/v1/completions", "POST", {"prompt": [1, True]}, 400, "prompt must be"),
    ("/v1/completions", "POST", {"prompt": [1, 99999]}, 400, "out of range"),
    ("/v1/completions", "POST", {"prompt": "a", "model": "gpt-4"}, 404, "model gpt-4 does not exist"),
    ("/v1/completions", "POST", {"prompt": "a", "model": 7}, 400, "model must be"),
    ("/v1/completions", "POST", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", "POST", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", "POST", {"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", "POST", {"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", "POST", {"prompt": "abcdefghij", "max_tokens": 60}, 400,
     "maximum context length is 64 tokens. However, you requested 71 tokens (11 in the messages, 60 in"),
    ("/v1/completions", "POST", {"prompt": "x" * 63}, 400, "maximum context length is 64"),
    ("/v1/completions", "POST", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", "POST", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", "POST", b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", "POST", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", "POST", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", "POST", {"prompt": "a", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", "POST", {"prompt": "a", "top_k": 1.5}, 400, "top_k"),
    ("/v1/completions", "POST", {"prompt": "a", "seed": "x"}, 400, "seed"),
    ("/v1/completions", "POST", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", "POST", {"prompt": "a", "ignore_eos": 1}, 400, "ignore_eos"),
    ("/v1/completions", "POST", {"prompt": "a", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("/v1/completions", "POST", {"prompt": "a", "stop_token_ids": 5}, 400, "stop_token_ids"),
    ("/v1/completions", "POST", {"prompt": "a", "stop_token_ids": [-1]}, 400, "out of range"),
    ("/v1/completions", "POST", {"prompt": "a", "n": 17}, 400, "n must be in [1, 16]"),
    ("/v1/completions", "POST", {"prompt": "a", "n": 0}, 400, "n must be in"),
    ("/v1/completions", "POST", {"prompt": "a", "n": 3, "best_of": 2}, 400, "best_of must be in [n=3"),
    ("/v1/completions", "POST", {"prompt": "a", "n": 1, "best_of": 2, "stream": True}, 400, "cannot be streamed"),
    ("/v1/completions", "POST", {"prompt": ["a"] * 129}, 400, "at most 128 prompts"),
    ("/v1/completions", "POST", {"prompt": ["a", ""]}, 400, "prompt[1] is empty"),
    ("/v1/completions", "POST", {"prompt": [[1, 2], "a", 3]}, 400, "not a mix"),
    ("/v1/completions", "POST", {"prompt": "a", "suffix": "z"}, 400, "suffix"),
    ("/v1/completions", "POST", {"prompt": "a", "beam_width": 2}, 400, "beam_width: beam search"),
    ("/v1/completions", "POST", {"prompt": "a", "use_beam_search": True}, 400, "use_beam_search"),
    ("/v1/completions", "POST", {"prompt": "a", "max_token": 5}, 400, "unknown field 'max_token'"),
    ("/v1/completions", "POST", {"prompt": "a", "logprobs": 21}, 400, "logprobs must be in [0, 20]"),
    ("/v1/completions", "POST", {"prompt": "a", "logprobs": True}, 400, "logprobs must be an integer"),
    ("/v1/completions", "POST", {"prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", "POST", {"prompt": "a", "frequency_penalty": "x"}, 400, "frequency_penalty"),
    ("/v1/completions", "POST", {"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", "POST", {"prompt": "a", "min_tokens": 20}, 400, "min_tokens"),
    ("/v1/completions", "POST", {"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias: key 'x'"),
    ("/v1/completions", "POST", {"prompt": "a", "logit_bias": {"5": 200}}, 400, "logit_bias"),
    ("/v1/completions", "POST", {"prompt": "a", "logit_bias": {"99999": 1}}, 400, "out of range"),
    ("/v1/completions", "POST", {"prompt": "a", "bad_words": [""]}, 400, "bad_words"),
    ("/v1/completions", "POST", b'{"prompt": "\\ud800"}', 400, "lone surrogate"),
    ("/v1/completions", "POST", b'{"prompt": "a", "stop": ["\\udc00"]}', 400, "stop[0] holds a lone surrogate"),
    ("/v1/completions", "POST", {"prompt": "a", "stream": True, "stream_options": {"x": 1}}, 400,
     "stream_options.x"),
    ("/v1/chat/completions", "POST", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("/v1/chat/completions", "POST", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", "POST", {"messages": CHAT, "tool_choice": "auto"}, 400, "tool_choice"),
    ("/v1/chat/completions", "POST", {"messages": CHAT, "echo": True}, 400, "echo is a completions field"),
    ("/v1/chat/completions", "POST", {"messages": CHAT, "top_logprobs": 2}, 400, "needs logprobs: true"),
    ("/v1/chat/completions", "POST", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs must be in [0, 20]"),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role must be one of system, developer, user, assistant; got 'wizard'"),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "hi", "name": "x"}]}, 400,
     "messages[0].name is not supported"),
    ("/v1/chat/completions", "POST",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "content[0]"),
    ("/v1/completions", "POST", {"prompt": "a", "stop": ["\n", ""]}, 400, "non-empty strings"),
    ("/v1/completions", "POST", {"prompt": "a", "stop": 3}, 400, "stop must be"),
    ("/v1/completions", "POST", {"prompt": "a", "stop": ["x"] * 17}, 400, "at most 16"),
    ("/v1/completions", "POST", {"prompt": "a", "stream": True, "stream_options": 1}, 400, "stream_options"),
    ("/v1/chat/completions", "POST", {"prompt": "a"}, 400, "unknown field 'prompt' for /v1/chat/completions"),
    ("/v1/chat/completions", "POST", {}, 400, "messages"),
    ("/v1/chat/completions", "POST", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", "POST", {"messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", "POST", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", "POST",
     {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text parts"),
    ("/v1/chat/completions", "POST", {"messages": CHAT, "model": "other"}, 404, "does not exist"),
    ("/v1/chat/completions", "POST", {"messages": CHAT, "max_tokens": 60}, 400, "maximum context length"),
    ("/v1/completions", "GET", None, 405, None),
    ("/v1/models", "POST", None, 405, None),
    ("/no/such/route", "GET", None, 404, None),
    ("/v1/completions", "POST", b"[" + b"1," * (8 << 20) + b"1]", 413, None),
]


@pytest.mark.parametrize("path, method, body, status, message", CASES,
                         ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_request(server, backend, path, method, body, status, message):
    raw = body if isinstance(body, bytes) else None
    r = call(server.url + path, method, body=None if raw is not None else body, data=raw)
    assert r.status == status, r.body
    err = r.body["error"]
    assert err["code"] == status and isinstance(err["type"], str)
    if message is not None:
        assert message in err["message"], err["message"]
    assert backend.submitted == []
    ok = call(server.url + "/v1/completions", "POST", {"prompt": "abc", "max_tokens": 3})
    assert ok.status == 200 and ok.body["choices"][0]["text"] == "cba"


def test_unknown_fields_are_ignored(server):
    r = call(server.url + "/v1/completions", "POST",
             {"prompt": "abc", "max_tokens": 3, "logprobs": None, "user": "x", "frequency_penalty": 0})
    assert r.status == 200 and r.body["choices"][0]["text"] == "cba"
