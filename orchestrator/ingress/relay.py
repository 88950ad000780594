"""The ingress's Triton relay: requests from the Triton model over a Unix socket.

The Triton model (``triton_repo/kunserve``) forwards every request here rather than to
``/v1/completions``. The answers are the same: the same validation and errors, stop
strings, statistics and aborts, through ``answer.py``. Only the framing differs, and it
is lighter (``relay_wire.py`` has the format and the reason). It runs on the ingress's
event loop, next to the HTTP site.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.ingress import relay_wire as wire
from orchestrator.ingress.answer import Answer, admit
from orchestrator.contracts import IngressBackend
from orchestrator.ingress.metrics import IngressStats
from orchestrator.ingress.errors import ApiError, error_type

logger = logging.getLogger(__name__)


class RelayServer:
    """Listens on ``path`` for relay connections; ``start`` and ``close`` on the ingress's loop."""

    def __init__(self, backend: IngressBackend, stats: IngressStats, path: Path) -> None:
        self.backend = backend
        self.stats = stats
        self.path = Path(path)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()

    async def start(self) -> None:
        """Bind the socket (a stale one left by a dead ingress is replaced); ``OSError`` if
        another process listens there or the path is not a socket."""
        _clear_stale_socket(self.path)
        self._server = await asyncio.start_unix_server(self._accept, str(self.path), limit=wire.MAX_FRAME_BYTES)
        os.chmod(self.path, 0o600)  # only this user's processes may submit requests
        logger.info("Triton relay listening on %s", self.path)

    async def close(self) -> None:
        """Stop listening and end every connection (their open requests are aborted)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in list(self._connections):
            conn.abort_all()
            conn.writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, writer)
        self._connections.add(conn)
        logger.info("Triton relay: a model instance connected")
        try:
            await conn.serve(reader)
        finally:
            self._connections.discard(conn)
            conn.abort_all()
            writer.close()
            logger.info("Triton relay: a model instance disconnected")


class _Connection:
    """One model instance's connection: its requests by id, each relayed by a task."""

    def __init__(self, server: RelayServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self.tasks: dict[Any, asyncio.Task] = {}

    async def serve(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                logger.error("Triton relay: a frame over %d bytes; closing the connection", wire.MAX_FRAME_BYTES)
                return
            except ConnectionError:
                return
            if not line:
                return
            self._on_line(line, time.monotonic())

    def _on_line(self, line: bytes, arrival: float) -> None:
        try:
            frame = wire.decode(line)
        except ValueError as exc:
            logger.error("Triton relay: not a frame (%s): %.200r", exc, line)
            return
        rid, op = frame.get("id"), frame.get("op")
        if op == "cancel":
            task = self.tasks.get(rid)
            if task is not None:
                task.cancel()
        elif op == "generate":
            self._generate(rid, frame.get("body"), arrival)
        else:
            self.send({"id": rid, "error": f"unknown relay op {op!r}", "status": 400})

    def _generate(self, rid: Any, body: Any, arrival: float) -> None:
        if rid is None or rid in self.tasks:
            self.send({"id": rid, "error": f"relay request id {rid!r} is missing or already in use", "status": 400})
            return
        srv = self.server
        try:
            body = _with_embedding_bias(body, srv.backend)
            answers = admit(srv.backend, srv.stats, "completion", body, f"trt-{uuid.uuid4().hex}", arrival,
                            route="triton")
            if len(answers) > 1:
                for a in answers:
                    a.end()
                raise ApiError(400, "one prompt and one choice per Triton request")
            answer = answers[0]
        except ApiError as exc:
            srv.stats.on_error(error_type(exc.status))
            self.send({"id": rid, "error": exc.message, "status": exc.status})
            return
        task = asyncio.get_running_loop().create_task(self._relay(rid, answer))
        self.tasks[rid] = task

    async def _relay(self, rid: Any, answer: Answer) -> None:
        try:
            while True:
                event = await answer.next_event()
                if event.error is not None:
                    answer.stats.on_error(error_type(500))
                    self.send({"id": rid, "error": f"the request failed in the cluster: {event.error}",
                               "status": 500})
                    return
                text, finish_reason = answer.text_of(event)
                if text or event.token_ids or finish_reason is not None:
                    frame = {"id": rid, "text": text, "token_ids": event.token_ids, "finish_reason": finish_reason}
                    if event.logprobs is not None:
                        frame["logprobs"] = [lp.logprob for lp in event.logprobs]
                    if finish_reason is not None:
                        frame.update(num_preemptions=event.num_preemptions, num_migrations=event.num_migrations)
                    self.send(frame)
                if finish_reason is not None:
                    return
        except asyncio.CancelledError:
            logger.debug("Triton relay: %s cancelled by its client", answer.request_id)
        finally:
            self.tasks.pop(rid, None)
            answer.end()  # aborts the request in the cluster unless it finished

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a frame. The stub reads as fast as Triton takes responses; frames are small."""
        if not self.writer.is_closing():
            self.writer.write(wire.encode(frame))

    def abort_all(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()


def _with_embedding_bias(body: Any, backend: IngressBackend) -> Any:
    """TensorRT-LLM's ``embedding_bias_words``/``_weights`` (the relay's ``embedding_bias``
    field) as ``logit_bias``: each weight is added to every token of its word."""
    if not isinstance(body, dict) or "embedding_bias" not in body:
        return body
    body = dict(body)
    bias: dict[str, float] = {}
    pairs = body.pop("embedding_bias")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                              and isinstance(p[1], (int, float)) for p in pairs):
        raise ApiError(400, "embedding_bias must be a list of [word, weight] pairs")
    for word, weight in pairs:
        for token in backend.tokenizer.encode(word, add_special_tokens=False):
            bias[str(token)] = bias.get(str(token), 0.0) + float(weight)
    body["logit_bias"] = {**body.get("logit_bias", {}), **bias}
    return body


def _clear_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"--relay-socket {path} exists and is not a socket; pick another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by an ingress that died
        return
    finally:
        probe.close()
    raise OSError(f"another process listens on --relay-socket {path}")
