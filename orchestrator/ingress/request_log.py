"""The request log (``serve --request-log PATH``): one JSON line per admitted request.

Written when the ingress is done with a request, however it ended::

    {"id": "cmpl-5f0c...", "route": "http", "time": "2026-11-21T13:52:07.104+00:00",
     "arrival": 27231.4726, "first_token": 27231.5581, "end": 27231.6412, "ttft_ms": 85.46,
     "prompt_tokens": 9, "output_tokens": 2, "finish_reason": "length"}

``route`` is ``http`` (the OpenAI API) or ``triton`` (the Triton relay). ``arrival``,
``first_token`` and ``end`` are ``time.monotonic()`` seconds, the clock that clients on the
same host and Triton's trace timestamps use, so a request's time in the ingress can be set
against what its client saw (``perf/triton_bench.py`` does). ``time`` is the wall-clock end.
``finish_reason`` is the cluster's (``stop``, ``length``), ``abort`` when the client went
away first, or ``error`` when the request failed in the cluster. Once the cluster reported
them: ``cached_tokens`` (prompt tokens served from the prefix cache, caching on) and
``instance`` (the leader rank of the instance that computed the prompt) with its
``instance_shape`` (``tp2xpp1``: two tensor-parallel devices, one stage).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from orchestrator.ingress.metrics import RequestTiming


class RequestLog:
    """Appends records to a file, a line each, flushed as written (the event loop's thread only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, timing: RequestTiming, finish_reason: str | None, end: float) -> None:
        ttft = None if timing.first_token_time is None else (timing.first_token_time - timing.arrival_time) * 1e3
        record = {"id": timing.request_id, "route": timing.route,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                  "arrival": timing.arrival_time, "first_token": timing.first_token_time, "end": end,
                  "ttft_ms": None if ttft is None else round(ttft, 3), "prompt_tokens": timing.prompt_tokens,
                  "output_tokens": timing.num_output_tokens, "finish_reason": finish_reason}
        if timing.cached_tokens is not None:
            record["cached_tokens"] = timing.cached_tokens
        if timing.instance is not None:
            record["instance"] = timing.instance
            record["instance_shape"] = timing.instance_shape
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def read_request_log(path: Path) -> list[dict]:
    """The records of a request log, in the order written."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
