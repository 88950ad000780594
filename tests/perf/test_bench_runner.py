"""perf.bench: presets and their validation, the CLI's overrides, the request stream, the
``/admin/state`` sampling, and one end-to-end smoke run (2 ranks, tiny model, 2 policies)."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest

from perf import bench
from perf.bench_presets import CPU, GPU, MAX_RANKS, PRESETS, BenchPreset, rank_limit, validate_preset
from perf.bench_records import read_events_csv, read_requests_csv, read_samples_csv
from tests.deps import require
from tests.mpi_util import requires_mpirun
from tests.perf.bench_helpers import tiny_preset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tokenizer_of(store: Path):
    from engines.store import EngineStore
    from engines.tokenizer import Tokenizer

    return Tokenizer(EngineStore(store).tokenizer_dir)


# --- presets --------------------------------------------------------------------------------------


def test_presets_cover_every_setting():
    assert set(PRESETS) == {"cpu", "cpu-chat", "cpu-tp", "gpu"}
    chat = PRESETS["cpu-chat"]
    assert chat.trace_path().exists() and (chat.ranks, chat.device_memory) == (CPU.ranks, CPU.device_memory)
    tp = PRESETS["cpu-tp"]  # the cpu preset's stream on two TP2 instances, the policies TP instances run
    assert tp.trace == CPU.trace and tp.ranks == 4 and tp.serve_args[:2] == ("--tp", "2")
    assert tp.policies == ("kunserve", "vllm", "oracle") and tp.store == "stores/cpu-tp"
    assert (CPU.ranks, CPU.store, CPU.device_memory, CPU.device) == (4, "stores/smollm2", "560MiB", "cpu")
    assert CPU.policies == ("kunserve", "vllm", "swap", "llumnix", "oracle")
    assert CPU.trace.endswith("AzureLLMInferenceTrace_code.csv") and CPU.max_input and CPU.max_output
    assert GPU.ranks == 8 and GPU.device == "cuda" and "UNTESTED" in GPU.description
    doc = CPU.to_json()
    assert list(doc) == [f.name for f in fields(BenchPreset)]
    json.dumps(doc)  # JSON-ready, for summary.json


def test_too_many_ranks_is_a_clear_error(tiny_store, small_trace):
    p = tiny_preset(small_trace, tiny_store)
    validate_preset(p, cpu_count=2)  # 2 ranks are fine
    with pytest.raises(ValueError, match=r"9 ranks asked for on device 'cpu', but at most 8 are allowed: "
                                         r"on the CPU at most 4 ranks per core"):
        validate_preset(replace(p, ranks=9), cpu_count=2)
    with pytest.raises(ValueError, match=rf"{MAX_RANKS + 1} ranks asked for, but the benchmark runs at most "
                                         rf"{MAX_RANKS}"):
        validate_preset(replace(p, ranks=MAX_RANKS + 1), cpu_count=1000)
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        validate_preset(replace(p, ranks=0))
    assert rank_limit("cuda", cuda_devices=2) == (2, "each CUDA rank takes one GPU and 2 are visible")


def test_other_preset_errors_are_named_together(tiny_store, tmp_path):
    p = tiny_preset(tmp_path / "missing.csv", tiny_store, device_memory="lots", max_output=0, policies=())
    with pytest.raises(ValueError) as info:
        validate_preset(p, cpu_count=2)
    message = str(info.value)
    for part in ("missing.csv does not exist", "device_memory", "max_output must be >= 1", "no policies"):
        assert part in message


def test_cli_rejects_too_many_ranks_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--preset", "cpu", "--ranks", "100", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: 100 ranks asked for" in err and f"at most {MAX_RANKS}" in err
    assert not (tmp_path / "out").exists()


def test_cli_flags_override_preset_fields(tmp_path):
    args = bench.build_parser().parse_args([
        "--preset", "cpu", "--out", str(tmp_path), "--ranks", "2", "--max-output", "8", "--upscale", "0.5",
        "--slo-ttft-ms", "1500", "--slo-tpot-ms", "80", "--policies", "vllm,kunserve", "--seed", "7",
        "--window", "10", "20", "--serve-arg=--page-size=32", "--serve-arg", "--threads 1", "--limit", "5",
        "--store", str(tmp_path)])
    p, overrides = bench.config_from_args(args)
    assert (p.name, p.ranks, p.max_output, p.upscale, p.seed, p.limit) == ("cpu", 2, 8, 0.5, 7, 5)
    assert (p.slo_ttft_s, p.slo_tpot_s) == (1.5, 0.08)
    assert p.policies == ("vllm", "kunserve")
    assert (p.window_start_s, p.window_end_s) == (10.0, 20.0)
    assert p.serve_args == CPU.serve_args + ("--page-size=32", "--threads", "1")
    assert p.store == str(tmp_path.resolve())
    for name in ("trace", "max_input", "device_memory", "time_scale", "drain_timeout_s"):
        assert getattr(p, name) == getattr(CPU, name)
        assert name not in overrides
    assert overrides["ranks"] == 2 and overrides["serve_args"] == list(p.serve_args)


def test_window_s_flag_replaces_an_explicit_window(tmp_path):
    args = bench.build_parser().parse_args(["--trace", "t.csv", "--window-s", "30", "--out", str(tmp_path)])
    base = replace(CPU, window_start_s=5.0, window_end_s=9.0)
    p = replace(base, **bench.overrides_from_args(args))
    assert (p.window_s, p.window_start_s, p.window_end_s) == (30.0, None, None)
    assert p.trace == str(Path("t.csv").resolve())


# --- the request stream ---------------------------------------------------------------------------


def test_request_stream_is_deterministic_with_exact_prompt_lengths(tiny_store, small_trace, tmp_path):
    tok = tokenizer_of(tiny_store)
    p = tiny_preset(small_trace, tiny_store, upscale=1.5, seed=3, max_input=48, max_output=12)
    specs = bench.build_requests(p, tok)
    assert specs == bench.build_requests(p, tok)
    assert len(specs) >= 8
    assert [s.arrival_s for s in specs] == sorted(s.arrival_s for s in specs)
    assert len({s.request_id for s in specs}) == len(specs)
    for s in specs:
        assert len(tok.encode(s.prompt, add_special_tokens=True)) == s.input_len <= 48
        assert 1 <= s.output_len <= 12
    other = bench.build_requests(replace(p, seed=4), tok)
    assert [s.prompt for s in other] != [s.prompt for s in specs]
    assert bench.build_requests(replace(p, limit=3), tok) == specs[:3]
    bench.write_requests_jsonl(tmp_path / "requests.jsonl", specs)
    assert bench.read_requests_jsonl(tmp_path / "requests.jsonl") == specs


def test_context_len_caps_prompt_plus_output(tiny_store, small_trace):
    p = tiny_preset(small_trace, tiny_store, max_input=None, max_output=None, input_scale=10.0,
                    output_scale=10.0, context_len=100)
    for s in bench.build_requests(p, tokenizer_of(tiny_store)):
        assert s.input_len + s.output_len <= 100


# --- sampling /admin/state ------------------------------------------------------------------------

STATE = {
    "ranks": [
        {"rank": 0, "weight_bytes": 500, "kv_pages_total": 10, "kv_pages_used": 4, "kv_bytes": 300,
         "device_memory_bytes": 1000},
        {"rank": 1, "weight_bytes": 900, "kv_pages_total": 10, "kv_pages_used": 0, "kv_bytes": 300,
         "device_memory_bytes": 1000},
    ],
    "instances": [{"instance": 0, "ranks": [0, 1], "waiting": 3, "running": 2}],
    "queued": 3,
    "events": [{"event": "drop", "ranks": [0, 1], "time": 1005.5, "requests": 4},
               {"event": "exchange", "ranks": [0, 1], "bytes": 10, "seconds": 0.5}],
    "counters": {"drops": 1},
}


def test_rank_samples_and_new_events_from_admin_state():
    samples = bench.rank_samples("kunserve", 2.0, STATE)
    assert [(s.rank, s.kv_used_blocks, s.kv_total_blocks, s.free_bytes, s.queued, s.running) for s in samples] \
        == [(0, 4, 10, 200, 3, 2), (1, 0, 10, 0, 3, 2)]  # free memory is clipped at 0
    seen: set[str] = set()
    events = bench.new_events("kunserve", 7.0, STATE, seen, t0_wall=1000.0)
    assert [(e.kind, e.t_s) for e in events] == [("drop", 5.5), ("exchange", 7.0)]
    assert json.loads(events[0].detail) == {"ranks": [0, 1], "requests": 4}
    assert bench.new_events("kunserve", 8.0, STATE, seen, t0_wall=1000.0) == []


# --- end to end -----------------------------------------------------------------------------------


@requires_mpirun
def test_smoke_run_two_policies(tiny_store, small_trace, tmp_path, capsys):
    """vllm and kunserve replay the same 6 requests; a policy serve refuses fails alone (exit 1)."""
    require("tritonclient.grpc")
    require("pytriton")  # the bundled tritonserver
    out = tmp_path / "out"
    code = bench.main(["--trace", str(small_trace), "--store", str(tiny_store), "--ranks", "2",
                       "--device", "cpu", "--device-memory", "64MiB", "--policies", "vllm,no-such-policy,kunserve",
                       "--max-input", "64", "--max-output", "16", "--limit", "6", "--drain-timeout-s", "60",
                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1, printed  # one policy failed; the others ran
    assert "[vllm] cluster up in" in printed and "[kunserve] replayed 6 requests in" in printed
    for name in ("requests.jsonl", "requests.csv", "samples.csv", "events.csv", "summary.json", "summary.md",
                 "logs/vllm.log", "logs/kunserve.log"):
        assert (out / name).is_file(), name
    for name in ("ttft_cdf.png", "p99_ttft_over_time.png", "memory_vllm.png", "memory_kunserve.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name

    specs = bench.read_requests_jsonl(out / "requests.jsonl")
    assert len(specs) == 6
    records = read_requests_csv(out / "requests.csv")
    for policy in ("vllm", "kunserve"):
        mine = {r.request_id: r for r in records if r.policy == policy}
        assert set(mine) == {s.request_id for s in specs}
        for s in specs:
            r = mine[s.request_id]
            assert r.ok, r
            assert r.arrival_s == s.arrival_s and r.input_len == s.input_len
            assert r.requested_output_len == s.output_len and 1 <= r.output_len <= s.output_len
            assert r.arrival_s <= r.first_token_s <= r.finish_s and r.token_times_s[0] == r.first_token_s
    samples = read_samples_csv(out / "samples.csv")
    assert {(s.policy, s.rank) for s in samples} == {(p, r) for p in ("vllm", "kunserve") for r in (0, 1)}
    read_events_csv(out / "events.csv")  # well formed (a light load needs no drop)

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"vllm", "kunserve"}
    assert all(s["ok"] == 6 and s["failed"] == 0 for s in summary["policies"].values())
    assert summary["meta"]["failed_policies"] == ["no-such-policy"]
    assert "invalid choice" in summary["meta"]["runs"]["no-such-policy"]["error"]
    assert summary["meta"]["runs"]["vllm"]["status"] == "ok"
    assert "| vllm |" in (out / "summary.md").read_text() and "| kunserve |" in printed
