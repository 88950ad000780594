"""The OpenAI wire format out: answer bodies, stream chunks and usage, for one or more choices."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.contracts import TokenEvent
from orchestrator.ingress.openai_logprobs import merge
from orchestrator.ingress.openai_protocol import ParsedRequest


@dataclass
class ChoiceResult:
    """One generation's whole answer (a non-streamed request)."""

    generation: int
    """Its index in ``ParsedRequest.generations``."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprob_parts: list[dict[str, Any]] = field(default_factory=list)
    """Formatted log-probabilities, one part per event."""
    token_logprobs: list[float] = field(default_factory=list)
    """The generated tokens' own log-probabilities (for ranking ``best_of``)."""
    last: TokenEvent | None = None
    cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache (when the cluster reported it)."""

    @property
    def mean_logprob(self) -> float:
        return sum(self.token_logprobs) / max(1, len(self.token_logprobs))


def select(p: ParsedRequest, results: list[ChoiceResult]) -> list[ChoiceResult]:
    """The answered choices, prompt-major: all of them, or with ``best_of`` > n each
    prompt's ``n`` of the highest mean token log-probability (OpenAI's "best")."""
    if p.best_of == p.n:
        return results
    out = []
    for i in range(p.num_prompts):
        mine = results[i * p.best_of:(i + 1) * p.best_of]
        out.extend(sorted(mine, key=lambda r: -r.mean_logprob)[:p.n])
    return out


def _envelope(p: ParsedRequest, chunk: bool) -> dict[str, Any]:
    if p.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {"id": p.request_id or p.request.request_id, "object": obj, "created": int(time.time()),
            "model": p.model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """The OpenAI ``usage`` object; ``prompt_tokens_details.cached_tokens`` when the
    cluster reported it (prefix caching on)."""
    body: dict = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def cached_tokens(p: ParsedRequest, per_generation: list[int | None]) -> int | None:
    """Each prompt's cached tokens, summed (its first generation's; None if none reported)."""
    first = per_generation[::p.best_of]
    return None if all(c is None for c in first) else sum(c or 0 for c in first)


def full_response(p: ParsedRequest, results: list[ChoiceResult]) -> dict[str, Any]:
    """The body of a non-streaming answer; ``token_ids`` is a vLLM-like extension, and so are
    each choice's preemption and migration counts (from its last event)."""
    chosen = select(p, results)
    choices = []
    for index, r in enumerate(chosen):
        choice: dict[str, Any] = {"index": index, "finish_reason": r.finish_reason, "token_ids": r.token_ids,
                                  "logprobs": merge(r.logprob_parts) if p.logprobs is not None else None,
                                  **_counts(r.last)}
        if p.kind == "chat":
            choice["message"] = {"role": "assistant", "content": r.text}
        else:
            choice["text"] = r.text
        choices.append(choice)
    body = _envelope(p, chunk=False)
    body["choices"] = choices
    body["usage"] = usage(p.prompt_tokens, sum(len(r.token_ids) for r in chosen),
                          cached_tokens(p, [r.cached_tokens for r in results]))
    return body


def stream_chunk(p: ParsedRequest, text: str, token_ids: list[int], finish_reason: str | None = None,
                 role: bool = False, last: TokenEvent | None = None, index: int = 0,
                 logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk of choice ``index``: the new text and token ids; ``role`` marks
    chat's first chunk; the final chunk also carries the preemption and migration counts."""
    choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason,
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


def usage_chunk(p: ParsedRequest, completion_tokens: int, cached: int | None = None) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    body = _envelope(p, chunk=True)
    body["choices"] = []
    body["usage"] = usage(p.prompt_tokens, completion_tokens, cached)
    return body
