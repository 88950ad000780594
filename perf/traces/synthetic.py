"""Synthetic traces: Gamma-renewal arrivals with optional burst windows, lognormal lengths,
and multi-turn chat sessions that share prefixes (``multi_turn_chat``).

Everything is deterministic from ``seed``. Arrivals and token lengths come from separate
random streams, so changing a length distribution leaves the arrival times unchanged.

    python -m perf.traces.write_chat --out perf/traces/data/chat_bursty.jsonl

writes a multi-turn chat trace in the Mooncake format (``hash_ids`` per 512-token block),
which ``perf.bench`` replays like any other trace.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from perf.traces.model import Trace, TraceRequest


@dataclass(frozen=True)
class BurstWindow:
    """Seconds ``[start_s, end_s)`` during which the arrival rate is ``rate_multiplier`` times higher."""

    start_s: float
    end_s: float
    rate_multiplier: float

    def __post_init__(self) -> None:
        if not 0 <= self.start_s < self.end_s:
            raise ValueError(f"BurstWindow needs 0 <= start_s < end_s, got {self.start_s}, {self.end_s}")
        if self.rate_multiplier <= 0:
            raise ValueError(f"BurstWindow rate_multiplier must be > 0, got {self.rate_multiplier}")


@dataclass(frozen=True)
class LengthDist:
    """A lognormal token-length distribution given by its mean and median, clipped to [1, max_len].

    ``mean == median`` gives the constant ``round(mean)``; the mean cannot be below the median.
    """

    mean: float
    median: float
    max_len: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.median <= self.mean:
            raise ValueError(f"LengthDist needs 0 < median <= mean, got mean={self.mean}, median={self.median}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"LengthDist max_len must be >= 1, got {self.max_len}")

    def sample(self, rng: random.Random) -> int:
        """One length drawn with ``rng``."""
        # median = exp(mu), mean = exp(mu + sigma^2 / 2)
        sigma = math.sqrt(2 * math.log(self.mean / self.median))
        value = max(1, round(rng.lognormvariate(math.log(self.median), sigma)))
        return value if self.max_len is None else min(value, self.max_len)


LengthSpec = LengthDist | tuple[float, float]


def gamma_bursty(duration_s: float, rate: float, cv: float, seed: int,
                 input_len: LengthSpec = LengthDist(1024, 512),
                 output_len: LengthSpec = LengthDist(256, 128),
                 bursts: Sequence[BurstWindow] = (), name: str | None = None) -> Trace:
    """A trace of arrivals in ``[0, duration_s)`` at ``rate`` req/s with inter-arrival CV ``cv``.

    Gaps are Gamma distributed (shape ``1/cv**2``, scale ``1/(rate*shape)``; ``cv=1`` is
    Poisson). Inside each burst window the rate is multiplied: time is warped so that the
    process runs ``rate_multiplier`` times faster there, which keeps the CV of the gaps.
    ``input_len`` / ``output_len`` are :class:`LengthDist` or ``(mean, median)`` tuples.
    """
    for arg, value in (("duration_s", duration_s), ("rate", rate), ("cv", cv)):
        if not value > 0:
            raise ValueError(f"{arg} must be > 0, got {value}")
    in_dist, out_dist = _dist(input_len), _dist(output_len)
    lengths = random.Random(f"{seed}/lengths")
    requests = [TraceRequest(t, in_dist.sample(lengths), out_dist.sample(lengths))
                for t in _arrivals(duration_s, rate, cv, random.Random(f"{seed}/arrivals"), bursts)]
    return Trace(requests, name=name or f"gamma(rate={rate},cv={cv},seed={seed})")


def _dist(spec: LengthSpec) -> LengthDist:
    return spec if isinstance(spec, LengthDist) else LengthDist(*spec)


def _arrivals(duration_s: float, rate: float, cv: float, rng: random.Random,
              bursts: Sequence[BurstWindow]) -> Iterator[float]:
    """Arrival times: a Gamma renewal process in 'operational' time, mapped onto real time."""
    shape = 1.0 / cv ** 2
    scale = 1.0 / (rate * shape)
    segments = _segments(duration_s, bursts)
    seg = 0
    op = 0.0       # operational time of the next arrival; the first request arrives at 0
    op_start = 0.0  # operational time at the start of segments[seg]
    while True:
        start, end, mult = segments[seg]
        # One operational second inside a segment is 1/mult real seconds, so the
        # segment runs mult times the base rate.
        while op >= op_start + (end - start) * mult:
            op_start += (end - start) * mult
            seg += 1
            if seg == len(segments):
                return
            start, end, mult = segments[seg]
        yield start + (op - op_start) / mult
        op += rng.gammavariate(shape, scale)


def _segments(duration_s: float, bursts: Sequence[BurstWindow]) -> list[tuple[float, float, float]]:
    """``[0, duration_s)`` cut into (start, end, rate multiplier) pieces, 1.0 outside bursts."""
    segments: list[tuple[float, float, float]] = []
    t = 0.0
    for b in sorted(bursts, key=lambda b: b.start_s):
        if b.start_s < t:
            raise ValueError(f"bursts overlap at {b.start_s} s")
        if b.start_s >= duration_s:
            break
        if b.start_s > t:
            segments.append((t, b.start_s, 1.0))
        t = min(b.end_s, duration_s)
        segments.append((b.start_s, t, b.rate_multiplier))
    if t < duration_s:
        segments.append((t, duration_s, 1.0))
    return segments


def multi_turn_chat(duration_s: float, session_rate: float, seed: int, turns: int = 3, system_blocks: int = 4,
                    turn_blocks: int = 1, think_s: float = 5.0, output_len: LengthSpec = LengthDist(48, 40),
                    cv: float = 1.0, bursts: Sequence[BurstWindow] = (), block_tokens: int = 512,
                    name: str | None = None) -> Trace:
    """Chat sessions over one system prompt, as a Mooncake-style trace (``block_hashes``).

    Sessions start as a Gamma renewal process at ``session_rate`` per second (with the
    ``bursts``); every prompt begins with the same ``system_blocks`` blocks, and turn t+1's
    prompt is turn t's blocks plus ``turn_blocks`` new ones (the answer and the next user
    message, as a block of its own: the trace cannot know the model's answer, so only the
    earlier prompts are shared, as in Mooncake's traces). Open loop, like every trace here:
    turn t+1 is due an exponential think time (mean ``think_s``) after turn t is due, not
    after its answer.
    """
    for arg, value in (("duration_s", duration_s), ("session_rate", session_rate), ("think_s", think_s)):
        if not value > 0:
            raise ValueError(f"{arg} must be > 0, got {value}")
    if turns < 1 or system_blocks < 0 or turn_blocks < 1:
        raise ValueError("multi_turn_chat needs turns >= 1, system_blocks >= 0 and turn_blocks >= 1")
    out_dist, lengths, think = _dist(output_len), random.Random(f"{seed}/lengths"), random.Random(f"{seed}/think")
    next_id, requests = system_blocks, []
    for start in _arrivals(duration_s, session_rate, cv, random.Random(f"{seed}/arrivals"), bursts):
        hashes, t = tuple(range(system_blocks)), start
        for _ in range(turns):
            hashes += tuple(range(next_id, next_id + turn_blocks))
            next_id += turn_blocks
            requests.append(TraceRequest(t, len(hashes) * block_tokens, out_dist.sample(lengths),
                                         block_hashes=hashes))
            t += think.expovariate(1.0 / think_s)
    return Trace(requests, name=name or f"chat(sessions/s={session_rate},turns={turns},seed={seed})")


def write_mooncake(trace: Trace, path) -> None:
    """``trace`` as Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids."""
    with open(path, "w", encoding="utf-8") as f:
        for r in trace:
            f.write(json.dumps({"timestamp": round(r.arrival_s * 1000), "input_length": r.input_len,
                                "output_length": r.output_len, "hash_ids": list(r.block_hashes)}) + "\n")


CHAT_BURSTS = (BurstWindow(20.0, 35.0, 4.0),)
"""The chat trace's burst: four times the session rate for 15 s of its 60."""

