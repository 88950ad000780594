"""The store builder's command line: layout, uneven splits, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from engines.mapping import pp_partition
from engines.store import EngineStore

ROOT = Path(__file__).resolve().parents[2]


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "build_scripts.build_engines", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_pp_partition_is_uneven_with_larger_stages_first():
    assert pp_partition(30, 4) == [8, 8, 7, 7]
    assert pp_partition(30, 1) == [30]
    assert pp_partition(6, 4) == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="needs at least 8 layers"):
        pp_partition(6, 8)


def test_tiny_store_layout(tmp_path):
    out = tmp_path / "store"
    res = build("--source", "tiny", "--splits", "1,2,4", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "building store" in res.stderr  # the progress bar
    top = json.loads((out / "config.json").read_text())
    assert top["architecture"] == "LlamaForCausalLM" and top["dtype"] == "float32"
    assert top["kunserve"]["splits"] == [1, 2, 4]
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    for g in (1, 2, 4):
        cfg = json.loads((out / f"pp{g}" / "config.json").read_text())
        m = cfg["mapping"]
        assert (m["world_size"], m["tp_size"], m["pp_size"]) == (g, 1, g)
        assert m["pp_partition"] == pp_partition(6, g)
        for rank, (start, end) in enumerate(m["layer_ranges"]):
            with safe_open(str(out / f"pp{g}" / f"rank{rank}.safetensors"), "pt") as f:
                keys = set(f.keys())
                assert f.metadata()["layer_start"] == str(start)
            layer_ids = {int(k.split(".")[2]) for k in keys if k.startswith("transformer.layers.")}
            assert layer_ids == set(range(end - start))  # only this rank's layers, numbered locally
            assert ("transformer.vocab_embedding.weight" in keys) == (rank == 0)
            assert ("lm_head.weight" in keys) == (rank == g - 1)
            assert ("transformer.ln_f.weight" in keys) == (rank == g - 1)
    store = EngineStore(out)
    assert store.splits == [1, 2, 4]
    weights, layers = store.load_rank(4, 3)
    assert (layers.start, layers.end) == (5, 6) and set(weights.layers) == {5}


def test_refuses_split_larger_than_layer_count(tmp_path):
    res = build("--source", "tiny", "--splits", "1,8", "--out", str(tmp_path / "s"))
    assert res.returncode == 2
    assert "cannot build pp8" in res.stderr and "6" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "s").exists()


def test_refuses_to_overwrite_another_models_store(tmp_path):
    out = tmp_path / "store"
    assert build("--source", "tiny", "--splits", "1", "--out", str(out), "--no-progress").returncode == 0
    res = build("--source", "tiny", "--seed", "1", "--splits", "1", "--out", str(out))
    assert res.returncode == 2
    assert "different model" in res.stderr and "Traceback" not in res.stderr
    # The same model may add splits to its own store.
    res = build("--source", "tiny", "--splits", "2", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert EngineStore(out).splits == [1, 2]


def test_refuses_non_store_directory_and_bad_sources(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    res = build("--source", "tiny", "--out", str(tmp_path / "other"))
    assert res.returncode == 2 and "not an engine store" in res.stderr
    res = build("--source", "nonsense", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "unknown source" in res.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    res = build("--source", str(bad), "--out", str(tmp_path / "y"))
    assert res.returncode == 2 and "not a readable GGUF" in res.stderr
    res = build("--source", "tiny", "--splits", "0,x", "--out", str(tmp_path / "z"))
    assert res.returncode == 2 and "--splits" in res.stderr
