"""Triton in front of the cluster: start it with the cluster, follow the cluster's health.

The server starts with no served model loaded and its readiness gate (``READINESS_MODEL``)
failed, so ``/v2/health/ready`` says not ready from its first answer. A watcher thread
loads the served names once the cluster reports healthy (every rank up), then the gate:
server readiness (``--strict-readiness``) implies that every served model is ready. When
the cluster stops being healthy (a rank died, a supervised job is restarting) only the
gate is unloaded: the server says not ready, while the served models stay loaded and
their requests reach the ingress, which queues them (supervised) or answers 503. ``stop``
shuts the server down with its owner.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from orchestrator.triton.server import READINESS_MODEL, TritonConfig, TritonError, TritonProcess

logger = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the watcher compares the cluster's health with the models' state."""

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
        """The served models are loaded (once; they stay loaded)."""
        self.ready = False
        """The readiness gate is loaded: Triton says ready."""

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
        self._thread = threading.Thread(target=self._watch, name="triton-readiness", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            code = self.process.returncode()
            if code is not None:
                logger.error("tritonserver exited with status %d; the ingress still serves on its own port", code)
                return
            healthy = self._cluster_healthy()
            try:
                if healthy and not self.ready:
                    self._become_ready()
                elif not healthy and self.ready:
                    self._become_unready()
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

    def _become_ready(self) -> None:
        if not self.loaded:
            for name in self.cfg.served():
                self.process.load(name)
            self.loaded = True
        self.process.load(READINESS_MODEL)
        self.ready = True
        c = self.cfg
        logger.info("Triton ready, serving %s: HTTP %s:%d, gRPC %s:%d, metrics %s:%d", ", ".join(c.served()),
                    c.host, c.http_port, c.host, c.grpc_port, c.host, c.metrics_port)

    def _become_unready(self) -> None:
        logger.warning("the cluster is not healthy: Triton says not ready until it is (%s stay loaded)",
                       ", ".join(self.cfg.served()))
        self.ready = False
        self.process.unload(READINESS_MODEL)

    def stop(self) -> None:
        """Stop watching and shut the server down (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.process.stop()
