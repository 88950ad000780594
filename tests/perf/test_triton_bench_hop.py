"""triton_bench's hop arithmetic: the model's time taken out through the request log."""

from __future__ import annotations

import pytest

from perf.triton_bench import transport_diffs


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
    with pytest.raises(SystemExit, match="0 request-log records arrived inside one request's window"):
        transport_diffs(pairs, [_record(10.001, 0.079)])
