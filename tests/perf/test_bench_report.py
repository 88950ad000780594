"""Benchmark reporting: record CSV I/O, statistics, tables and plots (CPU only, fast)."""

from __future__ import annotations

import json

import pytest

from perf.bench_records import (ClusterEvent, RequestRecord, SecondSample, by_policy, read_events_csv,
                                read_requests_csv, read_samples_csv, write_events_csv,
                                write_requests_csv, write_samples_csv)
from perf.bench_stats import SLO, compare, fmt_ms, markdown_table, summarize, summarize_all, write_summary_json
from tests.deps import require

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rec(policy="kunserve", rid="r0", arrival=0.0, first=0.1, finish=0.5, output_len=5, error=None,
        preemptions=0, migrations=0) -> RequestRecord:
    """A request record with evenly spaced token times between ``first`` and ``finish``."""
    if first is None or output_len == 0:
        times = []
    elif output_len == 1:
        times = [first]
    else:
        times = [first + (finish - first) * i / (output_len - 1) for i in range(output_len)]
    return RequestRecord(policy=policy, request_id=rid, arrival_s=arrival, sent_s=arrival + 0.001,
                         first_token_s=first, token_times_s=times, finish_s=finish, input_len=32,
                         output_len=output_len, requested_output_len=max(output_len, 8),
                         preemptions=preemptions, migrations=migrations, error=error)


# --- records -----------------------------------------------------------------------------

def test_request_properties():
    r = rec(arrival=1.0, first=1.25, finish=2.25, output_len=5)
    assert r.ok
    assert r.ttft_s == pytest.approx(0.25)
    assert r.tpot_s == pytest.approx(0.25)        # 1.0 s over 4 gaps
    assert r.e2e_s == pytest.approx(1.25)


def test_single_token_has_no_tpot_and_failed_is_not_ok():
    assert rec(output_len=1, finish=0.1).tpot_s is None
    failed = rec(first=None, finish=None, output_len=0, error="timeout")
    assert not failed.ok and failed.ttft_s is None and failed.e2e_s is None and failed.tpot_s is None
    assert not rec(error="HTTP 500").ok          # an error counts even after tokens arrived


def test_requests_csv_round_trip_is_exact(tmp_path):
    records = [
        rec(rid="a", arrival=0.1 + 0.2, first=1 / 3, finish=2 / 3, output_len=4, preemptions=2, migrations=1),
        rec(rid="b,\"quoted\"\nline", first=None, finish=None, output_len=0, error="boom, with; punctuation"),
        rec(rid="c", output_len=1, finish=0.1),
    ]
    path = tmp_path / "requests.csv"
    write_requests_csv(path, records)
    back = read_requests_csv(path)
    assert back == records
    assert back[0].arrival_s == 0.1 + 0.2 and back[0].token_times_s[1] == records[0].token_times_s[1]
    assert back[1].token_times_s == [] and back[1].first_token_s is None and back[1].error is not None
    assert back[2].token_times_s == [0.1]


def test_numpy_scalars_are_written_as_plain_numbers(tmp_path):
    np = require("numpy")
    r = rec(arrival=np.float64(0.1), output_len=np.int64(5))
    path = tmp_path / "requests.csv"
    write_requests_csv(path, [r])
    assert "np." not in path.read_text()
    assert read_requests_csv(path)[0].arrival_s == 0.1


def test_samples_and_events_round_trip(tmp_path):
    samples = [SecondSample("kunserve", 0.5 + i / 7, rank, 10 * i, 100, 2 << 30, 1 << 30, 123, i, 2)
               for i in range(3) for rank in range(2)]
    events = [ClusterEvent("kunserve", 1.0 / 3, "drop", "layers 0-11 from rank 1"),
              ClusterEvent("kunserve", 2.5, "restore", "")]
    write_samples_csv(tmp_path / "s.csv", samples)
    write_events_csv(tmp_path / "e.csv", events)
    assert read_samples_csv(tmp_path / "s.csv") == samples
    assert read_events_csv(tmp_path / "e.csv") == events


def test_reading_the_wrong_kind_of_csv_fails(tmp_path):
    write_events_csv(tmp_path / "e.csv", [ClusterEvent("vllm", 1.0, "drop", "")])
    with pytest.raises(ValueError, match="header"):
        read_requests_csv(tmp_path / "e.csv")


def test_by_policy_keeps_first_seen_order():
    groups = by_policy([rec("vllm", "1"), rec("kunserve", "2"), rec("vllm", "3")])
    assert list(groups) == ["vllm", "kunserve"] and [r.request_id for r in groups["vllm"]] == ["1", "3"]


# --- statistics --------------------------------------------------------------------------

SLO_LOOSE = SLO(ttft_s=10.0, tpot_s=10.0)


def test_ttft_percentiles_use_linear_interpolation():
    records = [rec(rid=str(k), first=k / 1000, finish=k / 1000 + 0.1) for k in range(1, 101)]
    s = summarize(records, duration_s=10.0, slo=SLO_LOOSE)
    # numpy linear method: rank p/100 * (n-1) over sorted 1..100 ms.
    assert s.ttft_p50_s == pytest.approx(0.0505)
    assert s.ttft_p90_s == pytest.approx(0.0901)
    assert s.ttft_p99_s == pytest.approx(0.09901)
    assert s.e2e_p50_s == pytest.approx(0.1505)
    assert (s.tpot_p50_s, s.tpot_p99_s) == pytest.approx((0.025, 0.025))  # 0.1 s over 4 gaps


def test_tpot_percentiles_skip_single_token_requests():
    records = [rec(rid=str(k), first=0.0, finish=0.01 * k * 10, output_len=11) for k in range(1, 4)]
    records.append(rec(rid="one", first=0.0, finish=5.0, output_len=1))
    s = summarize(records, duration_s=1.0, slo=SLO_LOOSE)
    # TPOTs 0.01, 0.02, 0.03 s; the one-token request has none.
    assert (s.tpot_p50_s, s.tpot_p90_s, s.tpot_p99_s) == pytest.approx((0.02, 0.028, 0.0298))


def test_slo_attainment_counts_failed_requests_as_misses():
    slo = SLO(ttft_s=0.5, tpot_s=0.1)
    records = [
        *[rec(rid=f"good{i}", first=0.5, finish=0.9, output_len=5, preemptions=1) for i in range(6)],
        rec(rid="slow-first", first=0.6, finish=0.7, output_len=2),              # TTFT miss
        rec(rid="slow-decode", first=0.1, finish=1.1, output_len=5, migrations=3),  # TPOT 0.25 miss
        rec(rid="failed1", first=None, finish=None, output_len=0, error="timeout"),
        rec(rid="failed2", first=0.1, finish=0.2, output_len=3, error="reset"),  # fast, but failed
    ]
    s = summarize(records, duration_s=4.0, slo=slo)
    assert (s.requests, s.ok, s.failed) == (10, 8, 2)
    assert s.slo_met == 6 and s.slo_attainment == pytest.approx(0.6)
    assert s.goodput_req_s == pytest.approx(6 / 4)
    assert s.output_tokens == 6 * 5 + 2 + 5                      # successful requests only
    assert s.throughput_tok_s == pytest.approx(37 / 4) and s.throughput_req_s == pytest.approx(2.0)
    assert (s.preemptions, s.migrations) == (6, 3)


def test_failed_requests_count_as_infinite_ttft_in_percentiles_and_ratios(tmp_path):
    """A policy that fails its slowest requests gets no better tail over a smaller set."""
    good = [rec("kunserve", str(k), first=k / 1000, finish=k / 1000 + 0.1) for k in range(1, 101)]
    # vllm: the same 98 fast requests, and its two slowest failed.
    fails = [rec("vllm", str(k), first=k / 1000, finish=k / 1000 + 0.1) for k in range(1, 99)]
    fails += [rec("vllm", f"dead{i}", first=None, finish=None, output_len=0, error="timeout") for i in range(2)]
    summaries = summarize_all(good + fails, duration_s=10.0, slo=SLO_LOOSE)
    s = summaries["vllm"]
    assert s.ttft_p50_s == pytest.approx(0.0505) and s.ttft_p99_s == float("inf") and s.e2e_p99_s == float("inf")
    assert s.ttft_p90_s == pytest.approx(0.0901)  # below the failed ones: finite
    assert s.tpot_p99_s == pytest.approx(0.025)   # over successful requests only
    ratios = compare(summaries)
    assert ratios["vllm"]["p99_ttft_vs_kunserve"] == float("inf")
    assert ratios["kunserve"]["p99_ttft_vs_kunserve"] == pytest.approx(1.0)
    table = markdown_table(summaries, ratios)
    vllm_row = next(line for line in table.splitlines() if line.startswith("| vllm "))
    assert "| failed |" in vllm_row and "inf (failed)" in vllm_row
    path = tmp_path / "summary.json"
    write_summary_json(path, summaries, ratios, SLO_LOOSE, {})
    doc = json.loads(path.read_text())  # strict JSON: no Infinity literal
    assert doc["policies"]["vllm"]["ttft_p99_s"] == "inf" and doc["ratios"]["vllm"]["p99_ttft_vs_kunserve"] == "inf"
    both = compare({"kunserve": s, "vllm": s})
    assert both["vllm"]["p99_ttft_vs_kunserve"] is None  # two infinite tails: no ratio


def test_summarize_edge_cases():
    empty = summarize([], duration_s=1.0, slo=SLO_LOOSE, policy="oracle")
    assert empty.policy == "oracle" and empty.requests == 0 and empty.ttft_p99_s is None
    assert empty.slo_attainment is None and empty.goodput_req_s == 0
    with pytest.raises(ValueError):
        summarize([rec("vllm"), rec("swap")], duration_s=1.0, slo=SLO_LOOSE)
    with pytest.raises(ValueError):
        summarize([rec()], duration_s=0.0, slo=SLO_LOOSE)


def three_policies() -> dict:
    records = [rec(p, str(k), first=k * scale / 100, finish=k * scale / 100 + 0.2)
               for p, scale in (("kunserve", 2.0), ("vllm", 10.0), ("oracle", 1.0)) for k in range(1, 101)]
    return summarize_all(records, duration_s=10.0, slo=SLO(ttft_s=0.5, tpot_s=0.1))


def test_compare_ratios_against_kunserve_and_oracle():
    summaries = three_policies()
    ratios = compare(summaries)
    assert ratios["vllm"]["p99_ttft_vs_kunserve"] == pytest.approx(5.0)
    assert ratios["vllm"]["p99_ttft_vs_oracle"] == pytest.approx(10.0)
    assert ratios["kunserve"] == pytest.approx({"p99_ttft_vs_kunserve": 1.0, "p99_ttft_vs_oracle": 2.0})
    del summaries["oracle"]
    assert compare(summaries)["vllm"] == pytest.approx({"p99_ttft_vs_kunserve": 5.0})
    assert compare({"vllm": summaries["vllm"]}) == {"vllm": {}}


def test_markdown_table_lists_each_policy_with_numbers():
    summaries = three_policies()
    table = markdown_table(summaries, compare(summaries))
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert len({line.count("|") for line in lines}) == 1
    assert "TTFT P99 (ms)" in lines[0] and "P99 TTFT vs oracle" in lines[0]
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert set(rows) == {"kunserve", "vllm", "oracle"}
    # vllm: TTFT 0.1..10 s, P99 = 9.901 s -> 9901 ms; 5x kunserve, 10x oracle.
    assert "| 9901 |" in rows["vllm"] and "| 5.00x | 10.00x |" in rows["vllm"]
    assert "| 1980 |" in rows["kunserve"] and "| 1.00x | 2.00x |" in rows["kunserve"]


def test_fmt_ms_keeps_about_three_digits():
    assert [fmt_ms(v) for v in (12.3456, 0.12345, 0.0123456, 0.00123456, None)] == \
        ["12346", "123", "12.3", "1.23", "-"]


def test_write_summary_json(tmp_path):
    summaries = three_policies()
    ratios = compare(summaries)
    path = tmp_path / "summary.json"
    write_summary_json(path, summaries, ratios, SLO(0.5, 0.1), {"trace": "burst", "seed": 1})
    doc = json.loads(path.read_text())
    assert doc["meta"] == {"trace": "burst", "seed": 1} and doc["slo"] == {"ttft_s": 0.5, "tpot_s": 0.1}
    assert doc["policies"]["vllm"]["ttft_p99_s"] == pytest.approx(9.901)
    assert doc["policies"]["oracle"]["ok"] == 100
    assert doc["ratios"]["vllm"]["p99_ttft_vs_oracle"] == pytest.approx(10.0)


# --- plots -------------------------------------------------------------------------------

def memory_run():
    samples = []
    for policy in ("kunserve", "vllm"):
        for t in range(20):
            for rank in range(2):
                dropped = policy == "kunserve" and 5 <= t < 15
                weights = (1 << 30) if dropped else (2 << 30)
                kv = (4 << 30) - weights
                samples.append(SecondSample(policy, float(t), rank, min(100, 10 * t), 100 * kv // (2 << 30),
                                            weights, kv, 512 << 20, max(0, t - 8), 4))
    events = [ClusterEvent("kunserve", 5.0, "drop", "half"), ClusterEvent("kunserve", 15.0, "restore", ""),
              ClusterEvent("kunserve", 8.0, "exchange", "kv")]
    return samples, events


def test_plots_write_png_files(tmp_path):
    require("matplotlib")
    from perf.bench_plots import plot_all

    records = [rec(p, str(k), arrival=k / 10, first=k / 10 + 0.01 * k * s, finish=k / 10 + 0.01 * k * s + 0.2)
               for p, s in (("kunserve", 1), ("vllm", 3)) for k in range(1, 101)]
    records.append(rec("vllm", "dead", first=None, finish=None, output_len=0, error="timeout"))
    samples, events = memory_run()
    paths = plot_all(tmp_path / "plots", records, samples, events)
    assert sorted(p.name for p in paths) == ["memory_kunserve.png", "memory_vllm.png",
                                             "p99_ttft_over_time.png", "ttft_cdf.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, p


def test_memory_plot_needs_samples_of_that_policy(tmp_path):
    require("matplotlib")
    from perf.bench_plots import plot_memory_timeline

    samples, events = memory_run()
    with pytest.raises(ValueError, match="swap"):
        plot_memory_timeline(samples, events, tmp_path / "m.png", "swap")


def test_auto_bucket_is_round():
    from perf.bench_plots import auto_bucket_s, p99_ttft_series

    assert auto_bucket_s([rec(arrival=300.0)]) == 10
    assert auto_bucket_s([rec(arrival=50.0)]) == 2
    assert auto_bucket_s([]) == 1.0
    records = [rec(rid=str(k), arrival=float(k), first=k + 0.001 * k, finish=k + 1.0) for k in range(10)]
    mids, p99 = p99_ttft_series(records, bucket_s=5.0)
    assert mids == [2.5, 7.5] and p99 == pytest.approx([3.96, 8.96])


def test_the_ideal_prefix_hit_rate_follows_the_traces_hash_ids():
    from perf.bench import RequestSpec, ideal_hit_rate

    def spec(t, n, hashes):
        return RequestSpec(f"r{t}", float(t), n, 1, "p", None, hashes)

    specs = [spec(0, 20, (1, 2)), spec(1, 30, (1, 2, 3)), spec(2, 10, (4,)), spec(3, 15, (1, 5)), spec(4, 9, (1, 2))]
    # r1 shares blocks 1,2 (16 tokens); r3 shares block 1 (8); r4 shares 1,2 but only 8 tokens of its 9 are
    # servable (its last token is computed); r0 and r2 share nothing.
    assert ideal_hit_rate(specs, 8) == (16 + 8 + 8) / (20 + 30 + 10 + 15 + 9)
    assert ideal_hit_rate([spec(0, 5, ())], 8) is None
