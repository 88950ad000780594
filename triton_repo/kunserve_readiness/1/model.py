"""Triton Python backend model ``kunserve_readiness``: loads only while the cluster is healthy.

The launcher (``orchestrator/triton/frontend.py``) asks Triton to load it at start, when
the cluster is not yet serving, so the load fails at once and Triton's server readiness
is false from its first answer; it loads it again once every served model is loaded and
the cluster reports healthy, and unloads it when the cluster stops being healthy. The
load checks the ingress's ``/health`` once and does not wait: waiting is the launcher's.
"""

from __future__ import annotations

import os
import urllib.request

import triton_python_backend_utils as pb_utils

from orchestrator.triton.model_env import INGRESS_URL_ENV


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        url = os.environ.get(INGRESS_URL_ENV, "http://127.0.0.1:8000").rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                status = f"HTTP {resp.status}"
        except Exception as exc:  # noqa: BLE001 - refused, 503 while starting or recovering, ...
            status = str(exc)
        raise pb_utils.TritonModelException(
            f"the KunServe cluster is not serving yet ({url}: {status}); the launcher loads this "
            "model, which makes Triton ready, once it is (a failure at start-up is expected)")

    def execute(self, requests: list) -> list:
        error = pb_utils.TritonError("kunserve_readiness only reports readiness; send requests to kunserve")
        return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
