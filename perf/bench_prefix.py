"""Prefix caching on a multi-turn chat workload: caching off, on, and on with prefix-aware
dispatch, side by side in one run.

    python -m perf.bench_prefix --out runs/prefix [--store stores/smollm2] [--ranks 4]

The workload (synthetic, seeded): ``--sessions`` conversations share one system prompt;
each has ``--turns`` turns, and turn t's prompt is turn t-1's prompt, its answer and a new
user message (token ids, so a turn's prefix is exactly the previous turn's tokens).
Sessions start staggered and wait ``--think-s`` between turns (a closed loop: a turn is
sent when the previous answer is in). Every configuration replays the same sessions on
a fresh cluster (``--policy vllm``, replicas only).

Reported per configuration: TTFT P50/P99 (client-side, streamed), the prompt tokens the
cluster prefilled (prompt tokens less the cached ones it reported in
``usage.prompt_tokens_details``), and the hit rate against two ideals. Both count, for each
prompt, the tokens it shares with the KV of an earlier request (its prompt and its answer
but the last token, which no engine feeds back), in whole pages and short of the prompt's
last token, as if no cache ever evicted or waited:

- ``ideal``: over every earlier request (one cache for the whole cluster): what the
  stream allows;
- ``placed``: over the earlier requests on the instance that served this one (the request
  log's ``instance``): what the run's placement allows. ``hit / placed`` is the cache's own
  share (it loses the rest to eviction, or to requests that overlap, since a prefix is
  shared only once it is computed); ``placed / ideal`` is what dispatch leaves, each
  instance computing what another holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from perf.cluster_client import ServingCluster
from perf.mpi_launch import REPO_ROOT


@dataclass(frozen=True)
class Workload:
    sessions: int = 8
    turns: int = 4
    system_tokens: int = 384
    user_tokens: int = 32
    answer_tokens: int = 24
    think_s: float = 1.0
    stagger_s: float = 0.5
    seed: int = 0


@dataclass
class Turn:
    session: int
    turn: int
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    cached: int = 0
    ttft_s: float = 0.0
    request_id: str = ""


CONFIGS = {"off": ("caching off, least_loaded", ("--no-enable-prefix-caching",), "least_loaded"),
           "on": ("caching on, least_loaded", (), "least_loaded"),
           "prefix_aware": ("caching on, prefix_aware", (), "prefix_aware")}


def token_text(rng: random.Random, n: int, vocab: int) -> list[int]:
    """``n`` token ids away from the special ones at the start of the vocabulary."""
    return [rng.randrange(256, vocab) for _ in range(n)]


async def run_session(session: aiohttp.ClientSession, url: str, w: Workload, s: int, system: list[int],
                      vocab: int, turns: list[Turn]) -> None:
    rng = random.Random(w.seed * 1000 + s)
    await asyncio.sleep(s * w.stagger_s)
    history: list[int] = list(system)
    for t in range(w.turns):
        turn = Turn(s, t, history + token_text(rng, w.user_tokens, vocab))
        await complete(session, url, turn, w.answer_tokens)
        turns.append(turn)
        history = turn.prompt + turn.output
        await asyncio.sleep(w.think_s)  # the user reads and types: simulated think time, no compute stands in


async def complete(session: aiohttp.ClientSession, url: str, turn: Turn, max_tokens: int) -> None:
    body = {"prompt": turn.prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"session {turn.session} turn {turn.turn}: {r.status} {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            turn.request_id = chunk["id"]
            for choice in chunk["choices"]:
                if choice["token_ids"] and not turn.output:
                    turn.ttft_s = time.perf_counter() - t0
                turn.output.extend(choice["token_ids"])
            if chunk.get("usage"):
                turn.cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def _shared(held: list[int], prompt: list[int]) -> int:
    n = 0
    while n < min(len(held), len(prompt)) and held[n] == prompt[n]:
        n += 1
    return n


def ideal_hits(turns: list[Turn], page: int, log: list[dict] | None = None) -> int:
    """Tokens each prompt shares with an earlier request's KV (its prompt and answer but the
    last token), in whole pages, short of the prompt's last token; with ``log`` (the request
    log), only earlier requests on the same instance count."""
    where = {r["id"]: r.get("instance") for r in log} if log is not None else {}
    order = sorted(turns, key=lambda x: (x.turn, x.session))  # a turn's predecessors come before it
    total = 0
    for k, t in enumerate(order):
        earlier = [p for p in order[:k] if log is None or where[p.request_id] == where[t.request_id]]
        best = max((_shared(p.prompt + p.output[:-1], t.prompt) for p in earlier), default=0)
        total += min(best, len(t.prompt) - 1) // page * page
    return total


def replay(store: Path, ranks: int, w: Workload, args: tuple[str, ...], dispatch: str, page: int,
           device_memory: str, log_path: Path) -> tuple[list[Turn], list[dict]]:
    from engines.store import EngineStore
    from orchestrator.ingress.request_log import read_request_log

    vocab = EngineStore(store).config.vocab_size
    system = token_text(random.Random(w.seed), w.system_tokens, vocab)
    log_path.unlink(missing_ok=True)
    with ServingCluster(ranks, store, "--dispatch", dispatch, "--page-size", str(page), "--request-log", str(log_path),
                        *args, device_memory=device_memory) as cluster:
        turns: list[Turn] = []

        async def go():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
                await asyncio.gather(*(run_session(s, cluster.url, w, i, system, vocab, turns)
                                       for i in range(w.sessions)))
        asyncio.run(go())
    return turns, read_request_log(log_path)


def summarize(name: str, turns: list[Turn], log: list[dict], page: int) -> dict:
    ttft = sorted(t.ttft_s * 1e3 for t in turns)
    prompt = sum(len(t.prompt) for t in turns)
    cached = sum(t.cached for t in turns)
    ideal = ideal_hits(turns, page)
    placed = ideal_hits(turns, page, log)
    return {"config": name, "requests": len(turns), "ttft_p50_ms": statistics.median(ttft),
            "ttft_p99_ms": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], "prompt_tokens": prompt,
            "prefilled_tokens": prompt - cached, "hit_rate": cached / prompt, "ideal_hit_rate": ideal / prompt,
            "placed_hit_rate": placed / prompt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--store", type=Path, default=REPO_ROOT / "stores" / "smollm2")
    p.add_argument("--ranks", type=int, default=4, help="replicas (one rank each)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--device-memory", default="1GiB", help="per rank: enough that nothing is evicted")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"which to run, in order, the first the baseline of the ratios (of {', '.join(CONFIGS)})")
    for f in Workload.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    w = Workload(**{k: getattr(args, k) for k in Workload.__dataclass_fields__})
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    for name, extra, dispatch in (CONFIGS[c] for c in args.configs.split(",")):
        turns, log = replay(args.store, args.ranks, w, extra, dispatch, args.page_size, args.device_memory,
                            args.out / f"requests-{len(rows)}.jsonl")
        rows.append(summarize(name, turns, log, args.page_size))
        raw[name] = [asdict(t) | {"prompt": len(t.prompt), "output": len(t.output)} for t in turns]
        print(f"{name}: {rows[-1]}", flush=True)
    base = rows[0]
    lines = [f"{w}, {args.ranks} replicas, page {args.page_size}, store {args.store.name}", "",
             "| config | TTFT P50 (ms) | TTFT P99 (ms) | prefilled tokens | hit rate | placed | ideal "
             "| hit / placed | hit / ideal | P50 vs off | P99 vs off |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        of_placed = f"{r['hit_rate'] / r['placed_hit_rate']:.1%}" if r["hit_rate"] else "-"
        of_ideal = f"{r['hit_rate'] / r['ideal_hit_rate']:.1%}" if r["hit_rate"] else "-"
        lines.append(f"| {r['config']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['prefilled_tokens']} "
                     f"| {r['hit_rate']:.1%} | {r['placed_hit_rate']:.1%} | {r['ideal_hit_rate']:.1%} "
                     f"| {of_placed} | {of_ideal} | {r['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}x "
                     f"| {r['ttft_p99_ms'] / base['ttft_p99_ms']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps({"workload": asdict(w), "rows": rows, "turns": raw}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
