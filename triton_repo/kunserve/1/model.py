"""Triton Python backend model ``kunserve``: a thin relay to the orchestrator's ingress.

Each request's tensors are validated (``orchestrator.triton.protocol``) and sent, from
``execute`` itself, to the ingress's relay socket (``orchestrator/ingress/relay.py``); a
reader thread turns the answer frames into responses. A client that cancels or goes away
is noticed through ``is_cancelled()`` and the request is cancelled on the relay, which
aborts it in the cluster and frees its KV.

The same file serves two configurations: decoupled (``kunserve``: one response per chunk
with ``stream`` true, a single response otherwise; gRPC streaming and ``/generate_stream``)
and unary (``kunserve_unary``: one response per request, for HTTP ``/infer`` and
``/generate`` and gRPC ``ModelInfer``, which refuse decoupled models).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from concurrent.futures import Future
from typing import Any, Callable

import triton_python_backend_utils as pb_utils

from orchestrator.triton.metrics_bridge import MetricsMirror, parse_prometheus
from orchestrator.triton.protocol import (
    INPUTS,
    Chunk,
    FrameAssembler,
    IngressStreamError,
    InputError,
    output_arrays,
    parse_inputs,
    triton_error_code,
)
from orchestrator.triton.relay_client import RelayClient, RelayUnavailable
from orchestrator.triton.model_env import INGRESS_URL_ENV, METRICS_MODEL_ENV, RELAY_SOCKET_ENV

logger = logging.getLogger("kunserve.triton")

CANCEL_POLL_S = 0.02
"""How often open requests are checked for a client that cancelled or went away."""

METRICS_PERIOD_S = 1.0

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _error_response(message: str, code_name: str = "INVALID_ARG") -> "pb_utils.InferenceResponse":
    code = getattr(pb_utils.TritonError, code_name, None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _response(chunk: Chunk) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in output_arrays(chunk).items()])


class _Relayed:
    """One request on the relay: frames in (reader thread), responses out, cancellation
    checks (watcher thread). ``deliver(response, final)`` hands a response to Triton."""

    def __init__(self, req, deliver: Callable[[Any, bool], None], is_cancelled: Callable[[], bool]) -> None:
        self.assembler = FrameAssembler(req)
        self.deliver = deliver
        self.is_cancelled = is_cancelled
        self.rid: int | None = None
        self.finished = False
        self.lock = threading.Lock()
        """Orders the final response against the cancellation check: Triton 2.51 frees a
        request's response factory with its final response, and is_cancelled() on it then
        crashes the server."""

    def on_frame(self, frame: dict) -> None:
        try:
            chunk = self.assembler.feed(frame)
        except IngressStreamError as exc:
            self.finish(_error_response(str(exc), triton_error_code(exc.status)))
            return
        if chunk is not None:
            with self.lock:
                if not self.finished:
                    self.finished = chunk.final
                    self.deliver(_response(chunk), chunk.final)

    def finish(self, response) -> None:
        with self.lock:
            if not self.finished:
                self.finished = True
                self.deliver(response, True)

    def abandon(self) -> None:
        """No more responses: Triton refused one (the client is gone)."""
        with self.lock:
            self.finished = True

    def cancelled(self) -> bool:
        """True (and the request answered CANCELLED) when its client gave up."""
        with self.lock:
            if self.finished or not self.is_cancelled():
                return False
            self.finished = True
        self.deliver(_error_response("the request was cancelled", "CANCELLED"), True)
        return True


class TritonPythonModel:
    """Relays requests to the cluster's ingress (relay socket: ``KUNSERVE_RELAY_SOCKET`` or
    the ``relay_socket`` parameter; ``/health`` and ``/metrics``: ``ingress_url``)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.url = (os.environ.get(INGRESS_URL_ENV) or params.get("ingress_url") or "http://127.0.0.1:8000").rstrip("/")
        relay_path = os.environ.get(RELAY_SOCKET_ENV) or params.get("relay_socket")
        if not relay_path:
            raise pb_utils.TritonModelException(
                "no relay socket: start the cluster with `serve --triton` (which sets it), or with "
                "`serve --relay-socket PATH` and set this model's relay_socket parameter to PATH")
        self.name = args["model_name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        _wait_for_ingress(self.url, float(params.get("ingress_wait_s") or 120))
        self.relay = RelayClient(relay_path)
        self.open: dict[int, _Relayed] = {}
        self.open_lock = threading.Lock()
        self._stopping = threading.Event()
        threading.Thread(target=self._watch_cancellations, name="kunserve-cancel", daemon=True).start()
        if self.name == os.environ.get(METRICS_MODEL_ENV, "kunserve"):
            # Its own thread: metric updates are blocking IPC calls and must not hold up relays.
            threading.Thread(target=self._mirror_metrics, name="kunserve-metrics", daemon=True).start()
        logger.info("model %s relays to %s", self.name, relay_path)

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
            req = parse_inputs(_inputs(request), _parameters(request))
        except InputError as exc:
            sender.send(_error_response(str(exc)), flags=FINAL)
            return

        def deliver(response, final: bool) -> None:
            if final:
                _send_quietly(sender, response)
            else:
                sender.send(response, flags=0)

        self._submit(req, _Relayed(req, deliver, sender.is_cancelled))

    def _start_unary(self, request):
        """Non-decoupled: a future of the request's single response (or the error at once)."""
        try:
            req = parse_inputs(_inputs(request), _parameters(request))
        except InputError as exc:
            return _error_response(str(exc))
        if req.stream:
            return _error_response(f"stream=true needs a decoupled model (this one, {self.name!r}, answers "
                                   "once); use the kunserve model through gRPC streaming or /generate_stream")
        answer: Future = Future()
        self._submit(req, _Relayed(req, lambda response, final: answer.set_result(response), request.is_cancelled))
        return answer

    def _submit(self, req, relayed: _Relayed) -> None:
        def on_frame(frame: dict) -> None:
            try:
                relayed.on_frame(frame)
            except Exception as exc:  # noqa: BLE001 - Triton refused a response: stop the request
                logger.warning("request %s: sending a response failed (%s); cancelling it", relayed.rid, exc)
                relayed.abandon()
                self.relay.cancel(relayed.rid)
            if relayed.finished:
                self._forget(relayed)

        with self.open_lock:
            try:
                relayed.rid = self.relay.submit(req.completion_body(), on_frame)
            except RelayUnavailable as exc:
                relayed.finish(_error_response(str(exc), "UNAVAILABLE"))
                return
            self.open[relayed.rid] = relayed

    def _forget(self, relayed: _Relayed) -> None:
        with self.open_lock:
            self.open.pop(relayed.rid, None)

    def _watch_cancellations(self) -> None:
        """Cancel on the relay every request whose client cancelled or went away."""
        while not self._stopping.wait(CANCEL_POLL_S):
            with self.open_lock:
                relays = list(self.open.values())
            for relayed in relays:
                try:
                    if relayed.cancelled():
                        self.relay.cancel(relayed.rid)
                        self._forget(relayed)
                except Exception:  # noqa: BLE001 - one request's check must not stop the others'
                    logger.exception("checking request %s for cancellation failed", relayed.rid)

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
        self.relay.close()  # the ingress aborts whatever is still open


def _inputs(request) -> dict:
    """The request's tensors by name, as numpy arrays (one pass over what was sent)."""
    return {t.name(): t.as_numpy() for t in request.inputs() if t.name() in INPUTS}


def _parameters(request) -> dict:
    """The request's parameters (a JSON object; Triton's generate endpoint puts unknown fields there)."""
    raw = request.parameters()
    return json.loads(raw) if raw else {}


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
