"""``python -m perf.sim`` on a tiny preset writes perf.bench's reports for every simulated
policy, kunserve's drops and restores included, and refuses what it does not simulate."""

from __future__ import annotations

import json

import pytest

from perf.sim.__main__ import main, run
from tests.perf.bench_helpers import tiny_preset
from tests.perf.sim.sim_helpers import COST


def test_perf_sim_runs_a_preset_and_writes_the_bench_reports(small_trace, tiny_store, tmp_path):
    p = tiny_preset(small_trace, tiny_store)
    text = run(p, "tiny", ["kunserve", "vllm", "swap", "llumnix", "oracle"], COST, tmp_path / "sim")
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert set(summary["policies"]) == {"kunserve", "vllm", "swap", "llumnix", "oracle"} and "| vllm |" in text
    runs = summary["meta"]["runs"]
    assert runs["vllm"]["steps"] > 0 and runs["kunserve"]["ticks"] > 0
    assert runs["kunserve"]["decision_ms_max"] >= runs["kunserve"]["decision_ms_median"] >= 0
    lines = (tmp_path / "sim" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 5 * summary["policies"]["vllm"]["requests"]
    for name in ("requests.csv", "samples.csv", "events.csv", "ttft_cdf.png", "memory_kunserve.png"):
        assert (tmp_path / "sim" / name).is_file(), name


def test_perf_sim_refuses_a_policy_it_does_not_simulate(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "/tmp/unused", "--policies", "vllm,nope"])
    assert "nope" in capsys.readouterr().err


def test_options_of_the_other_kind_of_preset_are_refused_not_ignored(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "/tmp/unused", "--preset", "sim-8xh100-70b", "--step-model", "linear"])
    assert "--step-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", "/tmp/unused", "--preset", "sim-cpu", "--upscale", "2"])
    assert "--upscale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", "/tmp/unused", "--preset", "sim-cpu", "--gpus-per-node", "2"])
    assert "--gpus-per-node" in capsys.readouterr().err


def test_gpus_per_node_must_hold_whole_replicas(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "/tmp/unused", "--preset", "sim-8xh100-70b", "--gpus-per-node", "3"])
    assert "multiple of" in capsys.readouterr().err


def test_fewer_gpus_per_node_put_a_group_s_members_on_two_nodes():
    from perf.sim.gpu_presets import GPU_PRESETS
    import dataclasses

    g = GPU_PRESETS["sim-8xh100-70b"]
    assert g.context("kunserve").fabric.link_kind((0, 1)) == "NVLink"
    split = dataclasses.replace(g, gpus_per_node=2).context("kunserve").fabric
    assert split.link_kind((0, 1)) == "InfiniBand" and split.path(0, 1)[0].name == "rank 0 ib out"
