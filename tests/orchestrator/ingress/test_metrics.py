"""The Prometheus exposition of ingress statistics."""

from __future__ import annotations

from orchestrator.ingress.metrics import Histogram, IngressStats, RequestTiming, render_metrics


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    stats = IngressStats(ttft=h)
    lines = render_metrics(stats, None).splitlines()
    assert 'kunserve_time_to_first_token_seconds_bucket{le="0.1"} 2' in lines
    assert 'kunserve_time_to_first_token_seconds_bucket{le="1.0"} 3' in lines
    assert 'kunserve_time_to_first_token_seconds_bucket{le="+Inf"} 4' in lines
    assert "kunserve_time_to_first_token_seconds_sum 3.65" in lines
    assert "kunserve_time_to_first_token_seconds_count 4" in lines


def test_ttft_and_tpot_from_a_timeline():
    stats = IngressStats()
    t = RequestTiming(arrival_time=10.0)
    stats.on_tokens(t, 1, now=10.5)
    stats.on_tokens(t, 0, now=10.9)  # an empty event changes nothing
    stats.on_tokens(t, 2, now=11.5)
    stats.on_finish(t, "length")
    assert stats.ttft.count == 1 and stats.ttft.total == 0.5
    assert stats.tpot.count == 1 and stats.tpot.total == 0.5  # 1 s over 2 tokens after the first
    assert stats.finished["length"] == 1 and stats.generation_tokens == 3
    one = RequestTiming(arrival_time=0.0)
    stats.on_tokens(one, 1, now=1.0)
    stats.on_finish(one, "stop")
    assert stats.tpot.count == 1  # no TPOT for a single token


def test_label_values_are_escaped():
    stats = IngressStats()
    stats.on_error('we"ird\\')
    assert 'kunserve_request_errors_total{type="we\\"ird\\\\"} 1' in render_metrics(stats, None)
