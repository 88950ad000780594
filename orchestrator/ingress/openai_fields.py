"""What each OpenAI route accepts: every field is honoured, or refused with a 400 naming it.

A field the server does not know is refused too (a misspelt ``max_token`` must not
silently produce 16 tokens). A few fields are honoured only at the value that asks for
what the server does anyway (``response_format: {"type": "text"}``, ``tools: []``); any
other value is refused with the reason. The README's field table is this module's.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from orchestrator.ingress.errors import InvalidRequest

SAMPLING = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "stop_token_ids", "ignore_eos", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "min_tokens", "logit_bias", "bad_words", "user"})
"""Fields both routes honour."""

ACCEPTED = {
    "completion": SAMPLING | {"prompt", "echo", "logprobs", "best_of"},
    "chat": SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"},
}

HONOURED_AT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (lambda v: v == {"type": "text"}, 'only {"type": "text"} is served'),
    "tools": (lambda v: v == [], "tool calling is not supported"),
    "tool_choice": (lambda v: v == "none", 'tool calling is not supported (only "none")'),
    "parallel_tool_calls": (lambda v: v is False, "tool calling is not supported"),
    "store": (lambda v: v is False, "stored completions are not supported"),
    "modalities": (lambda v: v == ["text"], 'only ["text"] is served'),
}
"""Fields honoured at one value (the one that asks for plain text generation)."""

REFUSED = {
    "suffix": "insertion (suffix) is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "use_beam_search": "beam search is not supported",
    "beam_width": "beam search is not supported",
    "length_penalty": "beam search is not supported",
    "min_p": "min_p sampling is not supported",
    "prompt_logprobs": "use echo with logprobs for prompt log-probabilities",
    "allowed_token_ids": "allowed_token_ids is not supported; use logit_bias",
    "guided_json": "guided decoding is not supported",
    "guided_regex": "guided decoding is not supported",
    "guided_choice": "guided decoding is not supported",
    "include_stop_str_in_output": "stop strings are never included in the output",
    "skip_special_tokens": "special tokens are always skipped in the text",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model has no reasoning mode",
    "service_tier": "there is one service tier",
    "metadata": "stored completions are not supported",
    "web_search_options": "web search is not supported",
    "echo": "echo is a completions field",
}
"""Fields clients send that this server cannot honour, with the reason."""


def check_fields(kind: str, body: dict[str, Any]) -> None:
    """Refuse, by name, every field of ``body`` that ``kind``'s route would not honour."""
    accepted = ACCEPTED[kind]
    for key, value in body.items():
        if key in accepted:
            continue
        if key in HONOURED_AT:
            ok, why = HONOURED_AT[key]
            if value is None or ok(value):
                continue
            raise InvalidRequest(f"{key}: {why}")
        if key in REFUSED:
            raise InvalidRequest(f"{key}: {REFUSED[key]}")
        raise InvalidRequest(f"unknown field {key!r} for {_route(kind)}")


def _route(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


# ----------------------------------------------------------------------------- typed reads

def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def opt_int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not is_int(v):
        raise InvalidRequest(f"{key} must be an integer, got {v!r}")
    return v


def opt_float(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    # Python's json accepts NaN and Infinity; neither is a usable sampling value.
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise InvalidRequest(f"{key} must be a finite number, got {v!r}")
    return float(v)


def opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequest(f"{key} must be a boolean, got {v!r}")
    return v


def token_ids(field: str, ids: Any, vocab_size: int) -> list[int]:
    """A list of in-vocabulary token ids, or a 400 naming ``field``."""
    if not isinstance(ids, list) or not all(is_int(t) for t in ids):
        raise InvalidRequest(f"{field} must be a list of integer token ids")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"{field}: token id {bad[0]} is out of range [0, {vocab_size})")
    return list(ids)
