"""Typed messages between a scheduler and a stage runner: one step in, one step out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engines.sampling import SampleRow, SamplingParams, TokenLogprob


@dataclass
class SeqChunk:
    """The slice of one sequence that a step computes.

    Prefill chunks and decodes are the same thing here: ``num_tokens`` new tokens at
    positions ``num_computed .. num_computed + num_tokens - 1`` (a decode is a chunk of one).
    """

    seq_id: int
    num_computed: int
    """Tokens of this sequence already in the KV cache."""
    num_tokens: int
    """Tokens this step adds (>= 1)."""
    block_table: list[list[int]]
    """Per layer of the stage (in order), the page ids covering the first
    ``num_computed + num_tokens`` tokens."""
    token_ids: list[int] | None = None
    """The chunk's token ids; needed by the first stage only."""
    sample: bool = False
    """Sample a token after this chunk (it ends the prompt, or it is a decode)."""
    sampling: SamplingParams | None = None
    output_index: int = 0
    """Tokens generated before this one: selects the seeded random stream."""
    history: list[int] | None = None
    """Prompt and output tokens so far, on sampling chunks whose processors read them
    (penalties); None otherwise, so the common step carries nothing extra."""
    num_prompt_tokens: int = 0
    """Where the output starts in ``history``."""
    prompt_targets: list[int] | None = None
    """When prompt log-probabilities are asked for: the prompt tokens that the chunk's
    rows from ``prompt_target_row`` on predict (each row's next token)."""
    prompt_target_row: int = 0

    def sample_row(self) -> SampleRow:
        if self.sampling is None:
            raise ValueError(f"sequence {self.seq_id}: a sampling chunk has no sampling parameters")
        return SampleRow(self.sampling, self.output_index, self.history, self.num_prompt_tokens)

    @property
    def context_len(self) -> int:
        return self.num_computed + self.num_tokens


@dataclass
class StepInput:
    """One mixed step: prefill chunks and decodes, in any order."""

    chunks: list[SeqChunk]
    hidden: torch.Tensor | None = None
    """``[sum(num_tokens), hidden]`` activations from the previous stage (not on the first)."""


@dataclass
class StepOutput:
    """What a stage returns: activations for the next stage, or sampled tokens on the last."""

    hidden: torch.Tensor | None = None
    sampled_seq_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None
    """``[len(sampled_seq_ids), vocab]`` float32 logits the tokens were drawn from."""
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """Per sampled token, its log-probabilities when its request asked (else None); may be
    empty when no request of the step asked."""
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    """Seq id -> log-probabilities of the chunk's ``prompt_targets``."""
