"""The CPU host's batch-aware step model and its contention, from a ``perf.profile_cost`` file.

The lookahead planner's ``CostModel`` is linear in a step's new tokens, which it needs (its
cost must add over chunks). A CPU rank's step is not: on this host one decode row costs
48 ms, 8 rows 113 ms and 32 rows 162 ms (the linear fit says 61, 92 and 198), because the
GEMMs of a few rows read every weight whatever the batch, and larger batches run other
kernels. The simulator needs the real curve, so ``BatchStepModel`` fits a step's time as

    g(T) + a * attention work + r * KV slots gathered + c * sequences

where ``T`` is the step's new tokens and ``g`` is piecewise linear between knots at the token
counts the profile timed (powers of two, extended linearly past the last). The attention work
and the KV slots follow the reference engine's kernels (``engines.step_meta``,
``engines.runner``), not the chunks' own sizes:

- the one-token chunks (decodes) run as one padded batch: each gathers, and attends over,
  the batch's widest context rounded up to a page. So a step of 32 decodes costs what 32
  decodes at its longest context cost, the figure the profile's equal-context batches time
  (32 rows at 1,023 cached tokens cost 624 ms here against 216 ms at 127);
- a chunk of more tokens after cached context gathers its ``n + s`` slots and attends its
  ``CostModel`` pairs; a fresh prompt (nothing cached) gathers nothing.

``a``, ``r``, ``c`` and every knot's value are fitted >= 0 by the same least squares as
``CostModel`` (relative error) over the profile's own timed steps (``profile.steps``).

Each step also pays what the project's engine loop adds to the runner's execute (schedule,
step message, sample, update): ``loop_fixed_s + loop_per_seq_s * sequences``, fitted to the
profile's ``profile.loop`` (``LLMEngine.step`` against the runner on decode batches), the
same whatever the stage's layers.

``contention_efficiency`` turns the profile's contention measurement (k processes running the
same mix at once) into the fraction of their share of the cores that k busy ranks get: the
memory bus and caches they share slow them beyond the core share alone.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.core.config import EngineConfig
from orchestrator.kunserve.cost_model import CostModel, CostModelError, nonnegative_lstsq, attention_work


def attention_features(chunks: list[tuple[int, int]], page_size: int) -> tuple[int, int]:
    """``(attention pairs, KV slots gathered)`` of a step as the reference engine runs it: its
    decodes as one batch padded to the widest context (rounded up to a page), its other
    chunks each on their own, a fresh prompt reading nothing back."""
    pairs = slots = decodes = width = 0
    for n, s in chunks:
        if n == 1:
            decodes += 1
            width = max(width, s + 1)
        else:
            pairs += attention_work(n, s)
            if s:
                slots += n + s
    width = -(-width // page_size) * page_size
    return pairs + decodes * width, slots + decodes * width


@dataclass(frozen=True)
class BatchStepModel:
    """Seconds of one stage's step from its chunks ``(n, s)``: ``g(tokens)`` piecewise linear
    between ``knots``, plus attention work, KV slots gathered and sequences (all for
    ``layers`` layers; ``attention_features`` at ``page_size``)."""

    knots: tuple[int, ...]
    values: tuple[float, ...]
    """``g`` at each knot, seconds."""
    per_attention_s: float
    per_kv_token_s: float
    per_seq_s: float
    layers: int
    r2: float
    samples: int
    loop_fixed_s: float = 0.0
    """Seconds the engine loop adds to every step (``loop_overhead``)."""
    loop_per_seq_s: float = 0.0
    """Seconds it adds per sequence in the step."""
    page_size: int = EngineConfig.page_size
    """The profiled engine's KV page (a padded decode batch is a whole number of pages wide)."""

    def token_weights(self, tokens: float) -> list[float]:
        """The hat basis at ``tokens``: weights on each knot's value (linear past the ends)."""
        k = self.knots
        w = [0.0] * len(k)
        if len(k) == 1:
            w[0] = tokens / k[0]
            return w
        i = min(max(bisect_right(k, tokens) - 1, 0), len(k) - 2)
        frac = (tokens - k[i]) / (k[i + 1] - k[i])
        w[i], w[i + 1] = 1.0 - frac, frac
        return w

    def tokens_cost(self, tokens: float) -> float:
        return max(0.0, sum(wi * vi for wi, vi in zip(self.token_weights(tokens), self.values)))

    def step_cost(self, chunks: list[tuple[int, int]], layers: int | None = None) -> float:
        if not chunks:
            return 0.0
        tokens = sum(n for n, _ in chunks)
        work, read = attention_features(chunks, self.page_size)
        total = (self.tokens_cost(tokens) + self.per_attention_s * work + self.per_kv_token_s * read
                 + self.per_seq_s * len(chunks))
        loop = self.loop_fixed_s + self.loop_per_seq_s * len(chunks)
        return total * (1.0 if layers is None else layers / self.layers) + loop

    def to_json(self) -> dict[str, Any]:
        return {"kind": "batch", "knots": list(self.knots), "values": list(self.values),
                "per_attention_s": self.per_attention_s, "per_kv_token_s": self.per_kv_token_s,
                "per_seq_s": self.per_seq_s,
                "layers": self.layers, "r2": self.r2, "samples": self.samples,
                "loop_fixed_s": self.loop_fixed_s, "loop_per_seq_s": self.loop_per_seq_s,
                "page_size": self.page_size}


def _knots(counts: set[int]) -> tuple[int, ...]:
    """Powers of two up to the largest count, each kept only if some count lies strictly
    between its neighbours (a knot with no step near it would be fitted to nothing)."""
    powers = [1 << i for i in range(max(1, math.ceil(math.log2(max(counts)))) + 1)]

    def near(j: int) -> bool:
        lo = powers[j - 1] if j else 0
        hi = powers[j + 1] if j + 1 < len(powers) else math.inf
        return any(lo < c < hi for c in counts)
    return tuple(p for j, p in enumerate(powers) if near(j))


def fit_batch(samples: list[tuple[list[tuple[int, int]], float]], layers: int,
              page_size: int = EngineConfig.page_size) -> BatchStepModel:
    """Fit ``BatchStepModel`` to timed steps; knots at the powers of two the steps' token
    counts span (a knot with no step near it would be fitted to nothing, so knots are kept
    only where some step's count falls in the segments on either side)."""
    if not samples:
        raise CostModelError("a batch step model needs timed steps")
    knots = _knots({sum(n for n, _ in chunks) for chunks, _ in samples})
    probe = BatchStepModel(knots, (0.0,) * len(knots), 0.0, 0.0, 0.0, layers, 0.0, 0)

    def row(chunks: list[tuple[int, int]]) -> list[float]:
        return [*probe.token_weights(sum(n for n, _ in chunks)),
                *map(float, attention_features(chunks, page_size)), float(len(chunks))]

    x = np.array([row(chunks) for chunks, _ in samples], dtype=np.float64)
    y = np.array([t for _, t in samples], dtype=np.float64)
    if len(samples) < x.shape[1]:
        raise CostModelError(f"a batch step model over {len(knots)} knots needs at least {x.shape[1]} "
                             f"timed steps, got {len(samples)}")
    w = 1.0 / y
    coef = nonnegative_lstsq(x * w[:, None], y * w)
    pred = x @ coef
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else 1.0
    n = len(knots)
    return BatchStepModel(knots, tuple(float(v) for v in coef[:n]), float(coef[n]), float(coef[n + 1]),
                          float(coef[n + 2]), layers, r2, len(samples), page_size=page_size)


def loop_overhead(data: dict[str, Any] | None) -> tuple[float, float]:
    """``(fixed, per sequence)`` seconds the engine loop adds to a step: a least-squares line
    (both >= 0) through each batch's engine step less its execute; (0, 0) without data."""
    if not data or not data.get("batches"):
        return 0.0, 0.0
    b = np.array(data["batches"], dtype=np.float64)
    extra = np.array(data["engine_seconds"], dtype=np.float64) - np.array(data["runner_seconds"], dtype=np.float64)
    coef = nonnegative_lstsq(np.stack([np.ones_like(b), b], axis=1), np.maximum(extra, 0.0))
    return float(coef[0]), float(coef[1])


def contention_efficiency(data: dict[str, Any] | None) -> tuple[float, ...]:
    """Per number of busy ranks k = 1, 2, ... (up to the most measured), the fraction of its
    share of the cores (``min(1, cores / k)``) each gets: the measured slowdown divided into
    the core share's. Counts between two measured are interpolated; () without a measurement."""
    if not data:
        return ()
    cores, ks, ts = data["cores"], data["processes"], data["pass_seconds"]
    if ks[0] != 1:
        raise CostModelError("the contention measurement must start with 1 process")
    eff = {k: max(1.0, k / cores) * ts[0] / t for k, t in zip(ks, ts)}
    out = []
    for k in range(1, ks[-1] + 1):
        lo = max(m for m in ks if m <= k)
        hi = min(m for m in ks if m >= k)
        frac = 0.0 if hi == lo else (k - lo) / (hi - lo)
        out.append(min(1.0, eff[lo] + frac * (eff[hi] - eff[lo])))
    return tuple(out)


@dataclass(frozen=True)
class HostProfile:
    """What a ``perf.profile_cost`` file gives the simulator."""

    linear: CostModel
    batch: BatchStepModel | None
    """None if the file has no timed steps (written before they were kept)."""
    efficiency: tuple[float, ...]
    """``contention_efficiency`` of its measurement; () if it has none."""


def load_host_profile(path: str | Path) -> HostProfile:
    """The linear model, the batch-aware model and the contention of a profile file."""
    linear = CostModel.load(path)
    data = json.loads(Path(path).read_text()).get("profile") or {}
    steps = [([tuple(c) for c in s["chunks"]], float(s["seconds"])) for s in data.get("steps") or ()]
    page_size = int(data.get("page_size", EngineConfig.page_size))  # files before it was kept: the default
    batch = fit_batch(steps, linear.layers, page_size) if steps else None
    if batch is not None:
        fixed, per_seq = loop_overhead(data.get("loop"))
        batch = replace(batch, loop_fixed_s=fixed, loop_per_seq_s=per_seq)
    return HostProfile(linear, batch, contention_efficiency(data.get("contention")))
