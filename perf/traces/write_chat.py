"""Write the synthetic multi-turn chat trace (Mooncake JSONL) that ``perf.bench``'s
``cpu-chat`` preset replays: ``python -m perf.traces.write_chat --out FILE``."""

from __future__ import annotations

import argparse

from perf.traces.synthetic import CHAT_BURSTS, multi_turn_chat, write_mooncake


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.traces.write_chat",
                                description="Write a synthetic multi-turn chat trace (Mooncake JSONL).")
    p.add_argument("--out", required=True)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--session-rate", type=float, default=0.25, help="sessions per second outside the burst")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--think-s", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    trace = multi_turn_chat(args.duration_s, args.session_rate, args.seed, turns=args.turns, think_s=args.think_s,
                            bursts=CHAT_BURSTS)
    write_mooncake(trace, args.out)
    print(f"{len(trace)} requests, {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
