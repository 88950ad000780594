"""The Triton Inference Server front end.

``server.py`` finds a ``tritonserver`` (the one in PATH, else the one bundled in the
``nvidia-pytriton`` wheel), prepares its backend directory and model repository and runs
it as a child of the controller rank; ``frontend.py`` ties its model's readiness to the
cluster's health; ``protocol.py`` maps TensorRT-LLM's tensor names onto the ingress's
completion requests for the thin ``triton_repo/kunserve/1/model.py``, which sends them
over the ingress's relay socket with ``relay_client.py``; ``metrics_bridge.py`` mirrors
the ingress's Prometheus metrics into Triton's ``/metrics``.
"""
