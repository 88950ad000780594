"""The hop breakdown's bookkeeping: matching stamps to requests and splitting their time."""

from __future__ import annotations

import json

import pytest

from perf.triton_hop_breakdown import read_trace, split, summary_markdown


def _trace_entry(rid: int, **stamps: int) -> list[dict]:
    return [{"id": rid, "timestamps": [{"name": name, "ns": ns}]} for name, ns in stamps.items()]


def test_segments_and_hop_from_one_pair(tmp_path):
    ms = 1_000_000
    # Direct request: sent at 1000 ms, admitted +0.3, token +80, client has it +0.2.
    # Through Triton: sent at 2000 ms; every segment below, in ns.
    t0 = 2000 * ms
    trace = tmp_path / "trace.json"
    entries = [{"id": 7, "model_name": "kunserve"}]
    entries += _trace_entry(7, REQUEST_START=t0 + 150_000, GRPC_WAITREAD_END=t0 + 100_000,
                            COMPUTE_START=t0 + 200_000, INFER_RESPONSE_COMPLETE=t0 + 80_900_000,
                            GRPC_SEND_END=t0 + 81_000_000)
    entries += _trace_entry(7, GRPC_SEND_END=t0 + 160_000_000)  # a later response: not the first's
    trace.write_text(json.dumps(entries))
    stamps = [(1000 * ms + 300_000, 1080 * ms + 300_000), (t0 + 500_000, t0 + 80_500_000)]
    pairs = [((1.0, 1.0805), (2.0, 2.0812))]

    r = split(80, pairs, stamps, read_trace(trace))

    assert r.triton_us == pytest.approx({
        "client -> Triton read": 100, "Triton core -> backend called": 100, "backend -> ingress admitted": 300,
        "gap (first token)": 80_000, "ingress -> response complete": 400, "gRPC send": 100, "-> client": 200})
    assert r.direct_us == pytest.approx({"client -> ingress admitted": 300, "gap (first token)": 80_000,
                                         "ingress -> client": 200})
    assert r.hop_ms == pytest.approx(0.7)  # 81.2 ms - 80.5 ms
    assert r.hop_in_ms == pytest.approx(0.2) and r.hop_out_ms == pytest.approx(0.5)
    assert "**0.70 ms**" in summary_markdown([r])


def test_a_window_holding_two_records_is_refused():
    pairs = [((1.0, 1.1), (2.0, 2.1))]
    stamps = [(int(1.01e9), int(1.05e9)), (int(1.02e9), int(1.06e9))]
    with pytest.raises(SystemExit, match="2 records fall inside one request's window"):
        split(80, pairs, stamps, [])
