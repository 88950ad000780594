"""The Triton relay's wire format: newline-delimited JSON frames on a Unix socket.

One connection carries any number of requests, each named by an id its client picks
(unique on that connection). Every frame is one JSON object on one line (UTF-8).

client -> ingress::

    {"op": "generate", "id": 7, "body": {...}}   # a /v1/completions body; always streamed
    {"op": "cancel", "id": 7}                    # abort it in the cluster (its KV is freed)

ingress -> client::

    {"id": 7, "text": "Hel", "token_ids": [9906], "finish_reason": null}
    {"id": 7, "text": "lo", "token_ids": [...], "finish_reason": "length",
     "num_preemptions": 0, "num_migrations": 0}  # the last frame of a request
    {"id": 7, "error": "max_tokens must be at least 1, got 0", "status": 400}  # also last

``status`` is the HTTP status the ingress would have answered with (400 bad request, 429
queue full, 503 not serving, 500 failed in the cluster). A connection that closes aborts
every request still open on it.

Why not HTTP: on the Triton path the relay is a second hop after Triton's own, and HTTP
framing, Server-Sent Events and a client event loop in the Python stub cost about as much
again as Triton itself (see the README's Triton section for the measurements).
"""

from __future__ import annotations

import json
from typing import Any

MAX_FRAME_BYTES = 16 << 20
"""Longest frame either side reads (the HTTP ingress's body limit); a longer one ends the connection."""


def encode(frame: dict[str, Any]) -> bytes:
    """One frame, newline-terminated (``json.dumps`` escapes newlines inside strings)."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One frame; ``ValueError`` when the line is not a JSON object."""
    frame = json.loads(line)
    if not isinstance(frame, dict):
        raise ValueError(f"a relay frame must be a JSON object, got {type(frame).__name__}")
    return frame


def is_last(frame: dict[str, Any]) -> bool:
    """True for the last frame of a request: its finish or its error."""
    return "error" in frame or frame.get("finish_reason") is not None
