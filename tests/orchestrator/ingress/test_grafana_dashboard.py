"""The Grafana dashboard ``docs/grafana/kunserve.json`` queries only series ``/metrics`` exports.

A panel whose query names a series nobody writes shows "No data" and nothing fails, so the
test extracts every metric name from every panel's PromQL and looks it up among the sample
names of a real exposition (``render_metrics`` over observed requests and a cluster state).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.contracts import ClusterState, InstanceState, RankState
from orchestrator.ingress.metrics import IngressStats, RequestTiming, render_metrics

DASHBOARD = Path(__file__).resolve().parents[3] / "docs" / "grafana" / "kunserve.json"

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_CLAUSES = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_DURATIONS = re.compile(r"(?<![\w:])(?:\d+(?:ms|[smhdwy]))+(?![\w:])")
_NUMBERS = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label
    matchers, ranges, grouping clauses, durations, numbers, Grafana variables and function
    calls (a name followed by ``(``) are gone. ``{__name__="x"}`` selectors are not used by the dashboard."""
    text = _STRINGS.sub(" ", expr)
    for pattern in (_MATCHERS, _RANGES, _CLAUSES):
        text = pattern.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # $__rate_interval, ${var}
    text = _NUMBERS.sub(" ", _DURATIONS.sub(" ", text))
    names = set()
    for m in _IDENT.finditer(text):
        if re.match(r"\s*\(", text[m.end():]) or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def exposed_series(exposition: str) -> set[str]:
    """Sample names of a text exposition, as PromQL selects them: histograms by their
    ``_bucket``/``_sum``/``_count`` series, counters by the ``_total`` name they are written
    with (the family name of a histogram is not a series)."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            names.add(_IDENT.match(line).group(0))
    return names


def missing_series(exprs: list[str], exposition: str) -> set[str]:
    """Names the expressions query that the exposition does not write."""
    wanted = set().union(*(metric_names(e) for e in exprs))
    return wanted - exposed_series(exposition)


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every target's ``expr`` of every panel, rows' nested panels included."""
    exprs = []
    for panel in _panels(dashboard.get("panels", [])):
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    return exprs


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def _exposition() -> str:
    """What a cluster that dropped, exchanged and restored once exports after three requests."""
    stats = IngressStats()
    for i, (reason, n) in enumerate((("stop", 3), ("length", 5), ("abort", 1))):
        t = RequestTiming(arrival_time=10.0 * i, prompt_tokens=4)
        stats.prompt_tokens += 4
        for k in range(n):
            stats.on_tokens(t, 1, now=10.0 * i + 0.2 + 0.05 * k, queue_time_s=0.01 if k == 0 else None)
        stats.on_finish(t, reason, now=10.0 * i + 1.0)
    stats.on_error("BadRequestError")
    ranks = [RankState(rank=r, role="group" if r < 2 else "replica", instance=0 if r < 2 else r, stage=r % 2,
                       group_size=2 if r < 2 else 1, layer_range=(0, 15) if r != 1 else (15, 30),
                       weight_bytes=(135 << 20) // (2 if r < 2 else 1), kv_pages_total=400 if r < 2 else 250,
                       kv_pages_used=120, device_memory_bytes=1 << 30, resident_bytes=700 << 20)
             for r in range(4)]
    instances = [InstanceState(0, [0, 1], waiting=1, running=3), InstanceState(2, [2], 0, 2),
                 InstanceState(3, [3], 0, 0)]
    counters = {"drops": 1, "restores": 1, "exchange_bytes": 3 << 20, "exchange_seconds": 0.04,
                "exchange_slices": 12, "weight_bytes": 60 << 20, "weight_seconds": 0.2, "preemptions": 2}
    state = ClusterState(ranks, instances, queued=1, counters=counters)
    return render_metrics(stats, state, "smollm2")


def test_the_dashboard_is_importable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    panels = _panels(dashboard["panels"])
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for p in panels:
        assert p["datasource"]["type"] == "prometheus" and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for uid in re.findall(r"\$\{(\w+)\}", json.dumps(p["datasource"])):
            assert uid in variables, uid
    titles = " ".join(p["title"].lower() for p in panels)
    for words in ("first token", "per output token", "kv", "weight", "drops", "restores", "exchanged"):
        assert words in titles, words


def test_every_queried_metric_is_exported():
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 10
    assert missing_series(exprs, _exposition()) == set()
    queried = set().union(*(metric_names(e) for e in exprs))
    for name in ("kunserve_time_to_first_token_seconds_bucket", "kunserve_time_per_output_token_seconds_bucket",
                 "kunserve_kv_cache_usage_ratio", "kunserve_weight_bytes", "kunserve_drops_total",
                 "kunserve_restores_total", "kunserve_exchange_bytes_total"):
        assert name in queried, name


def test_a_wrong_name_is_caught():
    exposition = _exposition()
    wrong = ["rate(kunserve_drop_total[5m])",  # a typo
             "kunserve_drops",  # a counter without the _total it is written with
             "histogram_quantile(0.9, sum by (le) (rate(kunserve_time_to_first_token_seconds[1m])))",  # no _bucket
             'sum by (rank) (kunserve_kv_pages_free{rank="0"})']  # never exported
    assert missing_series(wrong, exposition) == {"kunserve_drop_total", "kunserve_drops",
                                                 "kunserve_time_to_first_token_seconds", "kunserve_kv_pages_free"}
    assert missing_series(["kunserve_drops_total + on(job) group_left kunserve_restores_total"], exposition) == set()


@pytest.mark.parametrize("expr,names", [
    ('histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name="$model_name"}'
     '[$__rate_interval])))', {"vllm:e2e_request_latency_seconds_bucket"}),
    ("rate(a_sum[5m]) / rate(a_count[5m]) * 1e3", {"a_sum", "a_count"}),
    ("sum without (instance) (x_total offset 5m) > bool 0.5", {"x_total"}),
    ('max_over_time(y{le=~"0.1|1.0", s="a}b"}[1h:1m]) or vector(0)', {"y"}),
    ("1 - avg(z) by (rank)", {"z"}),
])
def test_metric_names_of_an_expression(expr, names):
    assert metric_names(expr) == names


def test_vllm_dashboard_queries_find_their_series():
    """The queries of vLLM's own example dashboards (examples/online_serving/prometheus_grafana),
    for the names the ingress writes in vLLM's form."""
    sel = '{model_name="$model_name"}'
    exprs = [f"histogram_quantile(0.99, sum by(le) (rate(vllm:{h}_bucket{sel}[$__rate_interval])))"
             for h in ("e2e_request_latency_seconds", "time_per_output_token_seconds",
                       "inter_token_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds")]
    exprs += [f"rate(vllm:{c}{sel}[$__rate_interval])" for c in ("prompt_tokens_total", "generation_tokens_total",
                                                              "num_preemptions_total",
                                                              "request_queue_time_seconds_sum")]
    exprs += [f"vllm:{g}{sel}" for g in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                                         "gpu_cache_usage_perc")]
    exprs.append(f"sum by(finished_reason) (increase(vllm:request_success_total{sel}[$__rate_interval]))")
    assert missing_series(exprs, _exposition()) == set()
