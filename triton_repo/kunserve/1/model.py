"""Triton Python backend model ``kunserve``: a thin relay to the orchestrator's ingress.

Each request's tensors are validated (``orchestrator.triton.protocol``) and sent to the
ingress as a streamed completion; the relays run on an asyncio loop in a thread of the
stub. A client that cancels or goes away is noticed through ``is_cancelled()`` and the
ingress connection is closed, which aborts the request in the cluster and frees its KV.

The same file serves two configurations: decoupled (``kunserve``: one response per chunk
with ``stream`` true, a single response otherwise; gRPC streaming and ``/generate_stream``)
and unary (``kunserve_unary``: one response per request, for HTTP ``/infer`` and
``/generate`` and gRPC ``ModelInfer``, which refuse decoupled models).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import urllib.request
from typing import Callable

import aiohttp
import triton_python_backend_utils as pb_utils

from orchestrator.triton.metrics_bridge import MetricsMirror, parse_prometheus
from orchestrator.triton.protocol import (
    INPUTS,
    Chunk,
    IngressStreamError,
    InputError,
    StreamAssembler,
    TritonGenerateRequest,
    ingress_error_message,
    output_arrays,
    parse_inputs,
)
from orchestrator.triton.server import INGRESS_URL_ENV, METRICS_MODEL_ENV

logger = logging.getLogger("kunserve.triton")

CANCEL_POLL_S = 0.02
"""How often a relay checks whether its client cancelled (bounded by the next token too)."""

METRICS_PERIOD_S = 1.0

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _error_response(message: str, code_name: str = "INVALID_ARG") -> "pb_utils.InferenceResponse":
    code = getattr(pb_utils.TritonError, code_name, None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    """Relays requests to the cluster's ingress (``KUNSERVE_INGRESS_URL`` or ``ingress_url``)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.url = (os.environ.get(INGRESS_URL_ENV) or params.get("ingress_url") or "http://127.0.0.1:8000").rstrip("/")
        self.name = args["model_name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        _wait_for_ingress(self.url, float(params.get("ingress_wait_s") or 120))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kunserve-relay", daemon=True)
        self.thread.start()
        self.session = asyncio.run_coroutine_threadsafe(self._open_session(), self.loop).result()
        self._stopping = threading.Event()
        if self.name == os.environ.get(METRICS_MODEL_ENV, "kunserve"):
            # Its own thread: metric updates are blocking IPC calls and must not hold up relays.
            threading.Thread(target=self._mirror_metrics, name="kunserve-metrics", daemon=True).start()
        logger.info("model %s relays to %s", self.name, self.url)

    async def _open_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None))

    def execute(self, requests: list) -> list | None:
        if self.decoupled:
            for request in requests:
                self._start_stream(request)
            return None
        # Unary: Triton waits for this call's responses; the relays still run concurrently.
        pending = [self._start_unary(request) for request in requests]
        return [p if isinstance(p, pb_utils.InferenceResponse) else p.result() for p in pending]

    def _start_stream(self, request) -> None:
        """Decoupled: one response per chunk through the request's response sender."""
        sender = request.get_response_sender()
        try:
            req = parse_inputs({name: _input(request, name) for name in INPUTS})
        except InputError as exc:
            sender.send(_error_response(str(exc)), flags=FINAL)
            return

        finished = False

        def emit(chunk: Chunk) -> None:
            nonlocal finished
            outputs = [pb_utils.Tensor(n, a) for n, a in output_arrays(chunk).items()]
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if chunk.final else 0)
            finished = finished or chunk.final

        def cancelled() -> bool:
            # Never ask once the final response is sent: Triton 2.51 frees the response
            # factory then, and is_cancelled() on it crashes the server.
            return not finished and sender.is_cancelled()

        async def serve() -> None:
            error = await self._serve(req, emit, cancelled)
            if error is not None and not finished:
                _send_quietly(sender, error)

        asyncio.run_coroutine_threadsafe(serve(), self.loop)

    def _start_unary(self, request):
        """Non-decoupled: a future of the request's single response (or the error at once)."""
        try:
            req = parse_inputs({name: _input(request, name) for name in INPUTS})
        except InputError as exc:
            return _error_response(str(exc))
        if req.stream:
            return _error_response(f"stream=true needs a decoupled model (this one, {self.name!r}, answers "
                                   "once); use the kunserve model through gRPC streaming or /generate_stream")
        final: list[Chunk] = []

        async def serve():
            error = await self._serve(req, final.append, request.is_cancelled)
            if error is not None:
                return error
            outputs = [pb_utils.Tensor(n, a) for n, a in output_arrays(final[-1]).items()]
            return pb_utils.InferenceResponse(output_tensors=outputs)

        return asyncio.run_coroutine_threadsafe(serve(), self.loop)

    async def _serve(self, req: TritonGenerateRequest, emit: Callable[[Chunk], None],
                     cancelled: Callable[[], bool]):
        """Relay one request, cancelling it when the client does; an error response or None."""
        relay = asyncio.ensure_future(self._relay(req, emit))
        while not relay.done():
            await asyncio.wait({relay}, timeout=CANCEL_POLL_S)
            if not relay.done() and cancelled():
                relay.cancel()  # closes the ingress connection: the cluster aborts the request
                return _error_response("the request was cancelled", "CANCELLED")
        try:
            relay.result()
            return None
        except asyncio.CancelledError:
            return _error_response("the request was cancelled", "CANCELLED")
        except (IngressStreamError, InputError) as exc:
            return _error_response(str(exc))
        except aiohttp.ClientError as exc:
            return _error_response(f"the cluster's ingress at {self.url} is unreachable: {exc}", "UNAVAILABLE")
        except Exception as exc:  # noqa: BLE001 - one request's failure must not kill the model
            logger.exception("relaying a request failed")
            return _error_response(f"internal error: {exc}", "INTERNAL")

    async def _relay(self, req: TritonGenerateRequest, emit: Callable[[Chunk], None]) -> None:
        async with self.session.post(self.url + "/v1/completions", json=req.completion_body()) as resp:
            if resp.status != 200:
                raise IngressStreamError(ingress_error_message(resp.status, await resp.read()))
            assembler = StreamAssembler(req)
            sent_final = False
            async for data in resp.content.iter_any():
                for chunk in assembler.feed(data):
                    emit(chunk)
                    sent_final = sent_final or chunk.final
                if assembler.done:
                    break
            if not sent_final:
                raise IngressStreamError("the cluster ended the stream without finishing the request")

    def _mirror_metrics(self) -> None:
        """Copy the ingress's /metrics into Triton's custom metrics, once a second."""
        mirror = MetricsMirror(_make_family)
        while not self._stopping.wait(METRICS_PERIOD_S):
            try:
                with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
                    mirror.update(parse_prometheus(resp.read().decode()))
            except Exception as exc:  # noqa: BLE001 - metrics must never take the model down
                logger.warning("mirroring the cluster's metrics failed: %s", exc)

    def finalize(self) -> None:
        self._stopping.set()
        asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _send_quietly(sender, response) -> None:
    """Send a final error; the client may already be gone, which is not an error here."""
    try:
        sender.send(response, flags=FINAL)
    except Exception as exc:  # noqa: BLE001
        logger.debug("could not send the final response: %s", exc)


def _make_family(name: str, description: str, kind: str):
    kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE}
    return pb_utils.MetricFamily(name=name, description=description, kind=kinds[kind])


def _wait_for_ingress(url: str, timeout_s: float) -> None:
    """Fail the model's load unless the cluster reports healthy within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 - refused, 503 while starting, ...
            last = str(exc)
        time.sleep(0.2)  # polling another process's health endpoint
    raise pb_utils.TritonModelException(f"the cluster at {url} was not healthy within {timeout_s:.0f} s ({last})")
