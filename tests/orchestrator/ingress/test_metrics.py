"""The Prometheus exposition of ingress statistics."""

from __future__ import annotations

import math

import pytest

from orchestrator.contracts import ClusterState, InstanceState, RankState
from orchestrator.ingress.metrics import Histogram, IngressStats, RequestTiming, render_metrics
from orchestrator.triton.metrics_bridge import parse_prometheus
from tests.orchestrator.ingress.http_client import call


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


# ----------------------------------------------------------------------------- vLLM's names

MODEL = "acme/llama-tiny"
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
             40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]
"""vLLM v1's buckets (vllm/v1/metrics/loggers.py), written out again so a change to ours shows."""


def _simulated() -> IngressStats:
    """Three requests: two tokens then two in one event (stop), one token (length), and one
    aborted before its first token."""
    stats = IngressStats()
    a = RequestTiming(arrival_time=0.0, prompt_tokens=4)
    stats.on_tokens(a, 1, now=0.5, queue_time_s=0.2)
    stats.on_tokens(a, 1, now=0.625)
    stats.on_tokens(a, 2, now=0.875)  # 0.25 s for two tokens: two observations of 0.125 s
    stats.on_finish(a, "stop", now=1.0)
    b = RequestTiming(arrival_time=1.0, prompt_tokens=6)
    stats.on_tokens(b, 1, now=1.125, queue_time_s=0.0)
    stats.on_tokens(b, 0, now=1.2, queue_time_s=5.0)  # a second report is not a second observation
    stats.on_finish(b, "length", now=1.25)
    c = RequestTiming(arrival_time=2.0, prompt_tokens=3)
    stats.on_finish(c, "abort", now=2.5)
    stats.prompt_tokens = 13  # what admit() adds up
    return stats


def _state() -> ClusterState:
    """A 2-rank group (instance 0), a replica (instance 2) and a replica without a KV pool."""
    def rank(r: int, instance: int, total: int, used: int) -> RankState:
        return RankState(rank=r, role="group" if instance == 0 else "replica", instance=instance, stage=r % 2,
                         group_size=2 if instance == 0 else 1, layer_range=(0, 30), weight_bytes=1 << 20,
                         kv_pages_total=total, kv_pages_used=used, device_memory_bytes=1 << 30, resident_bytes=0)
    ranks = [rank(0, 0, 100, 30), rank(1, 0, 100, 50), rank(2, 2, 80, 20), rank(3, 3, 0, 0)]
    instances = [InstanceState(0, [0, 1], waiting=2, running=3), InstanceState(2, [2], waiting=0, running=1),
                 InstanceState(3, [3], waiting=1, running=0)]
    return ClusterState(ranks, instances, queued=3, counters={"preemptions": 4, "drops": 1})


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels))): s.value for s in parse_prometheus(text)}


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model_name": MODEL, **labels}.items())))]


def test_vllm_histograms_after_simulated_requests():
    text = render_metrics(_simulated(), _state(), MODEL)
    s = _samples(text)
    expected = {  # name: (buckets, count, sum)
        "vllm:time_to_first_token_seconds": (VLLM_TTFT, 2, 0.5 + 0.125),
        "vllm:inter_token_latency_seconds": (VLLM_ITL, 3, 3 * 0.125),
        "vllm:time_per_output_token_seconds": (VLLM_ITL, 3, 3 * 0.125),
        "vllm:e2e_request_latency_seconds": (VLLM_REQUEST, 3, 1.0 + 0.25 + 0.5),
        "vllm:request_queue_time_seconds": (VLLM_REQUEST, 2, 0.2),
    }
    for name, (buckets, count, total) in expected.items():
        assert f"# TYPE {name} histogram" in text.splitlines(), name
        bounds = [float(dict(labels)["le"]) for n, labels in s if n == f"{name}_bucket"]
        assert bounds == buckets + [math.inf], name
        assert _value(s, f"{name}_bucket", le="+Inf") == count == _value(s, f"{name}_count"), name
        assert _value(s, f"{name}_sum") == pytest.approx(total), name
    assert _value(s, "vllm:inter_token_latency_seconds_bucket", le="0.15") == 3  # 0.125 s each
    assert _value(s, "vllm:inter_token_latency_seconds_bucket", le="0.1") == 0
    assert _value(s, "vllm:time_to_first_token_seconds_bucket", le="0.25") == 1
    assert _value(s, "vllm:e2e_request_latency_seconds_bucket", le="0.5") == 2


def test_vllm_counters_and_gauges_after_simulated_requests():
    text = render_metrics(_simulated(), _state(), MODEL)
    s = _samples(text)
    lines = text.splitlines()
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:num_preemptions_total"):
        assert f"# TYPE {name} counter" in lines, name
    assert _value(s, "vllm:prompt_tokens_total") == 10  # prefilled only: the aborted request's 3 are not
    assert _value(s, "vllm:generation_tokens_total") == 5
    for reason in ("stop", "length", "abort"):
        assert _value(s, "vllm:request_success_total", finished_reason=reason) == 1, reason
    assert _value(s, "vllm:num_preemptions_total") == 4
    for name, kind in (("vllm:num_requests_running", "running"), ("vllm:num_requests_waiting", "waiting")):
        assert f"# TYPE {name} gauge" in lines
        for inst in _state().instances:
            assert _value(s, name, engine=str(inst.instance)) == getattr(inst, kind), (name, inst)
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert _value(s, name, engine="0") == pytest.approx(80 / 200)  # the group's pages over both ranks
        assert _value(s, name, engine="2") == pytest.approx(20 / 80)
        assert not [k for k in s if k[0] == name and ("engine", "3") in k[1]]  # no pool: unknown, not 0
    vllm = [k for k in s if k[0].startswith("vllm:")]
    assert vllm and all(("model_name", MODEL) in labels for _, labels in vllm)


def test_vllm_series_need_what_they_measure():
    stats = _simulated()
    assert "vllm:" not in render_metrics(stats, _state())  # no model name: no vLLM series
    no_state = render_metrics(stats, None, MODEL)
    assert 'vllm:time_to_first_token_seconds_count{model_name="acme/llama-tiny"} 2' in no_state.splitlines()
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total"):
        assert name not in no_state, name
    fresh = render_metrics(IngressStats(), _state(), MODEL)
    assert "vllm:request_queue_time_seconds" not in fresh  # no queue time reported yet
    assert 'vllm:request_success_total{model_name="acme/llama-tiny",finished_reason="stop"} 0' in fresh
    assert 'vllm:num_preemptions_total{model_name="acme/llama-tiny"} 0' in render_metrics(
        IngressStats(), ClusterState([], [], queued=0), MODEL)


def test_kunserve_names_are_unchanged_next_to_vllms():
    stats = _simulated()
    assert render_metrics(stats, _state()) in render_metrics(stats, _state(), MODEL)


def test_metrics_route_labels_vllm_series_with_the_served_model(server):
    assert call(server.url + "/v1/completions", "POST", {"prompt": "abc", "max_tokens": 8}).status == 200
    lines = call(server.url + "/metrics").body.splitlines()
    for line in ('vllm:time_to_first_token_seconds_count{model_name="tiny"} 1',
                 'vllm:e2e_request_latency_seconds_count{model_name="tiny"} 1',
                 'vllm:generation_tokens_total{model_name="tiny"} 3',
                 'vllm:request_success_total{model_name="tiny",finished_reason="stop"} 1',
                 'vllm:num_requests_running{model_name="tiny",engine="0"} 2',
                 'vllm:num_requests_waiting{model_name="tiny",engine="1"} 1',
                 'vllm:kv_cache_usage_perc{model_name="tiny",engine="1"} 0.5'):
        assert line in lines, line
