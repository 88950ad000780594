"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeded).

Seeded sampling is stateless: the random stream for a request's n-th output token is
derived from ``(seed, n)``. A request therefore draws the same tokens whichever instance,
pipeline stage or batch samples it, which keeps outputs identical across a drop, a
restore or a migration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.errors import RequestError

_SEED_STRIDE = 1_000_003  # a prime: (seed, n) pairs map to distinct generator seeds


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token, and when to stop."""

    max_tokens: int = 16
    """Upper bound on generated tokens (must be >= 1)."""
    temperature: float = 0.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1.0 = all)."""
    seed: int | None = None
    """Seed of the request's random stream; None draws one when the request is created."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks use it for fixed lengths)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end the generation, besides the model's EOS."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> list[int]:
    """Pick one token per row of ``logits [n, vocab]``.

    ``output_index[i]`` is how many tokens row i's request has generated before this one;
    with the request's seed it fixes the random stream for this token.
    """
    tokens = torch.argmax(logits, dim=-1).tolist()
    for row, (p, n) in enumerate(zip(params, output_index)):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, n)
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, n: int) -> int:
    scores = logits.float() / p.temperature
    if p.top_k > 0 and p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = (cum - torch.softmax(sorted_scores, dim=-1)) >= p.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1).cpu()
    gen = torch.Generator().manual_seed(((p.seed or 0) * _SEED_STRIDE + n) & 0x7FFF_FFFF_FFFF_FFFF)
    return int(torch.multinomial(probs, 1, generator=gen).item())
