"""PNG plots of a serving benchmark: TTFT distributions, tail latency over time, memory.

matplotlib is imported lazily (with the non-interactive Agg backend) so the rest of the
benchmark runs without it. Each policy keeps one colour across all plots.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from perf.bench_records import ClusterEvent, RequestRecord, SecondSample, by_policy

MIB = 1024 * 1024
MIN_TTFT_MS = 1e-2          # log axes cannot show zero; tiny TTFTs are clipped to this

POLICY_COLORS = {
    "kunserve": "tab:red",
    "vllm": "tab:blue",
    "swap": "tab:orange",
    "llumnix": "tab:purple",
    "oracle": "tab:green",
}
_FALLBACK_COLORS = ["tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]

# Memory layers, bottom to top: (label, colour).
_MEMORY_LAYERS = [
    ("weights", "#4c72b0"),
    ("KV used", "#dd8452"),
    ("KV free", "#f3d3b8"),
    ("other free", "#e5e5e5"),
]
EVENT_STYLES = {
    "drop": {"color": "crimson", "linestyle": "--", "label": "weight drop"},
    "restore": {"color": "forestgreen", "linestyle": "--", "label": "weight restore"},
}


def _pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(policy: str, index: int) -> str:
    return POLICY_COLORS.get(policy, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_ttft_cdf(records_by_policy: Mapping[str, Sequence[RequestRecord]], path: str | Path,
                  slo_ttft_s: float | None = None) -> Path:
    """CDF of TTFT (ms, log x) per policy; returns ``path``.

    The y axis is the fraction of *all* requests, so a policy whose requests failed tops
    out below 1. ``slo_ttft_s`` adds a vertical SLO line.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (policy, records) in enumerate(records_by_policy.items()):
        ttfts = np.sort([r.ttft_s for r in records if r.ok]) * 1e3
        frac = np.arange(1, len(ttfts) + 1) / max(len(records), 1)
        ax.step(np.maximum(ttfts, MIN_TTFT_MS), frac, where="post", color=_color(policy, i),
                label=f"{policy} ({len(ttfts)}/{len(records)} ok)")
    if slo_ttft_s is not None:
        ax.axvline(slo_ttft_s * 1e3, color="black", linestyle=":", label="TTFT SLO")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("TTFT (ms, from scheduled arrival)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF per policy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def auto_bucket_s(records: Iterable[RequestRecord], buckets: int = 30) -> float:
    """A round bucket width (1, 2 or 5 x 10^k s) giving about ``buckets`` buckets over the run."""
    span = max((r.arrival_s for r in records), default=0.0)
    if span <= 0:
        return 1.0
    raw = span / buckets
    scale = 10 ** math.floor(math.log10(raw))
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw)


def p99_ttft_series(records: Iterable[RequestRecord], bucket_s: float) -> tuple[list[float], list[float]]:
    """(bucket mid-times s, P99 TTFT ms) of successful requests by arrival-time bucket."""
    buckets: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.ok:
            buckets[math.floor(r.arrival_s / bucket_s)].append(r.ttft_s)
    keys = sorted(buckets)
    mids = [(k + 0.5) * bucket_s for k in keys]
    return mids, [float(np.percentile(buckets[k], 99)) * 1e3 for k in keys]


def plot_p99_ttft_over_time(records_by_policy: Mapping[str, Sequence[RequestRecord]], path: str | Path,
                            bucket_s: float | None = None) -> Path:
    """P99 TTFT (ms, log y) of requests grouped by arrival time into ``bucket_s`` buckets.

    ``bucket_s`` defaults to :func:`auto_bucket_s` over all records. Failed requests are
    left out of the percentiles. Returns ``path``.
    """
    if bucket_s is None:
        bucket_s = auto_bucket_s(r for rs in records_by_policy.values() for r in rs)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (policy, records) in enumerate(records_by_policy.items()):
        mids, p99 = p99_ttft_series(records, bucket_s)
        ax.plot(mids, np.maximum(p99, MIN_TTFT_MS), marker="o", markersize=3, color=_color(policy, i), label=policy)
    ax.set_yscale("log")
    ax.set_xlabel(f"arrival time (s, {bucket_s:g} s buckets)")
    ax.set_ylabel("P99 TTFT (ms)")
    ax.set_title("P99 TTFT over time per policy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _memory_layers(samples: Sequence[SecondSample]) -> list[list[float]]:
    """MiB per sample of weights, KV used, KV free and other free memory."""
    return [
        [s.weight_bytes / MIB for s in samples],
        [s.kv_used_bytes / MIB for s in samples],
        [(s.kv_bytes - s.kv_used_bytes) / MIB for s in samples],
        [s.free_bytes / MIB for s in samples],
    ]


def _memory_panel(ax, samples: Sequence[SecondSample], events: Sequence[ClusterEvent]) -> None:
    """Stacked memory areas, queue length on a twin axis and event lines on one rank's axes."""
    t = [s.t_s for s in samples]
    ax.stackplot(t, *_memory_layers(samples), labels=[lbl for lbl, _ in _MEMORY_LAYERS],
                 colors=[c for _, c in _MEMORY_LAYERS])
    ax.set_ylabel("MiB")
    ax.margins(x=0)
    for e in events:
        ax.axvline(e.t_s, linewidth=1.2, **EVENT_STYLES[e.kind])
    twin = ax.twinx()
    twin.step(t, [s.queued for s in samples], where="post", color="black", linewidth=1, label="queued requests")
    twin.set_ylabel("queued")
    twin.set_ylim(bottom=0)


def _legend_entries(axes) -> tuple[list, list[str]]:
    """Unique (handles, labels) across ``axes`` in first-seen order."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def plot_memory_timeline(samples: Iterable[SecondSample], events: Iterable[ClusterEvent],
                         path: str | Path, policy: str) -> Path:
    """One panel per rank: stacked weights / KV used / KV free / other free (MiB) over time.

    Weight ``drop`` and ``restore`` events of ``policy`` are vertical lines; the number of
    queued requests is a black line on the right axis. Raises ValueError when ``policy``
    has no samples. Returns ``path``.
    """
    mine = sorted((s for s in samples if s.policy == policy), key=lambda s: (s.rank, s.t_s))
    if not mine:
        raise ValueError(f"no memory samples for policy {policy!r}")
    marks = [e for e in events if e.policy == policy and e.kind in EVENT_STYLES]
    ranks = sorted({s.rank for s in mine})
    plt = _pyplot()
    fig, axes = plt.subplots(len(ranks), 1, sharex=True, squeeze=False, figsize=(10, 1.2 + 2.4 * len(ranks)))
    for ax, rank in zip(axes[:, 0], ranks):
        _memory_panel(ax, [s for s in mine if s.rank == rank], marks)
        ax.set_title(f"rank {rank}", loc="left", fontsize=9)
    axes[-1, 0].set_xlabel("time since start (s)")
    fig.suptitle(f"Device memory per rank - policy: {policy}")
    fig.legend(*_legend_entries(fig.axes), loc="center left", bbox_to_anchor=(0.8, 0.5), fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    return _save(fig, path)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def plot_all(out_dir: str | Path, records: Iterable[RequestRecord], samples: Iterable[SecondSample],
             events: Iterable[ClusterEvent]) -> list[Path]:
    """Write ttft_cdf.png, p99_ttft_over_time.png and memory_<policy>.png into ``out_dir``.

    A memory plot is written for each policy with samples. Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grouped = by_policy(records)
    samples, events = list(samples), list(events)
    paths = [plot_ttft_cdf(grouped, out / "ttft_cdf.png"),
             plot_p99_ttft_over_time(grouped, out / "p99_ttft_over_time.png")]
    for policy in by_policy(samples):
        paths.append(plot_memory_timeline(samples, events, out / f"memory_{_file_safe(policy)}.png", policy))
    return paths
