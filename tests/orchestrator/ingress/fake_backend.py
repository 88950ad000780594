"""An in-process ``IngressBackend`` for ingress tests: deterministic tokens, recorded aborts.

It answers a prompt with its token ids reversed (special tokens left out), one token per
event, from a task on the ingress's event loop that yields between tokens, so events
arrive as they would from the cluster. Knobs make it fail, stall or refuse.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from engines.tokenizer import Tokenizer
from orchestrator.contracts import (BackendUnavailable, ClusterState, GenerateRequest, InstanceState, QueueFullError,
                                    RankState, Refused, ReshapeTimeout, TokenEvent)


@dataclass
class FakeBackend:
    """Implements ``IngressBackend``; the fields below the first three steer its behaviour."""

    tokenizer: Tokenizer
    model_name: str = "tiny"
    max_model_len: int = 64
    queue_full: bool = False
    """``submit`` raises ``QueueFullError``."""
    unavailable: bool = False
    """``submit``, ``state`` and ``regroup`` raise ``BackendUnavailable``; unhealthy."""
    retry_after_s: float | None = None
    """With ``unavailable``: when to try again (a supervised job restarting)."""
    stall_after: int | None = None
    """Send this many tokens, then wait until aborted."""
    fail_after: int | None = None
    """Send this many tokens, then an event with ``error`` set."""
    token_delay: float = 0.0
    """Seconds between tokens (0: just yield to the event loop)."""
    submitted: list[GenerateRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    regroups: list[str] = field(default_factory=list)
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict)

    def output_for(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """The tokens the fake answers ``prompt_ids`` with."""
        special = {self.tokenizer.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>")}
        return [t for t in reversed(prompt_ids) if t not in special][:max_tokens]

    def submit(self, req: GenerateRequest) -> asyncio.Queue[TokenEvent]:
        if self.unavailable:
            raise BackendUnavailable("fake cluster is down", self.retry_after_s)
        if self.queue_full:
            raise QueueFullError("fake queue is full")
        self.submitted.append(req)
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(self._emit(req, queue))
        self._tasks[req.request_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(req.request_id, None))
        return queue

    async def _emit(self, req: GenerateRequest, queue: asyncio.Queue[TokenEvent]) -> None:
        out = self.output_for(req.prompt_token_ids, req.sampling.max_tokens)
        for i, tok in enumerate(out):
            if self.fail_after is not None and i == self.fail_after:
                queue.put_nowait(TokenEvent(req.request_id, [], finished=True, error="fake failure"))
                return
            if self.stall_after is not None and i == self.stall_after:
                await asyncio.Event().wait()  # until abort cancels this task
            await asyncio.sleep(self.token_delay)
            queue.put_nowait(TokenEvent(req.request_id, [tok]))
        reason = "length" if len(out) == req.sampling.max_tokens else "stop"
        queue.put_nowait(TokenEvent(req.request_id, [], finished=True, finish_reason=reason))

    def abort(self, request_id: str) -> None:
        self.aborts.append(request_id)
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    def healthy(self) -> bool:
        return not self.unavailable

    def state(self) -> ClusterState:
        if self.unavailable:
            raise BackendUnavailable("fake cluster is down")
        ranks = [RankState(rank=r, role="replica", instance=r, stage=0, group_size=1, layer_range=(0, 6),
                           weight_bytes=1000, kv_pages_total=100, kv_pages_used=25 * (r + 1),
                           device_memory_bytes=0, resident_bytes=0) for r in range(2)]
        instances = [InstanceState(instance=r, ranks=[r], waiting=r, running=2 - r) for r in range(2)]
        return ClusterState(ranks=ranks, instances=instances, queued=3)

    def regroup(self, groups: str) -> None:
        if self.unavailable:
            raise BackendUnavailable("fake cluster is down")
        if groups == "slow":
            raise ReshapeTimeout("regrouping did not finish within 30 s")
        if groups == "x-y":
            raise ValueError(f"--groups: cannot parse {groups!r}")
        if groups != "0-1":
            raise Refused(f"cannot regroup to {groups!r}: ranks are busy")
        self.regroups.append(groups)
