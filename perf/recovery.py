"""How long a supervised cluster takes to come back from a killed or stopped rank, and
whether the stream in flight lost anything.

    python -m perf.recovery --engine-dir stores/smollm2 --ranks 2 --trials 3

Each trial streams a greedy completion, kills (or SIGSTOPs) a rank once tokens flow, and
measures: the fault to ``/health`` 503, the fault to 200 again, and the stream's longest
gap between two chunks (what its client saw); it checks that the stream's tokens are
those of the same request run without a fault. Medians over the trials are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from pathlib import Path

import aiohttp

from perf.cluster_client import SupervisedCluster, sse_chunks


async def _stream(session: aiohttp.ClientSession, url: str, body: dict, first: asyncio.Event) -> tuple[list, float]:
    tokens: list[int] = []
    last, gap = None, 0.0
    async with session.post(url + "/v1/completions", json=body) as resp:
        async for chunk in sse_chunks(resp):
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            now = time.monotonic()
            gap = max(gap, now - last) if last is not None else gap
            last = now
            tokens += chunk["choices"][0].get("token_ids", [])
            first.set()
    return tokens, gap


async def _trial(c: SupervisedCluster, body: dict, reference: list[int], sig: int, rank: int) -> dict:
    async with aiohttp.ClientSession() as session:
        first = asyncio.Event()
        task = asyncio.create_task(_stream(session, c.url, body, first))
        await asyncio.wait_for(first.wait(), 120)
        os.kill(c.rank_pids()[rank], sig)
        t0 = time.monotonic()
        down = await asyncio.to_thread(c.wait_health, 503, 60)
        await asyncio.to_thread(c.wait_health, 200, 300)
        up = time.monotonic() - t0
        tokens, gap = await task
    return {"down_s": down, "up_s": up, "gap_s": gap, "identical": tokens == reference}


async def _reference(c: SupervisedCluster, body: dict) -> list[int]:
    async with aiohttp.ClientSession() as session:
        tokens, _ = await _stream(session, c.url, body, asyncio.Event())
    return tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--device-memory", default="1GiB")
    p.add_argument("--heartbeat-timeout-s", default="5")
    p.add_argument("--max-tokens", type=int, default=200)
    args = p.parse_args(argv)
    body = {"prompt": "The history of the Roman empire", "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    faults = {"killed (rank 1)": (signal.SIGKILL, 1), "stopped (rank 1, heartbeat)": (signal.SIGSTOP, 1)}
    with SupervisedCluster(args.ranks, args.engine_dir, device_memory=args.device_memory,
                           supervise_args=("--heartbeat-timeout-s", args.heartbeat_timeout_s)) as c:
        reference = asyncio.run(_reference(c, body))
        print(f"| fault | fault to 503 (s) | fault to 200 (s) | stream's longest gap (s) | tokens identical |")
        print("|:---|---:|---:|---:|:---|")
        for name, (sig, rank) in faults.items():
            rows = [asyncio.run(_trial(c, body, reference, sig, rank)) for _ in range(args.trials)]
            med = {k: statistics.median(r[k] for r in rows) for k in ("down_s", "up_s", "gap_s")}
            same = sum(r["identical"] for r in rows)
            print(f"| {name} | {med['down_s']:.2f} | {med['up_s']:.2f} | {med['gap_s']:.2f} | "
                  f"{same} of {len(rows)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
