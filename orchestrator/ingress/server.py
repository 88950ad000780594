"""The HTTP ingress: OpenAI-compatible routes, admin routes, and the thread that serves them
(with the Triton relay's socket, ``relay.py``, when asked for).

``build_app`` makes the aiohttp application for a backend; ``IngressServer`` runs it in a
daemon thread with its own event loop, so the controller's own loop (MPI polling) is never
blocked by HTTP work. Every answer to a bad request is a JSON error body, and a bad
request never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from orchestrator.ingress.admin import add_admin_routes
from orchestrator.ingress.answer import Answer, admit
from orchestrator.ingress.http_util import BACKEND_KEY, read_json
from orchestrator.contracts import BackendUnavailable, IngressBackend
from orchestrator.ingress.metrics import CONTENT_TYPE, IngressStats, render_metrics
from orchestrator.ingress.relay import RelayServer
from orchestrator.ingress.request_log import RequestLog
from orchestrator.contracts import TokenEvent
from orchestrator.ingress.errors import ApiError, error_body, error_type
from orchestrator.ingress.openai_protocol import Kind
from orchestrator.ingress.openai_responses import (ChoiceResult, cached_tokens, full_response, stream_chunk,
                                                  usage_chunk)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
"""Larger request bodies are answered 413."""

STATS_KEY = web.AppKey("stats", IngressStats)


def build_app(backend: IngressBackend, stats: IngressStats | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, admin_token: str | None = None) -> web.Application:
    """The aiohttp application serving ``backend``; ``stats`` is created when not given.

    Run it with ``handler_cancellation=True`` (as ``IngressServer`` does): a client that
    disconnects while its request waits for tokens is only noticed that way, and then
    its request is aborted in the cluster. Otherwise only the next streamed write notices.
    """
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_error_middleware])
    app[BACKEND_KEY] = backend
    app[STATS_KEY] = stats if stats is not None else IngressStats()
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    add_admin_routes(app, admin_token)
    return app


def _error_response(request: web.Request, status: int, message: str,
                    headers: dict[str, str] | None = None) -> web.Response:
    request.app[STATS_KEY].on_error(error_type(status))
    return web.json_response(error_body(status, message), status=status, headers=headers)


@web.middleware
async def _error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(request, exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error_response(request, exc.status, exc.text or exc.reason, headers)
    except Exception:  # noqa: BLE001 - a bug in one request must not take the server down
        logger.exception("internal error answering %s %s", request.method, request.path)
        return _error_response(request, 500, "internal server error")


# ----------------------------------------------------------------------------- generation

async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion", f"cmpl-{uuid.uuid4().hex}")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat", f"chatcmpl-{uuid.uuid4().hex}")


async def _generate(request: web.Request, kind: Kind, request_id: str) -> web.StreamResponse:
    arrival = time.monotonic()  # before reading the body: TTFT counts from arrival
    body = await read_json(request)
    answers = admit(request.app[BACKEND_KEY], request.app[STATS_KEY], kind, body, request_id, arrival)
    try:
        if answers[0].parsed.stream:
            return await _HttpAnswer(request, answers).stream()
        return await _HttpAnswer(request, answers).collect()
    finally:
        for answer in answers:
            answer.end()


class _HttpAnswer:
    """Answers one HTTP request from its generations' ``Answer``s: Server-Sent Events or one
    JSON body."""

    def __init__(self, request: web.Request, answers: list[Answer]) -> None:
        self.request = request
        self.answers = answers
        self.parsed = answers[0].parsed

    async def collect(self) -> web.Response:
        """Wait for every generation's whole answer; a cluster error becomes a 500."""
        tasks = [asyncio.ensure_future(self._collect(a)) for a in self.answers]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # the others, when one failed or the client went away
        return web.json_response(full_response(self.parsed, list(results)))

    @staticmethod
    async def _collect(answer: Answer) -> ChoiceResult:
        result = ChoiceResult(answer.generation)
        parts: list[str] = []
        while True:
            event = await answer.next_event()
            if event.error is not None:
                raise ApiError(500, f"the request failed in the cluster: {event.error}")
            result.token_ids.extend(event.token_ids)
            result.token_logprobs.extend(lp.logprob for lp in event.logprobs or ())
            text, finish_reason = answer.text_of(event)
            parts.append(text)
            lps = answer.logprobs_of(event)
            if lps is not None:
                result.logprob_parts.append(lps)
            if finish_reason is not None:
                break
        result.text, result.finish_reason, result.last = "".join(parts), finish_reason, event
        result.cached_tokens = answer.timing.cached_tokens
        return result

    async def stream(self) -> web.StreamResponse:
        """Send Server-Sent Events: one chunk per event of any choice, each choice's finish
        chunk, then ``[DONE]``."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        events: asyncio.Queue[tuple[Answer, TokenEvent | BaseException]] = asyncio.Queue()
        pumps = [asyncio.get_running_loop().create_task(_pump(a, events)) for a in self.answers]
        try:
            await resp.prepare(self.request)
            if self.parsed.kind == "chat":
                for a in self.answers:
                    await self.send(resp, stream_chunk(self.parsed, "", [], role=True, index=a.generation))
            done: set[int] = set()
            while len(done) < len(self.answers):
                answer, event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                if answer.generation not in done and await self._stream_event(resp, answer, event):
                    done.add(answer.generation)  # later events (a stop string's abort) are not sent
            if self.parsed.include_usage:
                tokens = sum(len(a.decoder.token_ids) for a in self.answers)
                cached = cached_tokens(self.parsed, [a.timing.cached_tokens for a in self.answers])
                await self.send(resp, usage_chunk(self.parsed, tokens, cached))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except _StreamError:
            pass  # the error chunk is sent: the stream ends without [DONE], as vLLM's does
        except ConnectionResetError:
            logger.debug("client of %s went away mid-stream", self.parsed.request_id)
        except Exception:  # noqa: BLE001 - headers are sent: end the stream, not the server
            logger.exception("internal error streaming %s", self.parsed.request_id)
            self.answers[0].stats.on_error(error_type(500))
            with contextlib.suppress(Exception):  # best effort: the client may be gone too
                await self.send(resp, error_body(500, "internal server error"))
        finally:
            for pump in pumps:
                pump.cancel()
        return resp

    async def _stream_event(self, resp: web.StreamResponse, answer: Answer, event: TokenEvent) -> bool:
        """Send one event's chunk; True once its choice is over."""
        if event.error is not None:
            answer.stats.on_error(error_type(500))
            await self.send(resp, error_body(500, f"the request failed in the cluster: {event.error}"))
            raise _StreamError
        text, finish_reason = answer.text_of(event)
        lps = answer.logprobs_of(event)
        if text or event.token_ids or finish_reason is not None:
            await self.send(resp, stream_chunk(self.parsed, text, event.token_ids, finish_reason=finish_reason,
                                               last=event if finish_reason is not None else None,
                                               index=answer.generation, logprobs=lps))
        return finish_reason is not None

    @staticmethod
    async def send(resp: web.StreamResponse, body: dict[str, Any]) -> None:
        await resp.write(f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode())


class _StreamError(Exception):
    """A choice failed in the cluster; its error chunk is sent."""


async def _pump(answer: Answer, out: asyncio.Queue) -> None:
    """Forward one choice's events (until its last) into the stream's merged queue."""
    try:
        while True:
            event = await answer.next_event()
            await out.put((answer, event))
            if event.finished or event.error is not None:
                return
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - handed to the stream, which ends with an error chunk
        await out.put((answer, exc))


# ----------------------------------------------------------------------------- other routes

async def _models(request: web.Request) -> web.Response:
    backend = request.app[BACKEND_KEY]
    return web.json_response({"object": "list", "data": [{
        "id": backend.model_name, "object": "model", "created": int(time.time()),
        "owned_by": "kunserve", "max_model_len": backend.max_model_len}]})


async def _health(request: web.Request) -> web.Response:
    try:
        healthy = request.app[BACKEND_KEY].healthy()
    except Exception:  # noqa: BLE001 - a failing probe means unhealthy, not a 500
        logger.exception("health check failed")
        healthy = False
    if healthy:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unavailable"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    backend = request.app[BACKEND_KEY]
    try:
        state = backend.state()
    except BackendUnavailable as exc:  # starting, or a supervised job restarting: said by /health
        logger.debug("no cluster state for /metrics: %s", exc)
        state = None
    except Exception as exc:  # noqa: BLE001 - the ingress's own metrics are still worth a scrape
        logger.warning("no cluster state for /metrics: %s", exc)
        state = None
    text = render_metrics(request.app[STATS_KEY], state, backend.model_name)  # vLLM's names need it
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


# ----------------------------------------------------------------------------- the thread

class IngressServer:
    """Serves ``build_app(backend)`` on ``host:port`` from a daemon thread with its own loop."""

    def __init__(self, backend: IngressBackend, host: str = "127.0.0.1", port: int = 8000,
                 shutdown_timeout: float = 5.0,
                 admin_token: str | None = None, relay_socket: Path | None = None,
                 request_log: Path | None = None) -> None:
        self.admin_token = admin_token
        self.relay_socket = relay_socket
        """Where the Triton relay listens (``relay.py``); None: no relay."""
        self.backend = backend
        self.host = host
        self.stats = IngressStats()
        if request_log is not None:
            try:
                self.stats.request_log = RequestLog(request_log)
            except OSError as exc:
                raise OSError(f"--request-log {request_log}: cannot open it for appending ({exc.strerror})") from None
        self._requested_port = port
        self._port: int | None = None
        self._shutdown_timeout = shutdown_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def port(self) -> int:
        """The bound port (the one the OS picked when 0 was asked for)."""
        if self._port is None:
            raise RuntimeError("the ingress server is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; return once the socket listens, raise ``OSError`` if it cannot bind."""
        if self._thread is not None:
            raise RuntimeError("the ingress server was already started")
        self._thread = threading.Thread(target=self._run, name="ingress", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the ingress server did not start within {timeout} s")
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        logger.info("ingress listening on %s", self.url)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: close the socket, end open requests (aborting them), join the thread."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None or not thread.is_alive():
            return
        if loop is not None and stop_event is not None:
            loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("the ingress thread did not stop within %s s", timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() rather than lost
            if not self._ready.is_set():
                self._start_error = exc
            else:
                logger.exception("the ingress loop failed")
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        # handler_cancellation: a client that disconnects cancels its handler, whose
        # cleanup aborts the request, so the cluster stops spending KV on it.
        runner = web.AppRunner(build_app(self.backend, self.stats, admin_token=self.admin_token),
                               handler_cancellation=True,
                               shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        relay: RelayServer | None = None
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
            self._port = runner.addresses[0][1]
            if self.relay_socket is not None:
                relay = RelayServer(self.backend, self.stats, self.relay_socket)
                await relay.start()
            self._ready.set()
            await self._stop_event.wait()
        finally:
            if relay is not None:
                await relay.close()
            await runner.cleanup()
            if self.stats.request_log is not None:
                self.stats.request_log.close()  # after the cleanup, which ends (and logs) open requests
