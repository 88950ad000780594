"""The OpenAI wire format: request bodies in (validated, tokenized), response bodies out.

Parsing turns a JSON body of ``/v1/completions`` or ``/v1/chat/completions`` into a
``GenerateRequest`` or raises ``ApiError`` with the HTTP status and a message meant for
the client. Fields the ingress does not know are ignored, as OpenAI-compatible servers do;
fields whose silent omission would change the answer (``n`` > 1, ``stop`` strings) are
refused instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import jinja2

from engines.errors import RequestError, StoreError
from engines.sampling import SamplingParams
from orchestrator.contracts import GenerateRequest, IngressBackend, TokenEvent
from orchestrator.ingress.stop_strings import MAX_STOP_STRINGS

Kind = Literal["completion", "chat"]

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for ``max_tokens`` of completions."""
DEFAULT_TEMPERATURE = 1.0
"""OpenAI's and vLLM's default; clients that want greedy decoding send ``temperature: 0``."""

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                409: "ConflictError", 413: "RequestEntityTooLargeError", 429: "TooManyRequestsError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """A request the ingress refuses, with the HTTP status and the message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def type(self) -> str:
        return error_type(self.status)


class InvalidRequest(ApiError):
    """The body is malformed or a field has a bad value (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class ModelNotFound(ApiError):
    """The body names a model this server does not serve (404)."""

    def __init__(self, model: str) -> None:
        super().__init__(404, f"model {model} does not exist")


def error_type(status: int) -> str:
    """The ``type`` field of an error body for an HTTP status, vLLM-style."""
    return _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


def error_body(status: int, message: str) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "code"}}``."""
    return {"error": {"message": message, "type": error_type(status), "code": status}}


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request and how to answer it."""

    kind: Kind
    request: GenerateRequest
    model: str
    """The model name to put in responses (the served one)."""
    stream: bool
    include_usage: bool
    """``stream_options.include_usage``: send a usage chunk before ``[DONE]``."""
    stop: tuple[str, ...] = ()
    """Stop strings: the answer ends before the first one (it is not sent)."""


def parse_request(kind: Kind, body: Any, backend: IngressBackend, request_id: str,
                  arrival_time: float | None = None) -> ParsedRequest:
    """Validate and tokenize one request body; raise ``ApiError`` for anything wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_model(body.get("model"), backend.model_name)
    _check_unsupported(body)
    if kind == "chat":
        prompt_ids = _chat_prompt_ids(body.get("messages"), backend)
        max_tokens = _opt_int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _opt_int(body, "max_tokens")
    else:
        prompt_ids = _completion_prompt_ids(body.get("prompt"), backend)
        max_tokens = _opt_int(body, "max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}")
    _check_length(len(prompt_ids), max_tokens, backend.max_model_len)
    sampling = _sampling(body, max_tokens, backend.tokenizer.vocab_size)
    req = GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling)
    if arrival_time is not None:
        req.arrival_time = arrival_time
    stream = _opt_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object")
    include_usage = stream and _opt_bool(options or {}, "include_usage", False)
    return ParsedRequest(kind=kind, request=req, model=backend.model_name, stream=stream,
                         include_usage=include_usage, stop=_stop_strings(body.get("stop")))


def _check_model(model: Any, served: str) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string")
    if model != served:
        raise ModelNotFound(model)


def _completion_prompt_ids(prompt: Any, backend: IngressBackend) -> list[int]:
    if prompt is None:
        raise InvalidRequest("prompt is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        return backend.tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        _check_token_ids("prompt", prompt, backend.tokenizer.vocab_size)
        return list(prompt)
    raise InvalidRequest("prompt must be a string, a list of one string, or a list of token ids")


def _chat_prompt_ids(messages: Any, backend: IngressBackend) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    rendered = [_message(m, i) for i, m in enumerate(messages)]
    try:
        text = backend.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
    except StoreError as exc:
        raise InvalidRequest(f"this model cannot chat: {exc}") from None
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"the chat template refused the messages: {exc}") from None
    ids = backend.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InvalidRequest("the prompt is empty")
    return ids


def _message(m: Any, index: int) -> dict[str, str]:
    if not isinstance(m, dict):
        raise InvalidRequest(f"messages[{index}] must be an object")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"messages[{index}].role must be a non-empty string")
    if isinstance(content, list):
        # OpenAI clients may send content as text parts; only text can be served here.
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise InvalidRequest(f"messages[{index}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise InvalidRequest(f"messages[{index}].content must be a string")
    return {"role": role, "content": content}


def _check_length(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_len >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_len} tokens, which leaves no room for the completion. "
            f"Please reduce the length of the prompt.")
    if prompt_len + max_tokens > max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or completion.")


def _check_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("only n=1 is supported")


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest("stop must be a non-empty string or a list of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    return tuple(stop)


def _sampling(body: dict[str, Any], max_tokens: int, vocab_size: int) -> SamplingParams:
    temperature = _opt_float(body, "temperature")
    top_p = _opt_float(body, "top_p")
    top_k = _opt_int(body, "top_k")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is None:
        stop_ids = []
    if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
        raise InvalidRequest("stop_token_ids must be a list of integers")
    _check_token_ids("stop_token_ids", stop_ids, vocab_size)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=0 if top_k in (None, -1) else top_k,  # vLLM spells "all tokens" as -1
            seed=_opt_int(body, "seed"), ignore_eos=_opt_bool(body, "ignore_eos", False),
            stop_token_ids=tuple(stop_ids))
    except RequestError as exc:
        raise InvalidRequest(str(exc)) from None


def _check_token_ids(field: str, ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"{field}: token id {bad[0]} is out of range [0, {vocab_size})")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise InvalidRequest(f"{key} must be an integer, got {v!r}")
    return v


def _opt_float(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    # Python's json accepts NaN and Infinity; neither is a usable sampling value.
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise InvalidRequest(f"{key} must be a finite number, got {v!r}")
    return float(v)


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequest(f"{key} must be a boolean, got {v!r}")
    return v


# ----------------------------------------------------------------------------- responses

def _envelope(p: ParsedRequest, chunk: bool) -> dict[str, Any]:
    if p.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {"id": p.request.request_id, "object": obj, "created": int(time.time()), "model": p.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The OpenAI ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(p: ParsedRequest, text: str, token_ids: list[int], finish_reason: str | None,
                  last: TokenEvent | None = None) -> dict[str, Any]:
    """The body of a non-streaming answer; ``token_ids`` is a vLLM-like extension, and so are
    the request's preemption and migration counts (from its ``last`` event)."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason,
                              "token_ids": token_ids, **_counts(last)}
    if p.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body = _envelope(p, chunk=False)
    body["choices"] = [choice]
    body["usage"] = usage(len(p.request.prompt_token_ids), len(token_ids))
    return body


def stream_chunk(p: ParsedRequest, text: str, token_ids: list[int], finish_reason: str | None = None,
                 role: bool = False, last: TokenEvent | None = None) -> dict[str, Any]:
    """One streamed chunk: the new text and token ids; ``role`` marks chat's first chunk; the
    final chunk also carries the request's preemption and migration counts."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason,
                              "token_ids": token_ids, **_counts(last)}
    if p.kind == "chat":
        choice["delta"] = {"role": "assistant", "content": text} if role else {"content": text}
    else:
        choice["text"] = text
    body = _envelope(p, chunk=True)
    body["choices"] = [choice]
    return body


def _counts(last: TokenEvent | None) -> dict[str, int]:
    if last is None:
        return {}
    return {"num_preemptions": last.num_preemptions, "num_migrations": last.num_migrations}


def usage_chunk(p: ParsedRequest, completion_tokens: int) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    body = _envelope(p, chunk=True)
    body["choices"] = []
    body["usage"] = usage(len(p.request.prompt_token_ids), completion_tokens)
    return body
