"""``python -m orchestrator generate``: output format, batch mode, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine

ROOT = Path(__file__).resolve().parents[2]


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "generate", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def generate_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command run in this process (``orchestrator.cli.main``): the bad-input cases
    need no interpreter of their own, and an exception that escaped ``main`` fails the test."""
    import torch

    from orchestrator.cli import main

    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        code = main(["generate", *args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["generate", *args], code, out.out, out.err)


def assert_one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_json_output_matches_the_engine(tiny_store):
    res = generate("--engine-dir", str(tiny_store), "--prompt", "Hello there", "--max-tokens", "9",
                   "--temperature", "0", "--ignore-eos", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"prompt_token_ids", "token_ids", "text"}
    engine = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu"))
    [ref] = engine.generate(["Hello there"], SamplingParams(max_tokens=9, ignore_eos=True))
    assert out["prompt_token_ids"] == ref.prompt_token_ids == engine.tokenizer.encode("Hello there")
    assert out["token_ids"] == ref.token_ids and len(ref.token_ids) == 9
    assert out["text"] == ref.text


def test_batch_mode_runs_prompts_together(tiny_store, tmp_path):
    rows = [{"prompt": "one"}, {"prompt": "two two", "max_tokens": 3},
            {"prompt": "three", "temperature": 0.7, "seed": 11}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = generate("--engine-dir", str(tiny_store), "--prompts-file", str(path), "--max-tokens", "5",
                   "--ignore-eos", "--json")
    assert res.returncode == 0, res.stderr
    outs = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [len(o["token_ids"]) for o in outs] == [5, 3, 5]
    engine = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu"))
    [alone] = engine.generate(["three"], SamplingParams(max_tokens=5, temperature=0.7, seed=11, ignore_eos=True))
    assert outs[2]["token_ids"] == alone.token_ids  # seeded sampling does not depend on the batch


def test_bad_requests(tiny_store, tmp_path, capsys):
    d = str(tiny_store)
    assert_one_line_error(generate_here(capsys, "--engine-dir", d, "--prompt", ""), "prompt is empty")
    assert_one_line_error(generate_here(capsys, "--engine-dir", d, "--prompt", "x" * 600), "context is 512")
    assert_one_line_error(generate_here(capsys, "--engine-dir", d, "--prompt", "x", "--max-tokens", "0"), "max_tokens")
    assert_one_line_error(generate_here(capsys, "--engine-dir", d, "--prompt", "x", "--max-tokens", "-3"), "max_tokens")
    assert_one_line_error(generate_here(capsys, "--engine-dir", d, "--prompt", "x", "--top-p", "0"), "top_p")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    assert_one_line_error(generate_here(capsys, "--engine-dir", d, "--prompts-file", str(bad)), "bad.jsonl:2")


def test_bad_engine_directories(tiny_store, tmp_path, capsys):
    assert_one_line_error(generate_here(capsys, "--engine-dir", str(tmp_path / "none"), "--prompt", "x"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(generate_here(capsys, "--engine-dir", str(empty), "--prompt", "x"), "not an engine store")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_store, corrupt)
    (corrupt / "config.json").write_text("{not json")
    assert_one_line_error(generate_here(capsys, "--engine-dir", str(corrupt), "--prompt", "x"), "corrupt")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_store, truncated)
    rank = truncated / "pp1" / "rank0.safetensors"
    rank.write_bytes(rank.read_bytes()[:1000])
    assert_one_line_error(generate_here(capsys, "--engine-dir", str(truncated), "--prompt", "x"), "rank0.safetensors")

    missing = tmp_path / "missing"
    shutil.copytree(tiny_store, missing)
    shutil.rmtree(missing / "pp1")
    assert_one_line_error(generate_here(capsys, "--engine-dir", str(missing), "--prompt", "x"), "no pp1 split")


def test_store_built_for_another_model(tiny_store, tmp_path, capsys):
    from build_scripts.build_engines import main as build_main

    other = tmp_path / "other"
    assert build_main(["--source", "tiny", "--seed", "9", "--splits", "1", "--out", str(other),
                       "--no-progress"]) == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_store, mixed)
    shutil.rmtree(mixed / "pp1")
    shutil.copytree(other / "pp1", mixed / "pp1")
    assert_one_line_error(generate_here(capsys, "--engine-dir", str(mixed), "--prompt", "x"), "another model")


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"]])
def test_help_explains(args):
    res = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "usage:" in res.stdout


def test_generate_with_tensor_parallelism_gives_the_same_tokens(tmp_path, capsys):
    """``--tp 2`` runs the store's tp2pp1 split as two threads; a store without it is refused."""
    from build_scripts.sources.tiny import TinySpec
    from tests.conftest import build_tiny_store

    _, store = build_tiny_store(tmp_path, TinySpec(), splits=(1,), tp_sizes=(1, 2))
    args = ["--engine-dir", str(store), "--prompt", "Tensor parallel", "--max-tokens", "8", "--json"]
    one, two = generate_here(capsys, *args), generate_here(capsys, *args, "--tp", "2")
    assert one.returncode == two.returncode == 0, (one.stderr, two.stderr)
    assert json.loads(two.stdout)["token_ids"] == json.loads(one.stdout)["token_ids"]
    bad = generate_here(capsys, *args, "--tp", "4")
    assert bad.returncode == 2 and "has no tp4pp1 split" in bad.stderr, bad.stderr
