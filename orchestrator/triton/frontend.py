"""Triton in front of the cluster: start it with the cluster, follow the cluster's health.

The server starts with no model loaded. A supervisor thread loads the served names once
the cluster reports healthy (every rank up) and unloads them when it stops being healthy,
so Triton's model readiness (``/v2/models/kunserve/ready``, and server readiness under
``--strict-readiness``) is the cluster's. ``stop`` shuts the server down with the job.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from orchestrator.triton.server import TritonConfig, TritonError, TritonProcess

logger = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the supervisor compares the cluster's health with the models' state."""

LOAD_RETRY_S = 5.0


class TritonFrontend:
    """Owns the ``tritonserver`` child of the controller rank."""

    def __init__(self, cfg: TritonConfig, ingress_url: str, relay_socket: Path,
                 healthy: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.process = TritonProcess(cfg, ingress_url, relay_socket)
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loaded = False

    def start(self) -> None:
        """Start the server and wait until it is live; raise ``TritonError`` if it cannot be.

        Called from the rank's main thread: the child's parent-death signal is tied to the
        thread that spawned it, and the main thread lives as long as the rank.
        """
        self.process.start()
        try:
            self.process.wait_live()
        except TritonError:
            self.process.stop()
            raise
        self._thread = threading.Thread(target=self._supervise, name="triton-supervisor", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.is_set():
            code = self.process.returncode()
            if code is not None:
                logger.error("tritonserver exited with status %d; the ingress still serves on its own port", code)
                return
            healthy = self._cluster_healthy()
            try:
                if healthy and not self.loaded:
                    self._load_all()
                elif not healthy and self.loaded:
                    self._unload_all()
            except TritonError as exc:
                logger.error("%s; retrying in %.0f s", exc, LOAD_RETRY_S)
                self._stop.wait(LOAD_RETRY_S)
                continue
            self._stop.wait(POLL_S)

    def _cluster_healthy(self) -> bool:
        try:
            return bool(self._healthy())
        except Exception:  # noqa: BLE001 - a failing probe means unhealthy
            logger.exception("cluster health check failed")
            return False

    def _load_all(self) -> None:
        for name in self.cfg.served():
            self.process.load(name)
        self.loaded = True
        c = self.cfg
        logger.info("Triton serves %s: HTTP %s:%d, gRPC %s:%d, metrics %s:%d", ", ".join(c.served()),
                    c.host, c.http_port, c.host, c.grpc_port, c.host, c.metrics_port)

    def _unload_all(self) -> None:
        logger.warning("the cluster is not healthy: unloading %s from Triton", ", ".join(self.cfg.served()))
        self.loaded = False
        for name in self.cfg.served():
            self.process.unload(name)

    def stop(self) -> None:
        """Stop supervising and shut the server down (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.process.stop()
