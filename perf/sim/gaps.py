"""``python -m perf.sim.gaps``: inter-token gaps of one policy, real against simulated,
binned by how many requests were decoding cluster-wide at the time (where a step model
misfits shows as the bins where the two medians part).

    python -m perf.sim.gaps --policy oracle --real runs/cpu-real2 --sim runs/sim-cpu

Reads ``requests.csv`` of each directory (``perf.bench`` and ``perf.sim`` write the same
records) and prints one row per bin of 4: the median gap in each and how many gaps it holds.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from perf.bench_records import read_requests_csv

BIN = 4
"""Requests decoding per bin."""


def binned_gaps(token_times: list[list[float]]) -> dict[int, list[float]]:
    """Gap lengths by the bin of requests decoding (first to last token) at the gap's middle."""
    starts = sorted(t[0] for t in token_times)
    ends = sorted(t[-1] for t in token_times)
    bins: dict[int, list[float]] = defaultdict(list)
    for times in token_times:
        for a, b in zip(times, times[1:]):
            mid = (a + b) / 2
            decoding = bisect.bisect(starts, mid) - bisect.bisect(ends, mid)
            bins[decoding // BIN].append(b - a)
    return bins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.sim.gaps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--real", type=Path, required=True, help="a perf.bench output directory")
    ap.add_argument("--sim", type=Path, required=True, help="a perf.sim output directory")
    args = ap.parse_args(argv)
    found = {}
    for name, d in (("real", args.real), ("sim", args.sim)):
        records = [r for r in read_requests_csv(d / "requests.csv") if r.policy == args.policy and r.token_times_s]
        if not records:
            ap.error(f"{d / 'requests.csv'} has no records of policy {args.policy!r}")
        found[name] = binned_gaps([r.token_times_s for r in records])
    print("| decoding | real median gap (ms) | real gaps | simulated median gap (ms) | simulated gaps |")
    print("|---|---:|---:|---:|---:|")
    for b in sorted(set(found["real"]) | set(found["sim"])):
        cells = []
        for name in ("real", "sim"):
            g = found[name].get(b, [])
            cells += [f"{statistics.median(g) * 1e3:.0f}" if g else "-", str(len(g))]
        print(f"| {b * BIN}-{b * BIN + BIN - 1} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
