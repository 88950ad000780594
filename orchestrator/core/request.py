"""The request object and its ordered status."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from engines.sampling import SamplingParams, TokenLogprob

_seq_ids = itertools.count()


class RequestStatus(enum.IntEnum):
    """Ordered: everything from FINISHED_STOPPED on is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    """Its KV was dropped to make room; it waits to be recomputed (or, if ``Request.swapped``,
    its KV waits in host memory to be swapped back in)."""
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


@dataclass
class LogprobBuffer:
    """A request's log-probabilities computed but not yet reported, and how far its
    prompt's are done (a recomputed prefill does not score the prompt again)."""

    next_prompt_position: int = 1
    """The first prompt position still to score (position 0 has no log-probability)."""
    prompt: list[TokenLogprob] = field(default_factory=list)
    output: list[TokenLogprob] = field(default_factory=list)

    def drain(self) -> tuple[list[TokenLogprob], list[TokenLogprob]]:
        """The unreported prompt and output log-probabilities, forgotten here."""
        prompt, output = self.prompt, self.output
        self.prompt, self.output = [], []
        return prompt, output


@dataclass
class Request:
    """One generation request as the scheduler tracks it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_model_len: int
    """Prompt plus output never exceed this (the model's context)."""
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    """Integer handle the engine's runners know the sequence by."""
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache; a chunk computes from here up to ``num_tokens``."""
    block_table: list[list[int]] = field(default_factory=list)
    """Per layer, the KV pages of this request (owned by the block manager)."""
    num_preemptions: int = 0
    swapped: bool = False
    """Its KV is in the host swap space (pages freed, ``num_computed_tokens`` kept)."""
    num_swaps: int = 0
    """Preemptions that swapped the KV out instead of dropping it."""
    num_migrations: int = 0
    """Live migrations to another replica (the llumnix policy)."""
    error: str | None = None
    logprobs: LogprobBuffer = field(default_factory=LogprobBuffer)
    first_scheduled_time: float | None = None
    """When its first step was scheduled on this instance (``time.monotonic``)."""
    prefix_blocks: list = field(default_factory=list)
    """The leading blocks of ``block_table`` that are the prefix cache's (``CachedBlock``s
    this request holds a reference on); the pages after them are its own."""
    prefix_closed: bool = False
    """An equal block was cached by another request first: no later block of this one is cached."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache when it was first scheduled."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (a decode step's
        one token would otherwise copy the prompt and the output every step)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def max_total_tokens(self) -> int:
        return min(self.max_model_len, len(self.prompt_token_ids) + self.sampling.max_tokens)

    def prompt_targets(self, start: int, end: int) -> tuple[int, list[int] | None]:
        """For a chunk over positions ``[start, end)``: the first row to score and the prompt
        tokens its rows predict, when prompt log-probabilities are asked for and not done."""
        if self.sampling.prompt_logprobs is None:
            return 0, None
        first = max(start + 1, self.logprobs.next_prompt_position)
        last = min(end + 1, len(self.prompt_token_ids))
        if first >= last:
            return 0, None
        return first - start - 1, self.prompt_token_ids[first:last]
