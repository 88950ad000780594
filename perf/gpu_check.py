"""Every GPU path in one run: tests, numerics, a drop and restore, and timings, one table.

    python -m perf.gpu_check --out runs/gpu_check            # on a CUDA host (about 5-8 min on an H100)
    python -m perf.gpu_check --out /tmp/gc --device cpu      # the script's own logic, on a CPU

Nothing is downloaded: the models are made on the spot (``build_scripts.sources.tiny``),
the tiny one (6 layers) and a medium one of about 380 MB in float32 (8 layers of width
1024), each as a Hugging Face directory and an engine store.

1. ``pytest -m gpu``: the suite's GPU tests (CUDA numerics, the virtual-memory pool at the
   real granularity, the remapped rank engine, swap, the two-rank drop on one GPU).
2. Numerics of the medium model against transformers on the same device, 24 greedy
   tokens: float32 (tokens equal, largest logit difference) and bfloat16 (decode in bf16
   runs; tokens equal up to the first bf16 divergence, the logits' cosine until then).
3. A drop and restore on one device: two ranks, the ``mpi`` transport, ``--kv-extension
   remap``; requests in flight across the drop and the restore come out token-identical to
   a run without either. From the cluster's own events: the remap's rate (weight bytes
   remapped onto the KV pool per second), the live KV exchange's and the weight pull's.
4. Engine against transformers on the same device: prefill and decode tokens/s
   (``perf.bench_engine``), bfloat16 on CUDA.

Each check is a row of the summary (``summary.md`` and ``summary.json`` under ``--out``);
the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from perf.hf_reference import greedy_with_logits
from perf.mpi_launch import REPO_ROOT

GPU_TESTS = ("tests/engines/test_cuda_numerics.py", "tests/engines/test_tensor_parallel.py",
             "tests/engines/test_vmm.py", "tests/engines/test_rank_engine_remap.py",
             "tests/orchestrator/core/test_swap.py", "tests/orchestrator/cluster/test_drop_restore_gpu.py",
             "tests/orchestrator/transport")
DECODE_TOKENS = 24
PROMPTS = [f"Request {i} about the pipeline: " + "stages and pages " * (i % 4) for i in range(8)]


@dataclass
class Row:
    check: str
    ok: bool
    result: str
    seconds: float


def medium_spec():
    from build_scripts.sources.tiny import TinySpec

    return TinySpec(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=8, seed=7)


def build(root: Path, spec, splits=(1, 2)) -> tuple[Path, Path]:
    from build_scripts.sources.hf_dir import open_hf_dir
    from build_scripts.sources.tiny import write_tiny_hf_dir
    from build_scripts.writer import write_store

    hf_dir = write_tiny_hf_dir(root / "hf", spec)
    write_store(open_hf_dir(hf_dir), root / "store", list(splits), progress=False)
    return hf_dir, root / "store"


def timed(check: str, fn) -> list[Row]:
    t0 = time.perf_counter()
    try:
        rows = fn()
    except Exception as exc:  # noqa: BLE001 - one failed check is a row, not the end of the run
        return [Row(check, False, f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - t0)]
    for r in rows:
        r.seconds = time.perf_counter() - t0
    return rows


# ----------------------------------------------------------------------------- 1. the suite's GPU tests

def gpu_tests(out: Path) -> list[Row]:
    xml = out / "gpu_tests.xml"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", f"--junitxml={xml}", *GPU_TESTS],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=420)
    (out / "gpu_tests.log").write_text(res.stdout + res.stderr)
    import xml.etree.ElementTree as ET

    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    ok = res.returncode == 0 and n - skip > 0
    return [Row("pytest -m gpu", ok, f"{n - fail - err - skip} passed, {fail + err} failed, {skip} skipped"
                + (f"; failed: {', '.join(failed[:5])}" if failed else ""), 0.0)]


# ----------------------------------------------------------------------------- 2. numerics

def numerics(hf_dir: Path, store: Path, device: str) -> list[Row]:
    import transformers

    from orchestrator.core.config import EngineConfig
    from orchestrator.core.llm_engine import LLMEngine

    rows = []
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        engine = LLMEngine(EngineConfig(engine_dir=store, device=device, dtype=name, page_size=16, pp_size=2))
        ids = engine.tokenizer.encode("The GPU check compares the engine with the reference, token by token.")
        ours, our_logits = greedy_with_logits(engine, ids, DECODE_TOKENS)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids], device=device), max_new_tokens=DECODE_TOKENS, do_sample=False,
                                 eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        theirs = ref.sequences[0, len(ids):].tolist()
        ref_logits = torch.stack([s[0].float().cpu() for s in ref.logits])
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        upto = min(same + 1, len(ours))  # the logits are comparable until the first divergence, included
        diff = float((our_logits[:upto] - ref_logits[:upto]).abs().max())
        cos = float(torch.nn.functional.cosine_similarity(our_logits[:upto], ref_logits[:upto]).min())
        ok = len(ours) == DECODE_TOKENS and (same == len(ours) and diff < 1e-2 if name == "float32" else cos > 0.99)
        rows.append(Row(f"numerics {name}, pp 2, {DECODE_TOKENS} tokens", ok,
                        f"{same}/{len(ours)} tokens equal; max |dlogit| {diff:.2e}; min cosine {cos:.5f}", 0.0))
        del engine, model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- 3. drop and restore

async def _requests(url: str) -> list[list[int]]:
    import aiohttp

    from perf.cluster_client import complete

    async with aiohttp.ClientSession() as s:
        res = await asyncio.gather(*(complete(s, url, {"prompt": p, "max_tokens": 48, "temperature": 0,
                                                          "ignore_eos": True}) for p in PROMPTS))
    return [r.token_ids for r in res]


async def _cycle(url: str) -> tuple[list[list[int]], int, int]:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        work = asyncio.ensure_future(_requests(url))
        await asyncio.sleep(0.5)
        async with s.post(url + "/admin/drop", json={"group": [0, 1]}) as r:
            drop = r.status
        await asyncio.sleep(0.5)
        async with s.post(url + "/admin/restore", json={}) as r:
            restore = r.status
        return await work, drop, restore


def drop_restore(store: Path, device: str) -> list[Row]:
    from perf.cluster_client import ServingCluster

    args = ("--device", device, "--dtype", "float32", "--kv-extension", "remap", "--transport", "mpi",
            "--max-num-batched-tokens", "64")
    with ServingCluster(2, store, *args, device_memory="1GiB") as cluster:
        baseline = asyncio.run(_requests(cluster.url))
        results, drop, restore = asyncio.run(_cycle(cluster.url))
        events = cluster.state()["events"]
    same = sum(a == b for a, b in zip(results, baseline))
    rows = [Row("drop + restore, 2 ranks, remap, mpi", drop == restore == 200 and same == len(PROMPTS),
                f"drop {drop}, restore {restore}; {same}/{len(PROMPTS)} requests token-identical", 0.0)]
    for kind, what, key in (("weights_dropped", "remap", "remapped"), ("exchange", "KV exchange (while serving)", "bytes"),
                            ("weights_pulled", "weight pull on restore", "bytes")):
        evs = [e for e in events if e["event"] == kind]
        nbytes, secs = sum(e.get(key, 0) for e in evs), sum(e.get("seconds", 0.0) for e in evs)
        rate = f"{nbytes / max(secs, 1e-9) / 2**30:.2f} GiB/s ({nbytes / 2**20:.1f} MiB in {secs * 1e3:.1f} ms)"
        rows.append(Row(what, bool(evs) and (nbytes > 0 or kind == "exchange"), rate if evs else "no event", 0.0))
    return rows


# ----------------------------------------------------------------------------- 4. engine speed

def engine_speed(store: Path, device: str, out: Path) -> list[Row]:
    from perf import bench_engine

    dtype = "bfloat16" if device == "cuda" else "float32"
    json_out = out / "bench_engine.json"
    bench_engine.main(["--engine-dir", str(store), "--device", device, "--dtype", dtype, "--batch-sizes", "1,32",
                       "--reps", "3", "--json-out", str(json_out)])
    rows = []
    for r in json.loads(json_out.read_text()):
        rows.append(Row(f"engine vs transformers, {dtype}, batch {r['batch']}", True,
                        f"prefill {r['engine_prefill']:.0f} vs {r['hf_prefill']:.0f} tok/s ({r['prefill_ratio']:.2f}x); "
                        f"decode {r['engine_decode']:.0f} vs {r['hf_decode']:.0f} tok/s ({r['decode_ratio']:.2f}x)", 0.0))
    return rows


# ----------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu runs the script's logic without a GPU (its figures are then the CPU's)")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out: tests,numerics,drop,speed")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; --device cpu runs the checks' logic on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    hf_dir, store = build(args.out / "medium", medium_spec())
    rows: list[Row] = []
    if "tests" not in skip:
        rows += timed("pytest -m gpu", lambda: gpu_tests(args.out))
    if "numerics" not in skip:
        rows += timed("numerics", lambda: numerics(hf_dir, store, args.device))
    if "drop" not in skip:
        rows += timed("drop + restore", lambda: drop_restore(store, args.device))
    if "speed" not in skip:
        rows += timed("engine speed", lambda: engine_speed(store, args.device, args.out))
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [f"GPU check on {device}, torch {torch.__version__}, medium model {medium_spec()}", "",
             "| check | ok | result | s |", "|:---|:---|:---|---:|"]
    lines += [f"| {r.check} | {'yes' if r.ok else '**no**'} | {r.result} | {r.seconds:.1f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps({"device": device, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
