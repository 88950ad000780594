"""The job's side of the supervisor's channel (``backend_wire.py``): the controller rank
serves its ``IngressBackend`` to a supervisor that runs the front ends outside the job.

It takes the HTTP ingress's place on the controller rank when ``serve`` runs with
``--supervisor-socket`` (``supervise`` sets it): a daemon thread with its own event loop
connects to the supervisor, submits what it is sent, streams the token events back,
answers calls, and beats every ``BEAT_S`` with the cluster's health and how long each
rank has been silent. When the supervisor goes away, ``on_lost`` is told (the job stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from orchestrator.contracts import BackendUnavailable, IngressBackend, QueueFullError
from orchestrator.ingress import backend_wire as bw
from orchestrator.ingress import relay_wire as wire

logger = logging.getLogger(__name__)


class SupervisorLink:
    """Connects ``backend`` (the controller) to the supervisor listening on ``path``."""

    def __init__(self, backend: Any, path: Path, world_size: int,
                 silence: Callable[[], dict[int, float]], on_lost: Callable[[str], None]) -> None:
        self.backend: IngressBackend = backend
        self.path = Path(path)
        self.world_size = world_size
        self._silence = silence
        self._on_lost = on_lost
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._connected = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False

    def start(self, timeout_s: float = 30.0) -> None:
        """Connect; ``OSError`` when the supervisor cannot be reached."""
        self._thread = threading.Thread(target=self._run, name="supervisor-link", daemon=True)
        self._thread.start()
        if not self._connected.wait(timeout_s):
            raise OSError(f"no connection to the supervisor at {self.path} within {timeout_s:.0f} s")
        if self._error is not None:
            raise OSError(f"cannot reach the supervisor at {self.path}: {self._error}")
        logger.info("serving the supervisor at %s", self.path)

    def stop(self) -> None:
        """Close the channel (the supervisor sees the job end); idempotent."""
        self._stopping = True
        loop, writer = self._loop, self._writer
        if loop is not None and writer is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(writer.close)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # The loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or to on_lost
            self._error = exc
        finally:
            self._connected.set()
            loop.close()
        if not self._stopping:
            self._on_lost(f"the supervisor's channel {self.path} closed ({self._error or 'end of file'})")

    async def _serve(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.path), limit=wire.MAX_FRAME_BYTES)
        self._send({"op": "hello", "world_size": self.world_size, "pid": os.getpid()})
        self._connected.set()
        beat = asyncio.get_running_loop().create_task(self._beat())
        try:
            while line := await reader.readline():
                self._on_frame(wire.decode(line))
        except ConnectionError:
            pass
        finally:
            beat.cancel()
            for task in list(self._tasks.values()):
                task.cancel()

    async def _beat(self) -> None:
        while True:
            healthy = self.backend.healthy()
            silence = {str(r): round(s, 3) for r, s in self._silence().items()}
            self._send({"op": "beat", "healthy": healthy, "silence": silence})
            await asyncio.sleep(bw.BEAT_S)  # the beat's period, on the link's own loop

    def _send(self, frame: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(wire.encode(frame))

    def _on_frame(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "submit":
            self._submit(frame["req"])
        elif op == "abort":
            task = self._tasks.pop(str(frame.get("id")), None)
            if task is not None:
                task.cancel()  # its finally aborts it in the cluster
        elif op == "call":
            asyncio.get_running_loop().create_task(self._call(frame))
        else:
            logger.error("supervisor channel: unknown op %r", op)

    def _submit(self, d: dict[str, Any]) -> None:
        req = bw.request_from_wire(d)
        try:
            queue = self.backend.submit(req)
        except (QueueFullError, BackendUnavailable) as exc:
            self._send({"op": "rejected", "id": req.request_id, "error": str(exc)})
            return
        task = asyncio.get_running_loop().create_task(self._stream(req.request_id, queue))
        self._tasks[req.request_id] = task

    async def _stream(self, rid: str, queue: asyncio.Queue) -> None:
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finished or event.error is not None
                self._send({"op": "event", "event": bw.event_to_wire(event)})
        finally:
            if self._tasks.get(rid) is asyncio.current_task():
                del self._tasks[rid]
            if not finished:
                self.backend.abort(rid)

    async def _call(self, frame: dict[str, Any]) -> None:
        method, call = frame.get("method"), frame.get("call")
        if method not in bw.CALLS:
            self._send({"op": "reply", "call": call, "error": f"unknown call {method!r}", "kind": "ValueError"})
            return
        try:
            fn = getattr(self.backend, method)
            result = await asyncio.get_running_loop().run_in_executor(None, fn, *frame.get("args", []))
            self._send({"op": "reply", "call": call, "result": bw.result_to_wire(method, result)})
        except Exception as exc:  # noqa: BLE001 - the supervisor raises it again by kind
            self._send({"op": "reply", "call": call, "error": str(exc), "kind": type(exc).__name__})
