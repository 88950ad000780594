"""One request's answer, whatever carries it: the cluster's token events turned into text.

``Answer`` consumes a request's ``TokenEvent``s, detokenizes them incrementally, holds back
text that may start a stop string, keeps the ingress's statistics, and aborts the request
in the cluster (once) when the answer ends before its last event. The HTTP routes
(``server.py``) and the Triton relay (``relay.py``) put their own framing around it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from typing import Any

from orchestrator.contracts import BackendUnavailable, IngressBackend, QueueFullError, TokenEvent
from orchestrator.ingress.detokenizer import IncrementalDecoder
from engines.sampling import TokenLogprob
from orchestrator.ingress.errors import ApiError
from orchestrator.ingress.metrics import IngressStats, RequestTiming
from orchestrator.ingress.openai_logprobs import LogprobFormatter
from orchestrator.ingress.openai_protocol import Kind, ParsedRequest, parse_request
from orchestrator.ingress.stop_strings import StopStringMatcher

logger = logging.getLogger(__name__)


def admit(backend: IngressBackend, stats: IngressStats, kind: Kind, body: Any, request_id: str,
          arrival_time: float, route: str = "http") -> list["Answer"]:
    """Validate, tokenize and submit one request body: the ``Answer`` of each of its
    generations (prompts times ``best_of``), or ``ApiError`` (400 for a bad body, 429 when
    the cluster's queue is full, 503 when it is not serving; generations already submitted
    are aborted then). ``route`` names the carrier in the request log (``http``, ``triton``).

    The caller must call ``Answer.end()`` on every answer when it is done with it, however it ends.
    """
    parsed = parse_request(kind, body, backend, request_id, arrival_time=arrival_time)
    answers: list[Answer] = []
    for g, request in enumerate(parsed.generations):
        try:
            queue = backend.submit(request)
        except (QueueFullError, BackendUnavailable) as exc:
            for a in answers:
                a.end()
            if isinstance(exc, QueueFullError):
                raise ApiError(429, f"the server is overloaded, retry later ({exc})") from None
            retry = exc.retry_after_s
            raise ApiError(503, f"the cluster is not serving ({exc})",
                           {"Retry-After": str(max(1, round(retry)))} if retry is not None else None) from None
        stats.prompt_tokens += len(request.prompt_token_ids)
        stats.in_flight += 1
        answers.append(Answer(backend, stats, parsed, queue, route, generation=g))
    return answers


class Answer:
    """Consumes one request's events; ``close`` aborts it in the cluster unless it finished."""

    def __init__(self, backend: IngressBackend, stats: IngressStats, parsed: ParsedRequest,
                 queue: asyncio.Queue[TokenEvent], route: str = "http", generation: int = 0) -> None:
        self.backend = backend
        self.stats = stats
        self.parsed = parsed
        self.queue = queue
        self.generation = generation
        """Its index in ``parsed.generations`` (a streamed choice's ``index``)."""
        request = self.request = parsed.generations[generation]
        self.timing = RequestTiming(arrival_time=request.arrival_time, request_id=request.request_id, route=route,
                                    prompt_tokens=len(request.prompt_token_ids))
        self.finish_reason: str | None = None
        """How the request ended: the cluster's reason, ``stop`` (a stop string), ``abort``
        (its carrier gave up) or ``error``; None while it runs."""
        self.decoder = IncrementalDecoder(backend.tokenizer)
        self.stops = StopStringMatcher(parsed.stop)
        self.formatter = (LogprobFormatter(backend.tokenizer, parsed.kind, parsed.logprobs)
                          if parsed.logprobs is not None else None)
        self._echo = parsed.echo
        """The prompt's text (and log-probabilities) still to put before the first new text."""
        self._echo_logprobs = parsed.echo
        self._prompt_logprobs: list[TokenLogprob] = []
        self.done = False
        self._ended = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def next_event(self) -> TokenEvent:
        """The next event of the request, counted in the statistics."""
        event = await self.queue.get()
        self.stats.on_tokens(self.timing, len(event.token_ids), queue_time_s=event.queue_time_s)
        if event.num_cached_tokens is not None:
            self.timing.cached_tokens = event.num_cached_tokens
        if event.instance is not None:
            self.timing.instance = event.instance
            self.timing.instance_shape = event.instance_shape
        if event.finished or event.error is not None:
            self.done = True  # an error ends the request in the cluster too: nothing to abort
            self.finish_reason = "error" if event.error is not None else event.finish_reason
            if event.error is None:
                self.stats.on_finish(self.timing, event.finish_reason)
        return event

    def text_of(self, event: TokenEvent) -> tuple[str, str | None]:
        """New text of an event (held back while it may start a stop string) and the
        finish reason once the answer is over: the cluster's, or ``stop`` when a stop
        string ended it, in which case the request is aborted in the cluster."""
        text, reason = self._new_text(event)
        if self._echo and (text or reason is not None):
            text = self.parsed.prompt_texts[self.generation // self.parsed.best_of] + text
            self._echo = False
        return text, reason

    def _new_text(self, event: TokenEvent) -> tuple[str, str | None]:
        text = self.stops.push(self.decoder.push(event.token_ids) if event.token_ids else "")
        if self.stops.stopped:
            self.close(reason="stop")
            return text, "stop"
        if not event.finished:
            return text, None
        return text + self.stops.push(self.decoder.flush()) + self.stops.flush(), event.finish_reason

    def logprobs_of(self, event: TokenEvent) -> dict[str, Any] | None:
        """The event's log-probabilities as the client asked for them (None if it did not);
        the echoed prompt's come first, with the first event that has tokens. Call after
        ``text_of``'s echo."""
        if self.formatter is None:
            return None
        self._prompt_logprobs.extend(event.prompt_logprobs or ())
        echo = self._echo_logprobs and bool(event.token_ids or event.finished)
        self._echo_logprobs = self._echo_logprobs and not echo
        prompt = self.request.prompt_token_ids
        return self.formatter.format(event.logprobs or [], echo_prompt=self._prompt_logprobs if echo else None,
                                     first_prompt_token=prompt[0] if echo else None)

    def close(self, reason: str = "abort") -> None:
        """Abort the request in the cluster unless its last event came (``reason``: why)."""
        if self.done:
            return
        self.done = True
        self.finish_reason = reason
        self.stats.on_finish(self.timing, reason)
        try:
            self.backend.abort(self.request_id)
        except Exception:  # noqa: BLE001 - the client is gone either way; keep serving
            logger.exception("aborting %s failed", self.request_id)

    def end(self) -> None:
        """The answer is over for its carrier: abort the request if it has not finished."""
        if not self._ended:
            self._ended = True
            self.stats.in_flight -= 1
            self.close()
            if self.stats.request_log is not None:
                self.stats.request_log.write(self.timing, self.finish_reason, time.monotonic())
