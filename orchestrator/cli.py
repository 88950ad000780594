"""Command line: ``python -m orchestrator generate ...``.

Errors a user can fix are printed as one ``error: ...`` line with exit status 2; they never
show a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from engines.errors import EngineError, RequestError
from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig, parse_bytes
from orchestrator.serve import add_serve_args, run_serve
from orchestrator.supervisor.main import add_supervise_args, run_supervise

logger = logging.getLogger("orchestrator")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine-dir", type=Path, required=True,
                   help="engine store built by python -m build_scripts.build_engines")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--dtype", default=None,
                   help="compute dtype (default: the store's on CPU, bfloat16 on CUDA)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=EngineConfig.kv_cache_memory,
                   help="size of the KV page pool, e.g. 256MiB (default: 256MiB)")
    p.add_argument("--page-size", type=int, default=EngineConfig.page_size,
                   help="tokens per KV page (default: 16)")
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                   help="token budget of one step (default: 512)")
    p.add_argument("--tp", type=int, default=EngineConfig.tp_size,
                   help="tensor-parallel ranks, run as threads in this process over the store's tp{t}pp1 split "
                        "(build_engines --tp; default: 1)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=EngineConfig.enable_prefix_caching,
                   help="share the KV of full pages between prompts with a common prefix (default: on)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default: 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling stream")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator",
                                description="KunServe orchestrator: serve or run a model from an engine store.")
    p.add_argument("--log-level", default=None,
                   help="logging level (default: INFO for serve, WARNING for generate)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the serving cluster (run under mpirun, one rank per device)",
                       description="Start the serving cluster: mpirun -n N python -m orchestrator serve "
                                   "--engine-dir DIR. Every rank serves one device; rank 0 also runs the "
                                   "controller and the OpenAI-compatible HTTP ingress.")
    add_serve_args(s)
    v = sub.add_parser("supervise", help="run the front ends and restart the MPI job when it fails",
                       description="Run the OpenAI ingress and Triton in this process, start `mpirun -n N python "
                                   "-m orchestrator serve SERVE_OPTIONS` as a child, and start it again when a "
                                   "rank dies or hangs: requests wait meanwhile, and those in flight continue "
                                   "on the new job. Example: python -m orchestrator supervise --ranks 4 -- "
                                   "--engine-dir stores/smollm2 --triton")
    add_supervise_args(v)
    g = sub.add_parser("generate", help="offline generation on the store's pp1 engine",
                       description="Generate completions offline. One prompt with --prompt, or a "
                                   "batch with --prompts-file (JSONL: {\"prompt\": ..., optional "
                                   "\"max_tokens\", \"temperature\", \"top_k\", \"top_p\", \"seed\"}), "
                                   "run together with continuous batching.")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts-file", type=Path, help="JSONL file of prompts (batch mode)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message with the model's chat template")
    g.add_argument("--json", action="store_true",
                   help='print {"prompt_token_ids", "token_ids", "text"} as the last line (batch: one line each)')
    _add_engine_args(g)
    _add_sampling_args(g)
    return p


def _sampling(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> SamplingParams:
    o = overrides or {}
    return SamplingParams(
        max_tokens=o.get("max_tokens", args.max_tokens), temperature=float(o.get("temperature", args.temperature)),
        top_k=int(o.get("top_k", args.top_k)), top_p=float(o.get("top_p", args.top_p)),
        seed=o.get("seed", args.seed), ignore_eos=bool(o.get("ignore_eos", args.ignore_eos)))


def _read_prompts(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise RequestError(f"cannot read {path}: {exc.strerror}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise RequestError(f"{path}:{n}: each line needs a string field \"prompt\"")
        rows.append(row)
    if not rows:
        raise RequestError(f"{path} has no prompts")
    return rows


def run_generate(args: argparse.Namespace) -> int:
    from orchestrator.core.llm_engine import LLMEngine

    if args.prompt is not None:
        rows = [{"prompt": args.prompt}]
    else:
        rows = _read_prompts(args.prompts_file)
    # Validate every sampling setting before paying for the model load.
    params = []
    for n, row in enumerate(rows, 1):
        try:
            if not row["prompt"]:
                raise RequestError("prompt is empty")
            params.append(_sampling(args, row))
        except (RequestError, TypeError, ValueError) as exc:
            where = f"prompt {n}: " if args.prompts_file else ""
            raise RequestError(f"{where}{exc}") from None
    engine = LLMEngine(EngineConfig(
        engine_dir=args.engine_dir, device=args.device, dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory, page_size=args.page_size,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
        tp_size=args.tp))
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}])
               if args.chat else r["prompt"] for r in rows]
    reqs = []
    for n, (prompt, sp) in enumerate(zip(prompts, params), 1):
        try:
            reqs.append(engine.make_request(prompt, sp, add_special_tokens=not args.chat))
        except RequestError as exc:
            where = f"prompt {n}: " if args.prompts_file else ""
            raise RequestError(f"{where}{exc}") from None
    for r in reqs:
        engine.add_request(r)
    while engine.scheduler.has_work():
        engine.step()
    for r in reqs:
        c = engine.completion(r)
        if c.error:
            raise RequestError(f"{c.request_id}: {c.error}")
        if args.json:
            print(json.dumps({"prompt_token_ids": c.prompt_token_ids, "token_ids": c.token_ids,
                              "text": c.text}))
        else:
            print(c.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.log_level = args.log_level or ("WARNING" if args.command == "generate" else "INFO")
    if args.command == "serve":
        return run_serve(args)  # configures per-rank logging itself
    if args.command == "supervise":
        return run_supervise(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        return {"generate": run_generate}[args.command](args)
    except (EngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
