"""Typed messages between a scheduler and a stage runner: one step in, one step out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engines.sampling import SamplingParams


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
