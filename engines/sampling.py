"""Sampling parameters and the sampler: logit processors, greedy, temperature, top-k,
top-p, seeded draws, and log-probabilities.

Seeded sampling is stateless: the random stream for a request's n-th output token is
derived from ``(seed, n)``. A request therefore draws the same tokens whichever instance,
pipeline stage or batch samples it, which keeps outputs identical across a drop, a
restore or a migration. The logit processors (``min_tokens``, ``bad_words``,
``logit_bias``, the penalties) are functions of the row's own history only, so they keep
that property.

Log-probabilities are the model's own (``log_softmax`` of the raw logits, before any
processor, temperature or truncation), as vLLM's default ``raw_logprobs`` mode returns
them: they score the text, not the sampler's draw.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from engines.errors import RequestError

_SEED_STRIDE = 1_000_003  # a prime: (seed, n) pairs map to distinct generator seeds

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per token (vLLM's default ``max_logprobs``)."""
MAX_LOGIT_BIAS = 100.0
"""``logit_bias`` values are clamped by OpenAI to [-100, 100]; beyond that is refused here."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token, what to report with it, and when to stop."""

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
    min_tokens: int = 0
    """EOS and ``stop_token_ids`` cannot be drawn before this many tokens are generated."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's, in [-2, 2])."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the generated tokens (OpenAI's, in [-2, 2])."""
    repetition_penalty: float = 1.0
    """CTRL's penalty over prompt and output tokens: a positive logit is divided by it, a
    negative one multiplied (1 = off), as transformers and vLLM apply it."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    """Token sequences never generated: a sequence's last token is banned wherever the
    tokens before it end the text so far."""
    logprobs: int | None = None
    """Report each sampled token's log-probability and its ``logprobs`` most likely
    alternatives (0: the token's own only); None reports nothing."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (the prefill computes them)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise RequestError(f"logit_bias for token {token} must be in [-100, 100], got {bias}")
        if any(not word for word in self.bad_words):
            raise RequestError("bad_words holds an empty sequence")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_history(self) -> bool:
        """The processors read the tokens so far (penalties, multi-token bad words)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or any(len(w) > 1 for w in self.bad_words))

    @property
    def processes_logits(self) -> bool:
        """Anything but temperature and truncation changes the logits (the common path skips it)."""
        return self.needs_history or bool(self.logit_bias or self.bad_words or self.min_tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) of the k most likely tokens, most likely first."""


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs of one row besides its logits."""

    params: SamplingParams
    output_index: int = 0
    """Tokens the request generated before this one (selects the seeded stream)."""
    history: tuple[int, ...] | list[int] | None = None
    """Prompt and output tokens so far; required when ``params.needs_history``."""
    num_prompt_tokens: int = 0
    """Where the output starts in ``history``."""


@dataclass
class Sampled:
    """One token per row, and its log-probabilities where the row asked for them."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]


def sample(logits: torch.Tensor, rows: list[SampleRow], eos_token_ids: tuple[int, ...] = ()) -> Sampled:
    """Pick one token per row of ``logits [n, vocab]`` (float32, raw from the LM head)."""
    scores = logits
    if any(r.params.processes_logits for r in rows):
        scores = logits.clone()
        for i, r in enumerate(rows):
            if r.params.processes_logits:
                scores[i] = process_logits(logits[i], r, eos_token_ids)
    tokens = torch.argmax(scores, dim=-1).tolist()
    for i, r in enumerate(rows):
        if not r.params.greedy:
            tokens[i] = _draw(scores[i], r.params, r.output_index)
    return Sampled(tokens, _token_logprobs(logits, rows, tokens))


def process_logits(logits: torch.Tensor, row: SampleRow, eos_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """One row's logits after ``min_tokens``, ``bad_words``, ``logit_bias`` and the
    penalties, in vLLM's order."""
    p = row.params
    out = logits.float().clone()
    if row.output_index < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        out[list(banned)] = float("-inf")
    history = list(row.history) if row.history is not None else None
    if p.needs_history and history is None:
        raise ValueError("these sampling parameters need the sequence's history")
    for word in p.bad_words:
        if len(word) == 1 or history[len(history) - len(word) + 1:] == list(word[:-1]):
            out[word[-1]] = float("-inf")
    for token, bias in p.logit_bias:
        out[token] += bias
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(history)), dtype=torch.int64)
        vals = out[seen]
        out[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        counts = Counter(history[row.num_prompt_tokens:])
        if counts:
            ids = torch.tensor(list(counts), dtype=torch.int64)
            freq = torch.tensor(list(counts.values()), dtype=out.dtype)
            out[ids] -= p.frequency_penalty * freq + p.presence_penalty
    return out


def _draw(scores: torch.Tensor, p: SamplingParams, n: int) -> int:
    scores = scores.float() / p.temperature
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


def _token_logprobs(logits: torch.Tensor, rows: list[SampleRow], tokens: list[int]) -> list[TokenLogprob | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if wanted:
        scored = logprobs_of(logits[wanted], [tokens[i] for i in wanted], [rows[i].params.logprobs for i in wanted])
        for i, lp in zip(wanted, scored):
            out[i] = lp
    return out


def logprobs_of(logits: torch.Tensor, targets: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Row i's log-probability of ``targets[i]`` and its ``ks[i]`` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
    kmax = max(ks)
    top_v, top_i = (torch.topk(lp, kmax, dim=-1) if kmax else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [TokenLogprob(t, c, tuple(zip(ids[:k], vals[:k])))
            for t, c, ids, vals, k in zip(targets, chosen, top_i, top_v, ks)]
