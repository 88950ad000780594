"""Statistics over benchmark request records: latency percentiles, throughput, SLOs.

Definitions (all per policy, over one run of ``duration_s`` seconds):

* TTFT and E2E percentiles are over *all* requests, a failed request counting as an
  infinite latency: a policy that fails its slowest requests must not get a better tail
  over a smaller set. A percentile that falls on failed requests is ``inf`` (printed
  "failed", written to JSON as the string ``"inf"``), and so is a ratio against a finite
  reference; a ratio of two infinite tails is ``None``. TPOT is over successful requests
  with at least two output tokens (a failed request has no decode speed to count).
  Percentiles are numpy's ``method="linear"``: the value at rank ``p/100 * (n-1)`` of the
  sorted sample, interpolated linearly between neighbours (type 7 of Hyndman & Fan), and
  infinite when the upper neighbour is. ``None`` when there is no sample.
* Throughput counts successful requests and their output tokens, divided by ``duration_s``.
* A request *meets the SLO* when it succeeded, its TTFT <= ``slo.ttft_s`` and its TPOT <=
  ``slo.tpot_s`` (a request with fewer than two output tokens has no TPOT and passes that
  part). SLO attainment is the fraction of *all* requests, failed ones included, that meet
  it; goodput is the number meeting it divided by ``duration_s``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from perf.bench_records import RequestRecord, by_policy

PERCENTILES = (50, 90, 99)
RATIO_PREFIX = "p99_ttft_vs_"


@dataclass(frozen=True)
class SLO:
    """Service-level objective: TTFT and TPOT bounds in seconds."""

    ttft_s: float
    tpot_s: float


@dataclass
class PolicySummary:
    """Aggregate results of one policy over one run; latencies in seconds."""

    policy: str
    duration_s: float
    requests: int
    ok: int
    failed: int
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p90_s: float | None
    e2e_p99_s: float | None
    output_tokens: int
    throughput_tok_s: float
    throughput_req_s: float
    slo_met: int
    slo_attainment: float | None
    goodput_req_s: float
    preemptions: int
    migrations: int


def percentiles(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """P50, P90, P99 of ``values`` by numpy's linear interpolation (``inf`` allowed, for
    failed requests: a percentile whose upper neighbour is infinite is infinite); Nones
    when empty."""
    if len(values) == 0:
        return None, None, None
    a = np.sort(np.asarray(values, dtype=float))
    out = []
    for p in PERCENTILES:
        pos = p / 100 * (len(a) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(math.inf if math.isinf(a[hi]) else float(a[lo] + (a[hi] - a[lo]) * (pos - lo)))
    return out[0], out[1], out[2]


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """True when ``record`` succeeded within both the TTFT and the TPOT bound."""
    if not record.ok:
        return False
    tpot = record.tpot_s
    return record.ttft_s <= slo.ttft_s and (tpot is None or tpot <= slo.tpot_s)


def _latencies(records: list[RequestRecord]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric in ("ttft", "tpot", "e2e"):
        if metric == "tpot":
            values = [r.tpot_s for r in records if r.ok and r.tpot_s is not None]
        else:  # a failed request's TTFT and E2E are infinite
            values = [getattr(r, f"{metric}_s") if r.ok else math.inf for r in records]
        for p, value in zip(PERCENTILES, percentiles(values)):
            out[f"{metric}_p{p}_s"] = value
    return out


def _single_policy(records: list[RequestRecord], policy: str | None) -> str:
    names = {r.policy for r in records}
    if policy is not None:
        names.add(policy)
    if len(names) > 1:
        raise ValueError(f"records mix policies {sorted(names)}; summarize one policy at a time")
    return names.pop() if names else ""


def summarize(records: Iterable[RequestRecord], duration_s: float, slo: SLO,
              policy: str | None = None) -> PolicySummary:
    """Summarize one policy's ``records`` over a run of ``duration_s`` seconds.

    ``policy`` names the summary when ``records`` is empty; records of another policy are
    a ValueError, as is a non-positive duration.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    records = list(records)
    ok = [r for r in records if r.ok]
    met = sum(meets_slo(r, slo) for r in records)
    tokens = sum(r.output_len for r in ok)
    return PolicySummary(
        policy=_single_policy(records, policy), duration_s=duration_s,
        requests=len(records), ok=len(ok), failed=len(records) - len(ok),
        **_latencies(records),
        output_tokens=tokens, throughput_tok_s=tokens / duration_s,
        throughput_req_s=len(ok) / duration_s,
        slo_met=met, slo_attainment=met / len(records) if records else None,
        goodput_req_s=met / duration_s,
        preemptions=sum(r.preemptions for r in records),
        migrations=sum(r.migrations for r in records),
    )


def summarize_all(records: Iterable[RequestRecord], duration_s: float, slo: SLO) -> dict[str, PolicySummary]:
    """:func:`summarize` each policy found in ``records``, in order of first appearance."""
    return {name: summarize(group, duration_s, slo) for name, group in by_policy(records).items()}


def _ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or ref <= 0 or (math.isinf(value) and math.isinf(ref)):
        return None
    return value / ref


def compare(summaries: dict[str, PolicySummary], base: str = "kunserve",
            floor: str = "oracle") -> dict[str, dict[str, float | None]]:
    """Each policy's P99 TTFT divided by ``base``'s and by ``floor``'s.

    Returns ``{policy: {"p99_ttft_vs_<base>": r, "p99_ttft_vs_<floor>": r}}``; a key is
    left out when its reference policy is absent, and a ratio is None when either P99 is
    missing, the reference is zero, or both are infinite (failed requests reach the P99).
    A ratio above 1 means a slower tail than the reference; ``inf`` means this policy's
    P99 falls on failed requests and the reference's does not.
    """
    refs = [name for name in dict.fromkeys((base, floor)) if name in summaries]
    return {
        policy: {RATIO_PREFIX + ref: _ratio(s.ttft_p99_s, summaries[ref].ttft_p99_s) for ref in refs}
        for policy, s in summaries.items()
    }


def fmt_ms(seconds: float | None) -> str:
    """Seconds as milliseconds with about three significant digits; '-' for None, 'failed'
    for an infinite latency (the percentile falls on failed requests)."""
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "failed"
    ms = seconds * 1e3
    if abs(ms) >= 100:
        return f"{ms:.0f}"
    if abs(ms) >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_ratio(value: float | None) -> str:
    if value is not None and math.isinf(value):
        return "inf (failed)"
    return "-" if value is None else f"{value:.2f}x"


_COLUMNS: list[tuple[str, Any]] = [
    ("OK", lambda s: str(s.ok)),
    ("Failed", lambda s: str(s.failed)),
    *[(f"TTFT P{p} (ms)", lambda s, p=p: fmt_ms(getattr(s, f"ttft_p{p}_s"))) for p in PERCENTILES],
    *[(f"TPOT P{p} (ms)", lambda s, p=p: fmt_ms(getattr(s, f"tpot_p{p}_s"))) for p in PERCENTILES],
    *[(f"E2E P{p} (ms)", lambda s, p=p: fmt_ms(getattr(s, f"e2e_p{p}_s"))) for p in PERCENTILES],
    ("Tok/s", lambda s: _fmt(s.throughput_tok_s, ".1f")),
    ("Req/s", lambda s: _fmt(s.throughput_req_s, ".2f")),
    ("SLO att. (%)", lambda s: _fmt(None if s.slo_attainment is None else 100 * s.slo_attainment, ".1f")),
    ("Goodput (req/s)", lambda s: _fmt(s.goodput_req_s, ".2f")),
    ("Preempt.", lambda s: str(s.preemptions)),
    ("Migr.", lambda s: str(s.migrations)),
]


def markdown_table(summaries: dict[str, PolicySummary], ratios: dict[str, dict[str, float | None]]) -> str:
    """A GitHub Markdown table, one row per policy; latencies in ms, ratios as e.g. '2.50x'."""
    ratio_keys = list(dict.fromkeys(k for r in ratios.values() for k in r))
    header = ["Policy", *(h for h, _ in _COLUMNS),
              *(f"P99 TTFT vs {k.removeprefix(RATIO_PREFIX)}" for k in ratio_keys)]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for policy, s in summaries.items():
        mine = ratios.get(policy, {})
        cells = [policy, *(get(s) for _, get in _COLUMNS), *(_fmt_ratio(mine.get(k)) for k in ratio_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary_json(path: str | Path, summaries: dict[str, PolicySummary],
                       ratios: dict[str, dict[str, float | None]], slo: SLO, meta: dict) -> None:
    """Write ``{"meta", "slo", "policies": {name: summary fields}, "ratios"}`` as JSON.

    Latencies stay in seconds; missing values are ``null``, infinite ones (percentiles and
    ratios that fall on failed requests) the string ``"inf"``. ``meta`` must be
    JSON-serializable.
    """
    doc = _finite({
        "meta": meta,
        "slo": asdict(slo),
        "policies": {name: asdict(s) for name, s in summaries.items()},
        "ratios": ratios,
    })
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _finite(value: Any) -> Any:
    """``value`` with every infinite float replaced by the string ``"inf"`` (strict JSON)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
