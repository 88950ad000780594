"""triton_bench's hop arithmetic: the model's time taken out through the request log."""

from __future__ import annotations

import pytest

from perf.triton_bench import time_outside_ingress, transport_diffs


def _record(arrival: float, ttft: float) -> dict:
    return {"arrival": arrival, "first_token": arrival + ttft}


def test_the_models_time_cancels_out_of_each_pair():
    # Pair 1: the model took 80 ms for the direct request and 95 ms for Triton's; the client
    # saw 0.5 ms around the direct one and 1.2 ms around Triton's: the hop is 0.7 ms.
    # Pair 2: 100 ms then 85 ms of model time; 0.4 and 1.3 ms around them: 0.9 ms.
    pairs = [((10.0, 10.0805), (11.0, 11.0962)), ((12.0, 12.1004), (13.0, 13.0863))]
    records = [_record(10.0002, 0.080), _record(11.0004, 0.095), _record(12.0001, 0.100), _record(13.0005, 0.085)]
    assert transport_diffs(pairs, records) == pytest.approx([0.0007, 0.0009], abs=1e-9)


def test_a_window_without_its_record_is_refused():
    pairs = [((10.0, 10.08), (11.0, 11.08))]
    with pytest.raises(SystemExit, match="0 records fall inside one request.s window"):
        transport_diffs(pairs, [_record(10.001, 0.079)])


def test_perf_analyzer_rounds_side_by_side_with_and_without_the_models_time(tmp_path, monkeypatch):
    import json

    from perf import triton_bench
    from perf.triton_bench import _request_stamps, _side_by_side

    # Fixed clocks: the wall clock runs 1e6 s ahead of the monotonic one.
    wall = 1_800_000_000.0
    monkeypatch.setattr(triton_bench.time, "time", lambda: wall + 5.0)
    monkeypatch.setattr(triton_bench.time, "monotonic", lambda: wall + 5.0 - 1e6)
    # One round a side, two requests each; perf_analyzer stamps with the wall clock.
    export = tmp_path / "profile_export.json"
    export.write_text(json.dumps({"experiments": [{"requests": [
        {"timestamp": int(wall * 1e9), "response_timestamps": [int((wall + 0.0812) * 1e9)]},
        {"timestamp": int((wall + 1) * 1e9), "response_timestamps": [int((wall + 1.0902) * 1e9)]},
        {"timestamp": int((wall + 2) * 1e9), "response_timestamps": []}]}]}))
    triton = _request_stamps(export)
    assert len(triton) == 2 and triton[0][0] == pytest.approx(wall - 1e6)
    monkeypatch.undo()
    # The direct side, ten seconds earlier: TTFTs 80.5 and 89.5 ms; the ingress's own 80 and 89.
    direct = [(triton[0][0] - 10, triton[0][0] - 10 + 0.0805), (triton[1][0] - 10, triton[1][0] - 10 + 0.0895)]
    records = [_record(direct[0][0] + 0.0003, 0.080), _record(direct[1][0] + 0.0003, 0.089),
               _record(triton[0][0] + 0.0005, 0.080), _record(triton[1][0] + 0.0005, 0.089)]
    stamps = {"ingress": [direct], "triton": [triton]}

    ttft = _side_by_side(stamps, lambda s: s[1] - s[0], "ttft_")
    assert ttft["ttft_round_diff_p50_ms"] == pytest.approx(0.7, abs=1e-3)  # 85.7 - 85.0
    transport = _side_by_side(stamps, lambda s: time_outside_ingress(s, records), "transport_")
    assert transport["transport_ingress_p50_ms"] == pytest.approx(0.5, abs=1e-3)
    assert transport["transport_round_diff_p50_ms"] == pytest.approx(0.7, abs=1e-3)
