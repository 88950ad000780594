"""The front door's backend: the ``IngressBackend`` the supervisor's ingress and Triton
relay call, served by whichever job is up, and holding requests while none is.

It owns every request from ``submit`` to its last event. A request is *pending* while no
job serves (starting, restarting) and *sent* once a job has it. When the job dies, every
sent request becomes pending again and is sent to the next job: one that had no token
yet from the start, one that had streamed tokens with those tokens as its
``output_token_ids``, so it continues where it stopped and its client sees one stream
(greedy and seeded requests give the same tokens: the sampler's stream depends only on
the seed and the token's position). Each move counts against ``migration_limit``.

Called from the ingress's event loop thread (``submit``, ``abort``, the calls), the
channel's reader thread (``on_*``) and the supervisor's thread (``attach``, ``detach``,
``fail``); one lock guards the table. Events reach the ingress's loop through
``call_soon_threadsafe``, as the controller's do.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

from engines.tokenizer import Tokenizer
from orchestrator.contracts import (BackendUnavailable, ClusterState, GenerateRequest, QueueFullError, Refused,
                                    ReshapeTimeout, TokenEvent)
from orchestrator.ingress import backend_wire as bw

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = {"state": 2.0, "plan": 10.0}
"""How long a call may wait for the job; drop, restore and regroup wait as long as the
controller does (60 s) and a little more."""
RESHAPE_CALL_TIMEOUT_S = 75.0
SILENT_JOB_S = 3 * bw.BEAT_S
"""A job whose last beat is older than this is not asked: ``/metrics`` and ``/admin/state``
call from the ingress's event loop, which must not wait on a job that hangs."""

_ERRORS = {"ValueError": ValueError, "Refused": Refused, "ReshapeTimeout": ReshapeTimeout,
           "BackendUnavailable": BackendUnavailable}


class Channel(Protocol):
    """A connected job, as the backend sees it."""

    def send(self, frame: dict[str, Any]) -> None: ...


@dataclass
class _Tracked:
    req: GenerateRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    output: list[int] = field(default_factory=list)
    """Tokens its client has been sent."""
    prompt_logprobs_sent: int = 0
    skip_prompt_logprobs: int = 0
    """Prompt log-probabilities a resumed run sends again, to drop."""
    sent: bool = False
    moves: int = 0

    @property
    def has_token(self) -> bool:
        return bool(self.output)


class RemoteBackend:
    """``IngressBackend`` over the supervisor's channel to the current job."""

    def __init__(self, model_name: str, tokenizer: Tokenizer, max_model_len: int, max_queued: int,
                 migration_limit: int, retry_after_s: float) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_queued = max_queued
        self.migration_limit = migration_limit
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._requests: dict[str, _Tracked] = {}
        self._channel: Channel | None = None
        self._healthy = False
        self._down = "the cluster is starting"
        self._failed: str | None = None
        self._calls: dict[int, tuple[str, Future]] = {}
        self._beat_at = 0.0
        """When the current job last beat (``time.monotonic``)."""
        self._call_ids = itertools.count()
        self.moved = 0
        """Requests sent to a new job after the one serving them died (a running total)."""

    # The ingress's side ---------------------------------------------------------------------
    def submit(self, req: GenerateRequest) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._failed is not None:
                raise BackendUnavailable(self._failed)
            waiting = sum(1 for t in self._requests.values() if not t.has_token)
            if waiting >= self.max_queued:
                if self._serving():
                    raise QueueFullError(f"{waiting} requests are waiting for a first token "
                                         f"(--max-queued-requests {self.max_queued})")
                raise BackendUnavailable(f"{self._down}; {waiting} requests already wait for it "
                                         f"(--max-queued-requests {self.max_queued})", self.retry_after_s)
            tracked = self._requests[req.request_id] = _Tracked(req, asyncio.get_running_loop(), queue)
            if self._serving():
                self._send(tracked)
        return queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            tracked = self._requests.pop(request_id, None)
            if tracked is not None and tracked.sent and self._channel is not None:
                self._channel.send({"op": "abort", "id": request_id})

    def healthy(self) -> bool:
        with self._lock:
            return self._serving()

    def state(self) -> ClusterState:
        return self._call("state")

    def plan(self) -> dict:
        return self._call("plan")

    def drop(self, ranks: list[int]) -> tuple[int, ...] | None:
        return self._call("drop", ranks)

    def restore(self, ranks: list[int] | None) -> list[tuple[int, ...]]:
        return self._call("restore", ranks)

    def regroup(self, groups: str) -> None:
        return self._call("regroup", groups)

    def _call(self, method: str, *args: Any) -> Any:
        future: Future = Future()
        with self._lock:
            if self._channel is None:
                raise BackendUnavailable(self._failed or self._down, self.retry_after_s)
            silent = time.monotonic() - self._beat_at
            if silent > SILENT_JOB_S:
                raise BackendUnavailable(f"the job has not beaten for {silent:.1f} s", self.retry_after_s)
            call = next(self._call_ids)
            self._calls[call] = (method, future)
            self._channel.send({"op": "call", "call": call, "method": method, "args": list(args)})
        timeout = CALL_TIMEOUT_S.get(method, RESHAPE_CALL_TIMEOUT_S)
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise BackendUnavailable(f"the job did not answer {method} within {timeout:.0f} s") from None
        finally:
            with self._lock:
                self._calls.pop(call, None)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._requests)

    # The channel's side ---------------------------------------------------------------------
    def on_event(self, channel: Channel, event: TokenEvent) -> None:
        with self._lock:
            if channel is not self._channel:
                return  # a dead job's last words
            tracked = self._requests.get(event.request_id)
            if tracked is None:
                return  # aborted meanwhile
            if event.cluster_failed:
                return  # the job is going down: ``detach`` moves the request to the next one
            self._account(tracked, event)
            if event.finished or event.error is not None:
                del self._requests[event.request_id]
        tracked.loop.call_soon_threadsafe(tracked.queue.put_nowait, event)

    def _account(self, tracked: _Tracked, event: TokenEvent) -> None:
        tracked.output += event.token_ids
        if event.prompt_logprobs and tracked.skip_prompt_logprobs:
            skip = min(tracked.skip_prompt_logprobs, len(event.prompt_logprobs))
            tracked.skip_prompt_logprobs -= skip
            event.prompt_logprobs = event.prompt_logprobs[skip:] or None
        tracked.prompt_logprobs_sent += len(event.prompt_logprobs or ())
        if event.finished:
            event.num_migrations += tracked.moves  # a move to a new job is a migration to the client

    def on_rejected(self, channel: Channel, request_id: str, error: str) -> None:
        """The job could not take a request now (not serving, say): it waits for the next."""
        with self._lock:
            tracked = self._requests.get(request_id)
            if channel is self._channel and tracked is not None:
                tracked.sent = False
                self._healthy = False
                logger.warning("the job did not take %s (%s); it waits for the job to serve", request_id, error)

    def on_beat(self, channel: Channel, healthy: bool) -> None:
        with self._lock:
            if channel is not self._channel:
                return
            self._beat_at = time.monotonic()
            was, self._healthy = self._healthy, healthy
            if healthy and not was:
                self._flush()

    def on_reply(self, channel: Channel, frame: dict[str, Any]) -> None:
        with self._lock:
            method, future = self._calls.get(frame.get("call"), (None, None))
        if future is None or future.done() or channel is not self._channel:
            return
        if "error" in frame:
            future.set_exception(_ERRORS.get(frame.get("kind"), RuntimeError)(frame["error"]))
        else:
            future.set_result(bw.result_from_wire(method, frame.get("result")))

    # The supervisor's side ------------------------------------------------------------------
    def attach(self, channel: Channel) -> None:
        """A new job connected; it serves once its beat says healthy."""
        with self._lock:
            self._channel, self._healthy = channel, False

    def detach(self, reason: str) -> None:
        """The job is gone: what it served waits for the next one (or fails past the limit)."""
        failed: list[tuple[_Tracked, TokenEvent]] = []
        with self._lock:
            self._channel, self._healthy, self._down = None, False, reason
            for rid, tracked in list(self._requests.items()):
                if not tracked.sent:
                    continue
                tracked.sent = False
                tracked.moves += 1
                if tracked.moves > self.migration_limit:
                    del self._requests[rid]
                    failed.append((tracked, TokenEvent(rid, [], True, "abort", error=(
                        f"{reason}; the request was moved to a new job {self.migration_limit} times "
                        f"(--migration-limit)"))))
                else:
                    tracked.skip_prompt_logprobs = tracked.prompt_logprobs_sent
            for _method, future in self._calls.values():
                if not future.done():
                    future.set_exception(BackendUnavailable(reason, self.retry_after_s))
        for tracked, event in failed:
            tracked.loop.call_soon_threadsafe(tracked.queue.put_nowait, event)

    def fail(self, reason: str) -> None:
        """No job will come back: every request ends with ``reason``, new ones get 503."""
        with self._lock:
            self._failed = reason
            ended, self._requests = self._requests, {}
        for rid, tracked in ended.items():
            tracked.loop.call_soon_threadsafe(tracked.queue.put_nowait, TokenEvent(rid, [], True, "abort", error=reason))

    # Internals (the lock held) -------------------------------------------------------------------
    def _serving(self) -> bool:
        return self._channel is not None and self._healthy and self._failed is None

    def _flush(self) -> None:
        """Send every pending request, oldest first."""
        for tracked in sorted(self._requests.values(), key=lambda t: t.req.arrival_time):
            if not tracked.sent:
                self._send(tracked)

    def _send(self, tracked: _Tracked) -> None:
        req = tracked.req
        if tracked.moves:
            self.moved += 1
            logger.info("resuming %s on the new job after %d tokens", req.request_id, len(tracked.output))
        resumed = GenerateRequest(req.request_id, req.prompt_token_ids, req.sampling, req.arrival_time,
                                  output_token_ids=list(tracked.output))
        tracked.sent = True
        self._channel.send({"op": "submit", "req": bw.request_to_wire(resumed)})
