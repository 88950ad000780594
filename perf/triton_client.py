"""Clients of the cluster through Triton, for tests and benchmarks.

- ``TritonCluster``: ``ServingCluster`` with ``--triton`` on free ports, ready once Triton's
  models are;
- ``stream_generate``: many requests over one gRPC bidirectional stream
  (``tritonclient.grpc.aio``), each response timed as it arrives;
- ``generate_inputs``: TensorRT-LLM-style input tensors for either tritonclient flavour.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from perf.cluster_client import ServingCluster, free_port


class TritonCluster(ServingCluster):
    """The cluster under mpirun behind its tritonserver, every port picked free."""

    def __init__(self, n: int, store: Path, *args: str, device_memory: str = "64MiB",
                 model_names: str = "kunserve,kunserve_unary") -> None:
        self.triton_http, self.triton_grpc, self.triton_metrics = free_port(), free_port(), free_port()
        super().__init__(n, store, "--triton", "--triton-http-port", str(self.triton_http),
                         "--triton-grpc-port", str(self.triton_grpc),
                         "--triton-metrics-port", str(self.triton_metrics),
                         "--triton-model-names", model_names, *args, device_memory=device_memory)
        self.model_names = [n.split("=")[0] for n in model_names.split(",")]

    @property
    def triton_url(self) -> str:
        return f"http://127.0.0.1:{self.triton_http}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.triton_grpc}"

    def start(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        super().start(timeout)
        while time.monotonic() < deadline:
            if all(self.model_ready(name) for name in self.model_names):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Triton's models not ready within {timeout} s:\n{self.output()}")

    def model_ready(self, name: str = "kunserve") -> bool:
        try:
            with urllib.request.urlopen(f"{self.triton_url}/v2/models/{name}/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def triton_metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.triton_metrics}/metrics", timeout=5) as r:
            return r.read().decode()


def generate_inputs(module: Any, prompt: str | bytes, max_tokens: int, stream: bool,
                    exclude_input_in_output: bool = True, **optional: Any) -> list:
    """Input tensors (batch of one) for ``tritonclient.grpc`` or ``tritonclient.http`` (``module``)."""
    text = prompt if isinstance(prompt, bytes) else prompt.encode()
    arrays: dict[str, np.ndarray] = {
        "text_input": np.array([[text]], dtype=np.object_),
        "max_tokens": np.array([[max_tokens]], dtype=np.int32),
        "stream": np.array([[stream]], dtype=bool),
        "exclude_input_in_output": np.array([[exclude_input_in_output]], dtype=bool),
    }
    dtypes = {"temperature": np.float32, "top_p": np.float32, "top_k": np.int32, "random_seed": np.uint64,
              "end_id": np.int32, "pad_id": np.int32}
    for name, value in optional.items():
        if name == "stop_words":
            arrays[name] = np.array([[w.encode() for w in value]], dtype=np.object_)
        else:
            arrays[name] = np.array([[value]], dtype=dtypes[name])
    return [_tensor(module, name, arr) for name, arr in arrays.items()]


def _tensor(module: Any, name: str, arr: np.ndarray):
    from tritonclient.utils import np_to_triton_dtype

    t = module.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


@dataclass
class GenerateResult:
    """One request's answer as a client saw it, with wall-clock times (``time.perf_counter``)."""

    request_id: str
    sent_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    response_times_s: list[float] = field(default_factory=list)
    """When each response with tokens arrived."""
    token_counts: list[int] = field(default_factory=list)
    """Tokens in each of those responses."""
    finished_s: float | None = None
    error: str | None = None

    @property
    def first_token_s(self) -> float | None:
        return self.response_times_s[0] if self.response_times_s else None


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt: str | bytes
    max_tokens: int
    stream: bool = True
    optional: dict = field(default_factory=dict)
    send_at_s: float = 0.0
    """Seconds after the start of ``stream_generate`` to send this request (trace replay)."""


async def stream_generate(target: str, model: str, requests: list[GenerateRequest],
                          timeout_s: float = 600.0) -> dict[str, GenerateResult]:
    """Send ``requests`` over one gRPC stream at their ``send_at_s``; collect every response."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aio

    results = {r.request_id: GenerateResult(r.request_id) for r in requests}
    pending = set(results)
    start = time.perf_counter()

    async def feed() -> AsyncIterator[dict]:
        for r in sorted(requests, key=lambda q: q.send_at_s):
            delay = start + r.send_at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the trace's arrival time, not a stand-in for work
            results[r.request_id].sent_s = time.perf_counter()
            yield {"model_name": model, "request_id": r.request_id, "enable_empty_final_response": True,
                   "inputs": generate_inputs(grpcclient, r.prompt, r.max_tokens, r.stream, **r.optional),
                   "outputs": [grpcclient.InferRequestedOutput("text_output"),
                               grpcclient.InferRequestedOutput("output_ids")]}
        while pending:  # keep the request stream open until every answer is in
            await asyncio.sleep(0.05)

    async with aio.InferenceServerClient(target) as client:
        async def consume() -> None:
            async for result, error in client.stream_infer(feed()):
                now = time.perf_counter()
                if error is not None:
                    _record_error(results, pending, error, now)
                    continue
                _record_response(results[result.get_response().id], result, now, pending)
                if not pending:
                    return
        await asyncio.wait_for(consume(), timeout_s)
    return results


def _record_response(res: GenerateResult, result: Any, now: float, pending: set[str]) -> None:
    ids = result.as_numpy("output_ids")
    text = result.as_numpy("text_output")
    if ids is not None and ids.size:
        res.token_ids += [int(t) for t in ids.reshape(-1)]
        res.response_times_s.append(now)
        res.token_counts.append(int(ids.size))
    if text is not None and text.size:
        res.text += b"".join(text.reshape(-1)).decode("utf-8", errors="replace")
    params = result.get_response().parameters
    if "triton_final_response" in params and params["triton_final_response"].bool_param:
        res.finished_s = now
        pending.discard(res.request_id)


def _record_error(results: dict[str, GenerateResult], pending: set[str], error: Any, now: float) -> None:
    """An error on the stream names no request; tests send one failing request at a time."""
    message = error.message() if hasattr(error, "message") else str(error)
    for rid in list(pending):
        res = results[rid]
        if res.finished_s is None and not res.response_times_s:
            res.error, res.finished_s = message, now
            pending.discard(rid)
            return


async def sse_generate(url: str, model: str, body: dict) -> tuple[int, list[dict]]:
    """POST ``/v2/models/MODEL/generate_stream``; the status and the parsed events."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v2/models/{model}/generate_stream", json=body) as resp:
            raw = await resp.read()
    if resp.status != 200:
        return resp.status, [json.loads(raw)]
    events = [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]
    return resp.status, events
