"""The OpenAI wire format in: request bodies validated and tokenized into generations.

``parse_request`` turns a JSON body of ``/v1/completions`` or ``/v1/chat/completions``
into a ``ParsedRequest`` (one ``GenerateRequest`` per generation: each prompt of a list,
``best_of`` times) or raises ``ApiError`` with the HTTP status and a message meant for
the client. Which fields each route honours is ``openai_fields.py``'s table; the answers
are built by ``openai_responses.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

import jinja2

from engines.errors import RequestError, StoreError
from engines.sampling import MAX_LOGPROBS, SamplingParams
from orchestrator.contracts import GenerateRequest, IngressBackend
from orchestrator.ingress.errors import ApiError, InvalidRequest, ModelNotFound, error_body, error_type
from orchestrator.ingress.openai_fields import check_fields, is_int, opt_bool, opt_float, opt_int, token_ids
from orchestrator.ingress.stop_strings import MAX_STOP_STRINGS

__all__ = ["ApiError", "InvalidRequest", "ModelNotFound", "error_body", "error_type", "Kind", "ParsedRequest",
           "parse_request"]

logger = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for ``max_tokens`` of completions."""
DEFAULT_TEMPERATURE = 1.0
"""OpenAI's and vLLM's default; clients that want greedy decoding send ``temperature: 0``."""
MAX_N = 16
"""Most choices (``n``, ``best_of``) one prompt may ask for."""
MAX_GENERATIONS = 128
"""Most generations one request may start (prompts times ``best_of``)."""
CHAT_ROLES = ("system", "developer", "user", "assistant")
"""Roles a chat message may have (tool messages need tool calling, which is not served)."""


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: the generations to run and how to answer them."""

    kind: Kind
    generations: tuple[GenerateRequest, ...]
    """Prompt-major: prompt i's generations are ``[i * best_of, (i + 1) * best_of)``."""
    model: str
    """The model name to put in responses (the served one)."""
    stream: bool
    include_usage: bool
    """``stream_options.include_usage``: send a usage chunk before ``[DONE]``."""
    stop: tuple[str, ...] = ()
    """Stop strings: the answer ends before the first one (it is not sent)."""
    n: int = 1
    best_of: int = 1
    """Generations per prompt; the ``n`` with the highest mean token log-probability are answered."""
    echo: bool = False
    """Completions: the answer's text (and log-probabilities) start with the prompt's."""
    logprobs: int | None = None
    """Alternatives per token the client asked for (None: no log-probabilities in the answer)."""
    prompt_texts: tuple[str, ...] = ()
    """Each prompt's text, for ``echo``."""
    request_id: str = ""

    @property
    def request(self) -> GenerateRequest:
        """The first generation (the only one of a plain request)."""
        return self.generations[0]

    @property
    def num_prompts(self) -> int:
        return len(self.generations) // self.best_of

    @property
    def prompt_tokens(self) -> int:
        return sum(len(g.prompt_token_ids) for g in self.generations[::self.best_of])


def parse_request(kind: Kind, body: Any, backend: IngressBackend, request_id: str,
                  arrival_time: float | None = None) -> ParsedRequest:
    """Validate and tokenize one request body; raise ``ApiError`` for anything wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_unicode(body, "body")
    check_fields(kind, body)
    _check_model(body.get("model"), backend.model_name)
    if kind == "chat":
        prompts = [(_chat_prompt_ids(body.get("messages"), backend), None)]
        max_tokens = _first_int(body, "max_completion_tokens", "max_tokens")
    else:
        prompts = _completion_prompts(body.get("prompt"), backend)
        max_tokens = opt_int(body, "max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}")
    for ids, _ in prompts:
        _check_length(len(ids), max_tokens, backend.max_model_len)
    stream = opt_bool(body, "stream", False)
    n, best_of = _choices(body, stream, len(prompts))
    echo = opt_bool(body, "echo", False)
    logprobs = _logprobs(kind, body)
    sampling = _sampling(body, max_tokens, backend, logprobs, best_of > n, echo)
    if body.get("user") is not None:
        logger.debug("request %s is from user %r", request_id, body["user"])
    generations = tuple(_generation(request_id, g, len(prompts) * best_of, ids, sampling, g % best_of, arrival_time)
                        for g, (ids, _) in enumerate(p for p in prompts for _ in range(best_of)))
    texts = tuple(text if text is not None else backend.tokenizer.decode(ids) for ids, text in prompts) if echo else ()
    return ParsedRequest(kind=kind, generations=generations, model=backend.model_name, stream=stream,
                         include_usage=stream and _include_usage(body.get("stream_options")),
                         stop=_stop_strings(body.get("stop")), n=n, best_of=best_of, echo=echo,
                         logprobs=logprobs, prompt_texts=texts, request_id=request_id)


def _generation(request_id: str, g: int, total: int, ids: list[int], sampling: SamplingParams, j: int,
                arrival_time: float | None) -> GenerateRequest:
    """Generation ``g``: its own request id when there are several, its own seeded stream
    (seed + its index among its prompt's) when seeded."""
    if sampling.seed is not None and j:
        sampling = replace(sampling, seed=sampling.seed + j)
    req = GenerateRequest(request_id=request_id if total == 1 else f"{request_id}-{g}",
                          prompt_token_ids=list(ids), sampling=sampling)
    if arrival_time is not None:
        req.arrival_time = arrival_time
    return req


def _check_unicode(value: Any, where: str) -> None:
    """Python's json decodes a lone surrogate escape (``"\\ud800"``) into a string that
    cannot be encoded; refuse it here, naming where it is, rather than fail later."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"{where} holds a lone surrogate {value[exc.start]!r} at offset {exc.start}; "
                                 f"text must be valid Unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where)
            _check_unicode(v, f"{k}" if where == "body" else f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{where}[{i}]")


def _check_model(model: Any, served: str) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string")
    if model != served:
        raise ModelNotFound(model)


def _first_int(body: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = opt_int(body, key)
        if value is not None:
            return value
    return None


def _completion_prompts(prompt: Any, backend: IngressBackend) -> list[tuple[list[int], str | None]]:
    """(token ids, text or None) per prompt: a string, a list of token ids, or a list of either."""
    if prompt is None:
        raise InvalidRequest("prompt is required")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompt = [prompt]
    if isinstance(prompt, list) and any(is_int(t) for t in prompt):
        raise InvalidRequest("prompt must be a list of token ids or a list of prompts, not a mix of both")
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("prompt must be a string, a list of token ids, or a non-empty list of either")
    if len(prompt) > MAX_GENERATIONS:
        raise InvalidRequest(f"prompt: at most {MAX_GENERATIONS} prompts per request, got {len(prompt)}")
    return [_one_prompt(p, f"prompt[{i}]" if len(prompt) > 1 else "prompt", backend) for i, p in enumerate(prompt)]


def _one_prompt(p: Any, where: str, backend: IngressBackend) -> tuple[list[int], str | None]:
    if isinstance(p, str):
        if not p:
            raise InvalidRequest(f"{where} is empty")
        return backend.tokenizer.encode(p, add_special_tokens=True), p
    if isinstance(p, list):
        if not p:
            raise InvalidRequest(f"{where} is empty")
        return token_ids(where, p, backend.tokenizer.vocab_size), None
    raise InvalidRequest(f"{where} must be a string or a list of token ids")


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
    where = f"messages[{index}]"
    if not isinstance(m, dict):
        raise InvalidRequest(f"{where} must be an object")
    extra = sorted(set(m) - {"role", "content"})
    if extra:
        raise InvalidRequest(f"{where}.{extra[0]} is not supported (a message has role and content)")
    role, content = m.get("role"), m.get("content")
    if role not in CHAT_ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.content must be a string or a list of text parts")
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


def _choices(body: dict[str, Any], stream: bool, prompts: int) -> tuple[int, int]:
    n = opt_int(body, "n")
    n = 1 if n is None else n
    best_of = opt_int(body, "best_of")
    best_of = n if best_of is None else best_of
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"n must be in [1, {MAX_N}], got {n}")
    if not n <= best_of <= MAX_N:
        raise InvalidRequest(f"best_of must be in [n={n}, {MAX_N}], got {best_of}")
    if stream and best_of > n:
        raise InvalidRequest("best_of > n cannot be streamed (the best are known only at the end)")
    if prompts * best_of > MAX_GENERATIONS:
        raise InvalidRequest(f"{prompts} prompts x {best_of} choices: at most {MAX_GENERATIONS} generations "
                             f"per request")
    return n, best_of


def _logprobs(kind: Kind, body: dict[str, Any]) -> int | None:
    """Completions: ``logprobs: k``. Chat: ``logprobs: true`` with ``top_logprobs: k``."""
    if kind == "completion":
        k = opt_int(body, "logprobs")
    else:
        top = opt_int(body, "top_logprobs")
        if not opt_bool(body, "logprobs", False):
            if top is not None:
                raise InvalidRequest("top_logprobs needs logprobs: true")
            return None
        k = 0 if top is None else top
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise InvalidRequest(f"{'logprobs' if kind == 'completion' else 'top_logprobs'} must be in "
                             f"[0, {MAX_LOGPROBS}], got {k}")
    return k


def _include_usage(options: Any) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object")
    extra = sorted(set(options) - {"include_usage"})
    if extra:
        raise InvalidRequest(f"stream_options.{extra[0]} is not supported")
    return opt_bool(options, "include_usage", False)


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


def _sampling(body: dict[str, Any], max_tokens: int, backend: IngressBackend, logprobs: int | None,
              rank: bool, echo: bool) -> SamplingParams:
    """``rank``: best_of > n, so every generation reports its log-probabilities for ranking."""
    temperature, top_p, top_k = opt_float(body, "temperature"), opt_float(body, "top_p"), opt_int(body, "top_k")
    vocab = backend.tokenizer.vocab_size
    stop_ids = body.get("stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=0 if top_k in (None, -1) else top_k,  # vLLM spells "all tokens" as -1
            seed=opt_int(body, "seed"), ignore_eos=opt_bool(body, "ignore_eos", False),
            stop_token_ids=tuple(token_ids("stop_token_ids", stop_ids, vocab)) if stop_ids is not None else (),
            min_tokens=opt_int(body, "min_tokens") or 0,
            presence_penalty=opt_float(body, "presence_penalty") or 0.0,
            frequency_penalty=opt_float(body, "frequency_penalty") or 0.0,
            repetition_penalty=_or(opt_float(body, "repetition_penalty"), 1.0),
            logit_bias=_logit_bias(body.get("logit_bias"), vocab),
            bad_words=_bad_words(body.get("bad_words"), backend),
            logprobs=0 if rank and logprobs is None else logprobs,
            prompt_logprobs=logprobs if echo and logprobs is not None else None)
    except RequestError as exc:
        raise InvalidRequest(str(exc)) from None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _logit_bias(bias: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` (keys are strings in JSON)."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise InvalidRequest("logit_bias must be an object mapping token ids to numbers")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit()):
            raise InvalidRequest(f"logit_bias: key {key!r} is not a token id")
        token = int(key)
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"logit_bias: token id {token} is out of range [0, {vocab_size})")
        out.append((token, opt_float(bias, key)))
    return tuple(out)


def _bad_words(words: Any, backend: IngressBackend) -> tuple[tuple[int, ...], ...]:
    """vLLM's ``bad_words``: strings, each banned as tokenized alone and after a space."""
    if words is None:
        return ()
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise InvalidRequest("bad_words must be a list of non-empty strings")
    seqs = set()
    for w in words:
        for text in {w, w if w.startswith(" ") else " " + w}:
            ids = backend.tokenizer.encode(text, add_special_tokens=False)
            if ids:
                seqs.add(tuple(ids))
    return tuple(sorted(seqs))
