"""The controller's table of requests in flight: one stream per request, from ``submit``
until its last token event, with the instance that serves it.

Written from two threads (the ingress submits; the rank loop dispatches, moves and
delivers), so every access holds the table's lock. Token events reach the ingress's own
event loop through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from orchestrator.contracts import QueueFullError, TokenEvent

NOT_DISPATCHED = -1


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    instance: int = NOT_DISPATCHED
    first_token: bool = False


class RequestTable:
    """Requests in flight, by id."""

    def __init__(self, max_queued: int) -> None:
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}

    def open(self, request_id: str) -> asyncio.Queue:
        """A new request's event queue (ingress thread, in its event loop); refused with
        ``QueueFullError`` when too many wait for a first token."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            queued = self._queued()
            if queued >= self._max_queued:
                raise QueueFullError(f"{queued} requests are waiting for a first token "
                                     f"(--max-queued-requests {self._max_queued})")
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), q)
        return q

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def queued(self) -> int:
        """Requests without a first token yet."""
        with self._lock:
            return self._queued()

    def _queued(self) -> int:
        return sum(1 for s in self._streams.values() if not s.first_token)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def instance_of(self, request_id: str) -> int | None:
        """The instance serving the request, ``NOT_DISPATCHED``, or None once it ended."""
        with self._lock:
            stream = self._streams.get(request_id)
            return None if stream is None else stream.instance

    def outstanding(self, instance: int) -> int:
        """Requests dispatched to ``instance`` and not finished."""
        with self._lock:
            return sum(1 for s in self._streams.values() if s.instance == instance)

    def move(self, request_ids: list[str], instance: int) -> None:
        """These requests are served by ``instance`` from now on (dispatch, reshape, migration)."""
        with self._lock:
            for rid in request_ids:
                if rid in self._streams:
                    self._streams[rid].instance = instance

    def deliver(self, event: TokenEvent) -> None:
        """Hand a token event to the request's stream; a finishing event closes it."""
        with self._lock:
            stream = self._streams.get(event.request_id)
            if stream is None:
                return
            if event.token_ids:
                stream.first_token = True
            if event.finished:
                del self._streams[event.request_id]
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
        except RuntimeError:
            pass  # the ingress loop is closed: nobody is listening any more

    def fail_all(self, reason: str) -> None:
        """End every request in flight with an error that is the cluster's, not theirs."""
        for rid in self.ids():
            self.deliver(TokenEvent(rid, [], True, "abort", reason, cluster_failed=True))
