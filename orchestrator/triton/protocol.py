"""TensorRT-LLM's Triton tensors <-> the ingress's completion requests and stream chunks.

The ``kunserve`` model keeps TensorRT-LLM's ensemble interface so that existing clients
(its end-to-end clients, genai-perf with ``--backend tensorrtllm``) work unchanged:

inputs  ``text_input`` BYTES, ``max_tokens`` INT32, ``stream`` BOOL,
        ``exclude_input_in_output`` BOOL, and optionally ``temperature`` FP32, ``top_k``
        INT32, ``top_p`` FP32, ``random_seed`` UINT64, ``end_id`` INT32, ``pad_id`` INT32,
        ``stop_words`` BYTES;
outputs ``text_output`` BYTES and ``output_ids`` INT32 (the generated tokens), and
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
          "top_p", "random_seed", "end_id", "pad_id", "stop_words")
"""Input tensors the model reads (Triton itself rejects any other name)."""


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

    def completion_body(self) -> dict[str, Any]:
        """The body of ``POST /v1/completions`` for this request (always streamed)."""
        body: dict[str, Any] = {"prompt": self.prompt, "max_tokens": self.max_tokens, "stream": True,
                                "temperature": self._temperature()}
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


def parse_inputs(tensors: dict[str, np.ndarray | None]) -> TritonGenerateRequest:
    """Validate one request's input tensors (name -> array, or None when not sent)."""
    text = tensors.get("text_input")
    if text is None:
        raise InputError("text_input is required")
    max_tokens = _scalar(tensors, "max_tokens", int)
    if max_tokens is None:
        raise InputError("max_tokens is required")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
    return TritonGenerateRequest(
        prompt=_prompt(text), max_tokens=max_tokens,
        stream=bool(_scalar(tensors, "stream", bool) or False),
        exclude_input_in_output=bool(_scalar(tensors, "exclude_input_in_output", bool) or False),
        temperature=_finite(_scalar(tensors, "temperature", float), "temperature"),
        top_k=_scalar(tensors, "top_k", int), top_p=_finite(_scalar(tensors, "top_p", float), "top_p"),
        seed=_scalar(tensors, "random_seed", int), end_id=_scalar(tensors, "end_id", int),
        stop_words=_stop_words(tensors.get("stop_words")))


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


def _stop_words(arr: np.ndarray | None) -> tuple[str, ...]:
    if arr is None:
        return ()
    words = []
    for raw in arr.reshape(-1):
        try:
            word = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("stop_words holds a word that is not valid UTF-8") from None
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

    def feed(self, frame: dict[str, Any]) -> Chunk | None:
        """The chunk to send for one frame, if any."""
        if "error" in frame:
            raise IngressStreamError(str(frame["error"]), int(frame.get("status") or 500))
        reason = frame.get("finish_reason")
        chunk = Chunk(frame.get("text", ""), list(frame.get("token_ids", ())), final=reason is not None,
                      finish_reason=reason, num_preemptions=int(frame.get("num_preemptions", 0)),
                      num_migrations=int(frame.get("num_migrations", 0)))
        if self.request.stream:
            return chunk
        self._text.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        if not chunk.final:
            return None
        prefix = "" if self.request.exclude_input_in_output else self.request.prompt
        return Chunk(prefix + "".join(self._text), self._ids, final=True, finish_reason=reason,
                     num_preemptions=chunk.num_preemptions, num_migrations=chunk.num_migrations)


def output_arrays(chunk: Chunk) -> dict[str, np.ndarray]:
    """The output tensors of one response, with the batch dimension of 1. The final response
    also carries the request's preemption and migration counts; the others leave them out,
    as each tensor costs a copy through the Python backend's shared memory."""
    arrays = {"text_output": np.array([[chunk.text.encode("utf-8")]], dtype=np.object_),
              "output_ids": np.array([chunk.token_ids], dtype=np.int32).reshape(1, -1)}
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
