"""Where the Triton hop's time goes, segment by segment, with no model in the way.

    python -m perf.triton_hop_breakdown --out runs/triton-hop [--pairs 150] [--gaps-ms 0,80]

``perf.triton_bench`` measures the hop against the real cluster; this script explains it.
For each gap it starts ``perf.fake_ingress`` (the real ingress and Triton relay over a fake
backend whose first token comes after that much idle time) and ``tritonserver`` with this
repository and Triton's own tracing (level ``TIMESTAMPS``), then sends the same paired
requests as ``triton_bench``. Each request's time to first token is split at the stamps
that the client, Triton's trace and the fake ingress take on one clock (CLOCK_MONOTONIC):

through Triton                                    what runs in it
  client sent -> Triton has read it                 client library, gRPC (GRPC_WAITREAD_END)
  -> the backend is called                          Triton's core (COMPUTE_START)
  -> the ingress has admitted it                    Python backend IPC, model.py, relay socket
  -> first token                                    the gap
  -> the response is complete in Triton             relay socket, model.py, Python backend IPC
                                                    (INFER_RESPONSE_COMPLETE)
  -> gRPC has written it                            Triton's gRPC frontend (GRPC_SEND_END)
  -> the client has it                              transport, client library
directly
  client sent -> the ingress has admitted it -> first token -> the client has it

The hop, and its part before and after the first token, are medians of the per-pair
differences. Tracing adds a little to the Triton path; ``triton_bench`` gives the hop
without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.triton.server import TritonConfig, TritonProcess
from perf.cluster_client import free_port
from perf.mpi_launch import REPO_ROOT
from perf.triton_bench import Stamps, one_inside, paired_requests

TRITON_SEGMENTS = ("client -> Triton read", "Triton core -> backend called", "backend -> ingress admitted",
                   "gap (first token)", "ingress -> response complete", "gRPC send", "-> client")
DIRECT_SEGMENTS = ("client -> ingress admitted", "gap (first token)", "ingress -> client")


@dataclass
class GapResult:
    gap_ms: float
    pairs: int
    hop_ms: float
    """Median of the paired TTFT differences (through Triton minus direct)."""
    hop_in_ms: float
    """Median of the paired differences up to the ingress's admission."""
    hop_out_ms: float
    """Median of the paired differences from the first token to the client."""
    triton_us: dict[str, float]
    direct_us: dict[str, float]


def measure_gap(args: argparse.Namespace, gap_ms: float) -> GapResult:
    """Fake ingress and traced Triton for one gap; the paired requests; their segments."""
    out = args.out / f"gap{gap_ms:g}ms"
    out.mkdir(parents=True, exist_ok=True)
    stamps_file, trace_file = out / "ingress-stamps.txt", out / "triton-trace.json"
    for f in (stamps_file, trace_file):
        f.unlink(missing_ok=True)
    relay_dir = Path(tempfile.mkdtemp(prefix="kunserve-hop-"))
    relay = relay_dir / "relay.sock"
    port = free_port()
    ingress = subprocess.Popen(
        [sys.executable, "-m", "perf.fake_ingress", "--port", str(port), "--relay-socket", str(relay),
         "--gap-ms", str(gap_ms), "--stamps", str(stamps_file), "--engine-dir", str(args.engine_dir)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    triton = None
    try:
        if ingress.stdout.readline().strip() != "ready":
            raise SystemExit(f"error: the fake ingress did not start (exit status {ingress.wait()})")
        url = f"http://127.0.0.1:{port}"
        cfg = TritonConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                           model_names=("kunserve",), extra_args=(
                               f"--trace-config=triton,file={trace_file}", "--trace-config=level=TIMESTAMPS",
                               "--trace-config=rate=1", "--trace-config=count=-1"))
        triton = TritonProcess(cfg, url, relay)
        triton.start()
        triton.wait_live()
        triton.load("kunserve")
        pairs = asyncio.run(paired_requests(url, f"127.0.0.1:{cfg.grpc_port}", "kunserve", args.pairs))
    finally:
        if triton is not None:
            triton.stop()  # writes the trace file
        ingress.kill()
        ingress.wait()
        shutil.rmtree(relay_dir, ignore_errors=True)
    return split(gap_ms, pairs, read_stamps(stamps_file), read_trace(trace_file))


def read_stamps(path: Path) -> list[tuple[int, int]]:
    """The fake ingress's (admitted, first token) ns per request."""
    return [tuple(int(v) for v in line.split()) for line in path.read_text().splitlines() if line.strip()]


def read_trace(path: Path) -> list[dict[str, int]]:
    """Triton's trace: per request, each timestamp's first occurrence (the first response's)."""
    if not path.is_file():
        raise SystemExit(f"error: tritonserver wrote no trace to {path} (its log is above)")
    by_id: dict[int, dict[str, int]] = {}
    for entry in json.loads(path.read_text()):
        for ts in entry.get("timestamps", ()):
            by_id.setdefault(entry["id"], {}).setdefault(ts["name"], ts["ns"])
    return [t for t in by_id.values() if "REQUEST_START" in t]


def split(gap_ms: float, pairs: list[tuple[Stamps, Stamps]], stamps: list[tuple[int, int]],
          trace: list[dict[str, int]]) -> GapResult:
    """Each request's segments, matched to the ingress's stamps and Triton's trace by time:
    requests go one at a time, so exactly one of each falls inside a request's window."""
    triton_rows, direct_rows, hop, hop_in, hop_out = [], [], [], [], []
    for (d_sent, d_first), (t_sent, t_first) in pairs:
        d0, d1, t0, t1 = (int(x * 1e9) for x in (d_sent, d_first, t_sent, t_first))
        d_admit, d_token = one_inside(stamps, d0, d1, key=lambda s: s[0])
        t_admit, t_token = one_inside(stamps, t0, t1, key=lambda s: s[0])
        tr = one_inside(trace, t0, t1, key=lambda t: t["REQUEST_START"])
        triton_rows.append((tr["GRPC_WAITREAD_END"] - t0, tr["COMPUTE_START"] - tr["GRPC_WAITREAD_END"],
                            t_admit - tr["COMPUTE_START"], t_token - t_admit,
                            tr["INFER_RESPONSE_COMPLETE"] - t_token,
                            tr["GRPC_SEND_END"] - tr["INFER_RESPONSE_COMPLETE"], t1 - tr["GRPC_SEND_END"]))
        direct_rows.append((d_admit - d0, d_token - d_admit, d1 - d_token))
        hop.append((t1 - t0) - (d1 - d0))
        hop_in.append((t_admit - t0) - (d_admit - d0))
        hop_out.append((t1 - t_token) - (d1 - d_token))
    return GapResult(gap_ms, len(pairs), statistics.median(hop) / 1e6, statistics.median(hop_in) / 1e6,
                     statistics.median(hop_out) / 1e6, _medians_us(TRITON_SEGMENTS, triton_rows),
                     _medians_us(DIRECT_SEGMENTS, direct_rows))


def _medians_us(names: tuple[str, ...], rows: list[tuple[int, ...]]) -> dict[str, float]:
    return {name: statistics.median(col) / 1e3 for name, col in zip(names, zip(*rows))}


def summary_markdown(results: list[GapResult]) -> str:
    head = "| segment | " + " | ".join(f"gap {r.gap_ms:g} ms" for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]

    def row(label: str, values: list[float], fmt: str = "{:.0f} µs") -> None:
        lines.append(f"| {label} | " + " | ".join(fmt.format(v) for v in values) + " |")

    for name in TRITON_SEGMENTS:
        row(f"through Triton: {name}", [r.triton_us[name] for r in results])
    for name in DIRECT_SEGMENTS:
        row(f"direct: {name}", [r.direct_us[name] for r in results])
    row("**hop** (paired TTFT difference)", [r.hop_ms for r in results], "**{:.2f} ms**")
    row("hop before the ingress admits", [r.hop_in_ms for r in results], "{:.2f} ms")
    row("hop after the first token", [r.hop_out_ms for r in results], "{:.2f} ms")
    return f"Medians of {results[0].pairs} paired requests per gap (Triton tracing on).\n\n" + "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.triton_hop_breakdown", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for the stamps, traces and summary")
    p.add_argument("--pairs", type=int, default=150, help="paired requests per gap (default: 150)")
    p.add_argument("--gaps-ms", default="0,80",
                   help="idle time before each token, comma-separated (default: 0,80; 80 ms is about "
                        "the demo model's prefill here)")
    p.add_argument("--engine-dir", type=Path, default=REPO_ROOT / "stores" / "smollm2",
                   help="store whose tokenizer the fake ingress uses")
    args = p.parse_args(argv)
    args.gaps_ms = [float(g) for g in args.gaps_ms.split(",")]
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = [measure_gap(args, gap) for gap in args.gaps_ms]
    md = summary_markdown(results)
    (args.out / "summary.md").write_text(md)
    (args.out / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
