"""``python -m perf.profile_cost``: a quick profile of the tiny model writes a usable model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from orchestrator.kunserve.cost_model import CostModel
from perf.sim.host_cost import load_host_profile

ROOT = Path(__file__).resolve().parents[2]


def profile_cost(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perf.profile_cost", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_quick_profile_writes_a_loadable_model(tiny_store, tmp_path):
    out = tmp_path / "tmp.json"
    res = profile_cost("--engine-dir", str(tiny_store), "--quick", "--out", str(out),
                       "--contention", "1,2", "--contention-seconds", "0.3")
    assert res.returncode == 0, res.stderr
    model = CostModel.load(out)
    assert model.layers == 6 and model.threads == 1 and model.dtype == "float32"
    assert model.samples >= 10 and model.r2 is not None
    assert model.step_cost([(64, 0), (1, 100)]) > 0
    assert "r2" in res.stdout and "held out" in res.stdout
    # The simulator's part: every timed step, and two processes timed at once.
    host = load_host_profile(out)
    assert host.batch is not None and host.batch.samples == model.samples
    assert host.batch.step_cost([(1, 100)] * 8) > 0
    crowd = json.loads(out.read_text())["profile"]["contention"]
    assert crowd["processes"] == [1, 2] and all(t > 0 for t in crowd["pass_seconds"])
    assert len(host.efficiency) == 2 and "contention" in res.stdout


def test_contention_counts_must_start_with_one(tiny_store, tmp_path):
    res = profile_cost("--engine-dir", str(tiny_store), "--quick", "--contention", "2,4", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "--contention" in res.stderr


def test_layers_option_profiles_a_prefix_of_the_model(tiny_store, tmp_path):
    out = tmp_path / "tmp.json"
    res = profile_cost("--engine-dir", str(tiny_store), "--quick", "--layers", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert CostModel.load(out).layers == 2


def test_bad_engine_dir_is_one_error_line(tmp_path):
    res = profile_cost("--engine-dir", str(tmp_path / "nope"), "--quick", "--out", str(tmp_path / "x.json"))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: ") and "Traceback" not in res.stderr
    assert not (tmp_path / "x.json").exists()
