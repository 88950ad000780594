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
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from perf.cluster_client import ServingCluster, SupervisedCluster, free_port, supervised


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
        self.expected_log += [re.compile(r"kunserve_readiness.*initialize|KunServe cluster is not serving yet")]
        """Triton logs the readiness gate's load that fails at start, by design (frontend.py)."""
        self.readiness_seen: list[tuple[bool, bool]] = []
        """While starting: (server ready, every served model ready) at each poll."""

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
            server = self.server_ready()  # first: a model ready after it is no violation
            models = all(self.model_ready(name) for name in self.model_names)
            self.readiness_seen.append((server, models))
            if models and server:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)  # polling the server's health endpoints while it starts
        self.stop()
        raise RuntimeError(f"Triton's models not ready within {timeout} s:\n{self.output()}")

    def model_ready(self, name: str = "kunserve") -> bool:
        return self._ok(f"/v2/models/{name}/ready")

    def server_ready(self) -> bool:
        """Triton's ``/v2/health/ready`` (what a load balancer or a readiness probe asks)."""
        return self._ok("/v2/health/ready")

    def _ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.triton_url + path, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def triton_metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.triton_metrics}/metrics", timeout=5) as r:
            return r.read().decode()


class SupervisedTritonCluster(TritonCluster):
    """``supervise --ranks N -- ... --triton``: Triton and the ingress in the supervisor."""

    def __init__(self, n: int, store: Path, *args: str, supervise_args: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(n, store, *args, **kw)
        self.cmd = supervised(self.cmd, n, supervise_args)

    wait_health = SupervisedCluster.wait_health


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
    response_times_s: list[float] = field(default_factory=list)
    """When each response with tokens arrived."""
    token_counts: list[int] = field(default_factory=list)
    """Tokens in each of those responses."""
    finished_s: float | None = None
    error: str | None = None
    preemptions: int | None = None
    """From the final response's ``num_preemptions`` output (None if the model has none)."""
    migrations: int | None = None

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
    """Seconds after ``start`` to send this request (trace replay)."""


async def stream_generate(target: str, model: str, requests: list[GenerateRequest], timeout_s: float = 600.0,
                          start: float | None = None) -> dict[str, GenerateResult]:
    """Send ``requests`` over one gRPC stream at ``start + send_at_s`` (perf_counter; default
    now) and collect every response. Nothing raises: an error response is tied to its
    request, and requests unanswered after ``timeout_s`` or when the stream breaks get an
    error of their own."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aio

    start = time.perf_counter() if start is None else start
    results = {r.request_id: GenerateResult(r.request_id) for r in requests}
    pending = set(results)

    async def feed() -> AsyncIterator[dict]:
        for r in sorted(requests, key=lambda q: q.send_at_s):
            delay = start + r.send_at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the trace's arrival time, not a stand-in for work
            results[r.request_id].sent_s = time.perf_counter()
            # No "outputs": the response carries every output, the optional counters too.
            yield {"model_name": model, "request_id": r.request_id, "enable_empty_final_response": True,
                   "inputs": generate_inputs(grpcclient, r.prompt, r.max_tokens, r.stream, **r.optional)}
        while pending:  # the stream stays open until every answer is in
            await asyncio.sleep(0.05)

    why = "the stream ended before its final response"
    async with aio.InferenceServerClient(target) as client:
        call = client.stream_infer(feed())
        try:
            await asyncio.wait_for(_consume(call, results, pending), timeout_s)
        except asyncio.TimeoutError:
            why = f"no final response within {timeout_s:.0f} s"
        except Exception as exc:  # the cluster went away mid-run: keep what arrived
            why = f"the stream broke: {exc}"
        finally:
            call.cancel()
    for rid in pending:
        results[rid].error = results[rid].error or why
    return results


async def _responses(call: Any) -> AsyncIterator[tuple[str | None, Any, str | None]]:
    """(request id, InferResult or None, error message or None) for each streamed response.

    tritonclient's iterator drops the request id of an error response; the gRPC call it
    wraps keeps it, so that is read when present (else the public iterator, id from results).
    """
    from tritonclient.grpc import InferResult

    raw = getattr(call, "_grpc_call", None)
    if raw is None:
        async for result, error in call:
            yield (result.get_response().id if result is not None else None), result, \
                (None if error is None else str(error))
        return
    async for response in raw:
        rid = response.infer_response.id or None
        if response.error_message:
            yield rid, None, response.error_message
        else:
            yield rid, InferResult(response.infer_response), None


async def _consume(call: Any, results: dict[str, GenerateResult], pending: set[str]) -> None:
    async for rid, result, error in _responses(call):
        now = time.perf_counter()
        res = _errored(results, pending, rid) if error is not None else results.get(rid or "")
        if res is None or res.request_id not in pending:
            continue
        if error is not None:
            res.error, res.finished_s = error, now
            pending.discard(res.request_id)
        else:
            _take_response(res, result, now, pending)
        if not pending:
            return


def _errored(results: dict[str, GenerateResult], pending: set[str], rid: str | None) -> GenerateResult | None:
    """The request an error is for: its id, else the latest sent one still without tokens."""
    if rid is not None:
        return results.get(rid)
    waiting = [results[r] for r in pending if results[r].sent_s and not results[r].response_times_s]
    return max(waiting, key=lambda r: r.sent_s, default=None)


def _take_response(res: GenerateResult, result: Any, now: float, pending: set[str]) -> None:
    ids = result.as_numpy("output_ids")
    if ids is not None and ids.size:
        res.token_ids += [int(t) for t in ids.reshape(-1)]
        res.response_times_s.append(now)
        res.token_counts.append(int(ids.size))
    params = result.get_response().parameters
    if "triton_final_response" in params and params["triton_final_response"].bool_param:
        res.finished_s = now
        res.preemptions = _counter(result, "num_preemptions")
        res.migrations = _counter(result, "num_migrations")
        pending.discard(res.request_id)


def _counter(result: Any, name: str) -> int | None:
    """An integer output ``name`` of a response; None when the model does not send it."""
    try:
        arr = result.as_numpy(name)
    except Exception:  # tritonclient raises on outputs the model does not declare in some versions
        return None
    return int(arr.reshape(-1)[0]) if arr is not None and arr.size else None


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
