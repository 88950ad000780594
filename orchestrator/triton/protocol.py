"""TensorRT-LLM's Triton tensors <-> the ingress's completion requests and stream chunks.

The ``kunserve`` model keeps TensorRT-LLM's ensemble interface so that existing clients
(its end-to-end clients, genai-perf with ``--backend tensorrtllm``) work unchanged:

inputs  ``text_input`` BYTES, ``max_tokens`` INT32, ``stream`` BOOL,
        ``exclude_input_in_output`` BOOL, and optionally ``temperature`` FP32, ``top_k``
        INT32, ``top_p`` FP32, ``random_seed`` UINT64, ``end_id`` INT32, ``pad_id`` INT32,
        ``stop_words`` BYTES, ``bad_words`` BYTES, ``presence_penalty``,
        ``frequency_penalty``, ``repetition_penalty`` FP32, ``min_length`` (or its newer
        spelling ``min_tokens``) INT32, ``embedding_bias_words`` BYTES with
        ``embedding_bias_weights`` FP32, ``return_log_probs`` BOOL; and, refused unless
        at their default, ``beam_width`` INT32 (1), ``return_context_logits`` and
        ``return_generation_logits`` BOOL (false);
outputs ``text_output`` BYTES and ``output_ids`` INT32 (the generated tokens); with
        ``return_log_probs``, ``output_log_probs`` FP32 ``[beam, tokens]`` (each token's
        log-probability) and ``cum_log_probs`` FP32 ``[beam]`` (their sum so far);
        ``num_preemptions`` / ``num_migrations`` INT32 (how often the cluster preempted or
        migrated the request; on the last response only).

Semantics follow TensorRT-LLM's backend where it has them: with no sampling input the
decoding is greedy; ``end_id`` ends generation (in addition to the model's end-of-sequence
token); ``pad_id`` only matters for padded batches and is accepted and ignored; with
``exclude_input_in_output`` false a non-streamed answer starts with the prompt text, while
streamed chunks carry only new text. One prompt per request (``max_batch_size`` is 1).

This module does not import Triton: the model file hands it numpy arrays, so everything
here is tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUTS = ("text_input", "max_tokens", "stream", "exclude_input_in_output", "temperature", "top_k",
          "top_p", "random_seed", "end_id", "pad_id", "stop_words", "bad_words", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_length", "min_tokens", "embedding_bias_words",
          "embedding_bias_weights", "return_log_probs", "beam_width", "return_context_logits",
          "return_generation_logits")
"""Input tensors the model reads (Triton itself rejects any other name)."""

PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")


class InputError(ValueError):
    """A request's tensors cannot be served; the message names the tensor and the problem."""


@dataclass(frozen=True)
class TritonGenerateRequest:
    """One validated request, ready to forward to the ingress."""

    prompt: str
    max_tokens: int
    stream: bool = False
    exclude_input_in_output: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    end_id: int | None = None
    stop_words: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    penalties: tuple[tuple[str, float], ...] = ()
    """(OpenAI field, value) of the penalties sent."""
    min_tokens: int | None = None
    embedding_bias: tuple[tuple[str, float], ...] = ()
    """(word, weight): the weight is added to the logit of each of the word's tokens."""
    return_log_probs: bool = False

    def completion_body(self) -> dict[str, Any]:
        """The body of ``POST /v1/completions`` for this request (always streamed), with
        ``embedding_bias`` as a relay-only field (the ingress tokenizes its words)."""
        body: dict[str, Any] = {"prompt": self.prompt, "max_tokens": self.max_tokens, "stream": True,
                                "temperature": self._temperature(), **dict(self.penalties)}
        if self.min_tokens is not None:
            body["min_tokens"] = self.min_tokens
        if self.bad_words:
            body["bad_words"] = list(self.bad_words)
        if self.embedding_bias:
            body["embedding_bias"] = [list(pair) for pair in self.embedding_bias]
        if self.return_log_probs:
            body["logprobs"] = 0
        if self.top_k is not None:
            body["top_k"] = self.top_k
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.seed is not None:
            body["seed"] = self.seed
        if self.end_id is not None:
            body["stop_token_ids"] = [self.end_id]
        if self.stop_words:
            body["stop"] = list(self.stop_words)
        return body

    def _temperature(self) -> float:
        """TensorRT-LLM decodes greedily unless asked to sample (top_k > 1 or top_p < 1)."""
        if self.temperature is not None:
            return self.temperature
        samples = (self.top_k is not None and self.top_k > 1) or (self.top_p is not None and 0 < self.top_p < 1)
        return 1.0 if samples else 0.0


def parse_inputs(tensors: dict[str, np.ndarray | None],
                 parameters: dict[str, Any] | None = None) -> TritonGenerateRequest:
    """Validate one request's input tensors (name -> array, or None when not sent) and
    its parameters: Triton's generate endpoint passes a JSON field that is no input as a
    request parameter, and this model reads none, so each is refused by name (names in
    Triton's own ``triton_`` namespace are Triton's business)."""
    unread = sorted(k for k in (parameters or {}) if not k.startswith("triton_"))
    if unread:
        raise InputError(f"{unread[0]}: not an input of this model (it would be ignored)")
    text = tensors.get("text_input")
    if text is None:
        raise InputError("text_input is required")
    max_tokens = _scalar(tensors, "max_tokens", int)
    if max_tokens is None:
        raise InputError("max_tokens is required")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
    _check_defaults(tensors)
    return TritonGenerateRequest(
        prompt=_prompt(text), max_tokens=max_tokens,
        stream=bool(_scalar(tensors, "stream", bool) or False),
        exclude_input_in_output=bool(_scalar(tensors, "exclude_input_in_output", bool) or False),
        temperature=_finite(_scalar(tensors, "temperature", float), "temperature"),
        top_k=_scalar(tensors, "top_k", int), top_p=_finite(_scalar(tensors, "top_p", float), "top_p"),
        seed=_scalar(tensors, "random_seed", int), end_id=_scalar(tensors, "end_id", int),
        stop_words=_words(tensors.get("stop_words"), "stop_words"),
        bad_words=_words(tensors.get("bad_words"), "bad_words"),
        penalties=tuple((name, v) for name in PENALTIES
                        if (v := _finite(_scalar(tensors, name, float), name)) is not None),
        min_tokens=_min_tokens(tensors), embedding_bias=_embedding_bias(tensors),
        return_log_probs=bool(_scalar(tensors, "return_log_probs", bool) or False))


def _check_defaults(tensors: dict[str, np.ndarray | None]) -> None:
    """Inputs TensorRT-LLM clients send that only their default can be served at."""
    beam = _scalar(tensors, "beam_width", int)
    if beam is not None and beam != 1:
        raise InputError(f"beam_width {beam}: beam search is not supported (only 1)")
    for name in ("return_context_logits", "return_generation_logits"):
        if _scalar(tensors, name, bool):
            raise InputError(f"{name}: logits are not returned (use return_log_probs)")


def _min_tokens(tensors: dict[str, np.ndarray | None]) -> int | None:
    """``min_length`` (TensorRT-LLM's name until 0.17) or ``min_tokens`` (its later one)."""
    old, new = _scalar(tensors, "min_length", int), _scalar(tensors, "min_tokens", int)
    if old is not None and new is not None and old != new:
        raise InputError(f"min_length {old} and min_tokens {new} disagree (they are one setting)")
    return new if new is not None else old


def _embedding_bias(tensors: dict[str, np.ndarray | None]) -> tuple[tuple[str, float], ...]:
    words = _words(tensors.get("embedding_bias_words"), "embedding_bias_words")
    weights = tensors.get("embedding_bias_weights")
    values = [] if weights is None else [float(w) for w in weights.reshape(-1)]
    if len(words) != len(values):
        raise InputError(f"embedding_bias_words has {len(words)} words but embedding_bias_weights "
                         f"{len(values)} weights")
    for v in values:
        _finite(v, "embedding_bias_weights")
    return tuple(zip(words, values))


def _prompt(arr: np.ndarray) -> str:
    values = arr.reshape(-1)
    if values.size != 1:
        raise InputError(f"text_input must hold one prompt, got shape {list(arr.shape)}")
    raw = values[0]
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"text_input is not valid UTF-8: byte {exc.object[exc.start]:#04x} "
                             f"at offset {exc.start}") from None
    if not text:
        raise InputError("text_input is empty")
    return text


def _scalar(tensors: dict[str, np.ndarray | None], name: str, kind: type) -> Any:
    arr = tensors.get(name)
    if arr is None:
        return None
    values = arr.reshape(-1)
    if values.size != 1:
        raise InputError(f"{name} must hold one value, got shape {list(arr.shape)}")
    return kind(values[0].item())


def _finite(value: float | None, name: str) -> float | None:
    if value is not None and not np.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    return value


def _words(arr: np.ndarray | None, name: str) -> tuple[str, ...]:
    if arr is None:
        return ()
    words = []
    for raw in arr.reshape(-1):
        try:
            word = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name} holds a word that is not valid UTF-8") from None
        if word:
            words.append(word)
    return tuple(words)


# ----------------------------------------------------------------------------- the answer

@dataclass
class Chunk:
    """What one response to the client carries."""

    text: str
    token_ids: list[int]
    final: bool = False
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_migrations: int = 0
    log_probs: list[float] | None = None
    """With ``return_log_probs``: the chunk's tokens' log-probabilities."""
    cum_log_prob: float = 0.0
    """With ``return_log_probs``: the sum over every token so far."""


class IngressStreamError(RuntimeError):
    """The ingress answered with an error: its message (for the client) and HTTP-like status."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FrameAssembler:
    """Turns the ingress relay's frames (``orchestrator/ingress/relay_wire.py``) into the
    chunks to send to the client.

    Streamed requests get one chunk per frame (the last one marked final); non-streamed
    ones get a single final chunk with everything, the prompt first unless
    ``exclude_input_in_output``. An error frame raises ``IngressStreamError``.
    """

    request: TritonGenerateRequest
    _text: list[str] = field(default_factory=list)
    _ids: list[int] = field(default_factory=list)
    _log_probs: list[float] = field(default_factory=list)

    def feed(self, frame: dict[str, Any]) -> Chunk | None:
        """The chunk to send for one frame, if any."""
        if "error" in frame:
            raise IngressStreamError(str(frame["error"]), int(frame.get("status") or 500))
        reason = frame.get("finish_reason")
        chunk = Chunk(frame.get("text", ""), list(frame.get("token_ids", ())), final=reason is not None,
                      finish_reason=reason, num_preemptions=int(frame.get("num_preemptions", 0)),
                      num_migrations=int(frame.get("num_migrations", 0)))
        if self.request.return_log_probs:
            chunk.log_probs = [float(v) for v in frame.get("logprobs", ())]
            self._log_probs.extend(chunk.log_probs)
            chunk.cum_log_prob = sum(self._log_probs)
        if self.request.stream:
            return chunk
        self._text.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        if not chunk.final:
            return None
        prefix = "" if self.request.exclude_input_in_output else self.request.prompt
        return Chunk(prefix + "".join(self._text), self._ids, final=True, finish_reason=reason,
                     num_preemptions=chunk.num_preemptions, num_migrations=chunk.num_migrations,
                     log_probs=self._log_probs if self.request.return_log_probs else None,
                     cum_log_prob=chunk.cum_log_prob)


def output_arrays(chunk: Chunk) -> dict[str, np.ndarray]:
    """The output tensors of one response, with the batch dimension of 1. The final response
    also carries the request's preemption and migration counts; the others leave them out,
    as each tensor costs a copy through the Python backend's shared memory."""
    arrays = {"text_output": np.array([[chunk.text.encode("utf-8")]], dtype=np.object_),
              "output_ids": np.array([chunk.token_ids], dtype=np.int32).reshape(1, -1)}
    if chunk.log_probs is not None:  # TensorRT-LLM's shapes: [batch, beam, tokens] and [batch, beam]
        arrays["output_log_probs"] = np.array([chunk.log_probs], dtype=np.float32).reshape(1, 1, -1)
        arrays["cum_log_probs"] = np.array([[chunk.cum_log_prob]], dtype=np.float32)
    if chunk.final:
        arrays["num_preemptions"] = np.array([[chunk.num_preemptions]], dtype=np.int32)
        arrays["num_migrations"] = np.array([[chunk.num_migrations]], dtype=np.int32)
    return arrays


def triton_error_code(status: int) -> str:
    """The Triton error code (a ``pb_utils.TritonError`` attribute) for an ingress status:
    the client's fault, the cluster's load or state, or the cluster's failure."""
    if status in (429, 503):
        return "UNAVAILABLE"
    return "INVALID_ARG" if 400 <= status < 500 else "INTERNAL"
