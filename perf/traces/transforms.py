"""Pure trace transforms: each returns a new :class:`Trace` and leaves its input untouched.

Windows are half-open, ``[start_s, end_s)``. Randomized transforms are deterministic from
their ``seed``.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from perf.traces.model import Trace, TraceRequest


def window(trace: Trace, start_s: float, end_s: float) -> Trace:
    """The requests arriving in ``[start_s, end_s)``, shifted so that ``start_s`` becomes 0."""
    _check_window(start_s, end_s)
    kept = [replace(r, arrival_s=r.arrival_s - start_s) for r in trace.requests
            if start_s <= r.arrival_s < end_s]
    return Trace(kept, name=f"{trace.name}[{start_s:g}s:{end_s:g}s]")


def time_scale(trace: Trace, factor: float) -> Trace:
    """Divide every inter-arrival gap by ``factor``: 2 replays twice as fast, 0.5 half as fast."""
    _check_positive("factor", factor)
    # Scaling absolute times from 0 scales every gap, including the lead-in before the first request.
    scaled = [replace(r, arrival_s=r.arrival_s / factor) for r in trace.requests]
    return Trace(scaled, name=f"{trace.name}*time/{factor:g}")


def upscale(trace: Trace, s: float, seed: int) -> Trace:
    """About ``s`` times the load at the same arrival pattern.

    Each request becomes ``ceil(s)`` copies with its arrival time, each kept with probability
    ``s / ceil(s)``: ``s=1`` is the identity, integer ``s`` multiplies exactly, ``s<1`` samples.
    """
    _check_positive("s", s)
    copies = math.ceil(s)
    keep = s / copies
    rng = random.Random(seed)
    # Integer s keeps every copy; skipping the draws then makes that exact, not just likely.
    out = [r for r in trace.requests for _ in range(copies) if keep >= 1.0 or rng.random() < keep]
    return Trace(out, name=f"{trace.name}*load{s:g}")


def repeat_window(trace: Trace, start_s: float, end_s: float, times: int) -> Trace:
    """Play the requests of ``[start_s, end_s)`` ``times`` times back to back.

    Copy ``k`` (from 0) is shifted by ``k * (end_s - start_s)``; requests after the window are
    shifted by ``(times - 1) * (end_s - start_s)`` so that they follow the last copy.
    """
    _check_window(start_s, end_s)
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
    span = end_s - start_s
    out: list[TraceRequest] = []
    for r in trace.requests:
        if r.arrival_s < start_s:
            out.append(r)
        elif r.arrival_s < end_s:
            out.extend(replace(r, arrival_s=r.arrival_s + k * span) for k in range(times))
        else:
            out.append(replace(r, arrival_s=r.arrival_s + (times - 1) * span))
    return Trace(out, name=f"{trace.name}[{start_s:g}s:{end_s:g}s]x{times}")


def scale_lengths(trace: Trace, input_scale: float = 1.0, output_scale: float = 1.0,
                  max_input: int | None = None, max_output: int | None = None,
                  context_len: int | None = None) -> Trace:
    """Multiply token lengths, round, clip each to ``[1, max]``, then fit ``context_len``.

    When ``input + output`` exceeds ``context_len`` the input is cut first (down to 1 token),
    then the output, so a request keeps as much of its generation as the model allows.
    """
    _check_positive("input_scale", input_scale)
    _check_positive("output_scale", output_scale)
    for arg, value, least in (("max_input", max_input, 1), ("max_output", max_output, 1),
                              ("context_len", context_len, 2)):
        if value is not None and value < least:
            raise ValueError(f"{arg} must be >= {least}, got {value}")
    out = []
    for r in trace.requests:
        inp = _clip(round(r.input_len * input_scale), max_input)
        outp = _clip(round(r.output_len * output_scale), max_output)
        if context_len is not None and inp + outp > context_len:
            inp = max(1, context_len - outp)
            outp = context_len - inp
        out.append(replace(r, input_len=inp, output_len=outp))
    return Trace(out, name=trace.name)


def busiest_window(trace: Trace, length_s: float) -> tuple[float, float]:
    """``(start_s, end_s)`` of the ``length_s``-long window holding the most arrivals.

    Windows start at an arrival (an optimal one always does); ties go to the earliest. O(n).
    """
    _check_positive("length_s", length_s)
    times = [r.arrival_s for r in trace.requests]
    if not times:
        raise ValueError(f"trace {trace.name!r} is empty; it has no busiest window")
    best_start, best_count, hi = times[0], 0, 0
    for lo, t in enumerate(times):
        while hi < len(times) and times[hi] < t + length_s:
            hi += 1
        if hi - lo > best_count:
            best_start, best_count = t, hi - lo
    return best_start, best_start + length_s


def _clip(value: int, most: int | None) -> int:
    value = max(1, value)
    return value if most is None else min(value, most)


def _check_positive(arg: str, value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{arg} must be > 0, got {value}")


def _check_window(start_s: float, end_s: float) -> None:
    if not end_s > start_s:
        raise ValueError(f"end_s must be > start_s, got start_s={start_s}, end_s={end_s}")
