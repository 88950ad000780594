"""The ingress's Prometheus text mirrored into (fake) Triton custom metrics."""

from __future__ import annotations

from orchestrator.triton.metrics_bridge import MetricsMirror, parse_prometheus

TEXT = '''# HELP kunserve_time_to_first_token_seconds Time to first token.
# TYPE kunserve_time_to_first_token_seconds histogram
kunserve_time_to_first_token_seconds_bucket{le="0.1"} 2
kunserve_time_to_first_token_seconds_bucket{le="+Inf"} 3
kunserve_time_to_first_token_seconds_sum 0.5
kunserve_time_to_first_token_seconds_count 3
# HELP kunserve_kv_pages_used KV pages in use, per rank.
# TYPE kunserve_kv_pages_used gauge
kunserve_kv_pages_used{rank="0"} 12
kunserve_kv_pages_used{rank="1"} 0
# HELP kunserve_drops_total Drops.
# TYPE kunserve_drops_total counter
kunserve_drops_total 1
'''


class FakeMetric:
    def __init__(self, kind):
        self.kind, self.value = kind, 0.0

    def set(self, v):
        assert self.kind == "gauge", "Triton counters cannot be set"
        self.value = v

    def increment(self, v):
        assert self.kind == "counter" and v >= 0, "Triton counters only go up"
        self.value += v


class FakeFamily:
    def __init__(self, name, description, kind):
        self.name, self.description, self.kind, self.metrics = name, description, kind, {}

    def Metric(self, labels):  # noqa: N802 - pb_utils' spelling
        m = self.metrics[tuple(sorted(labels.items()))] = FakeMetric(self.kind)
        return m


def test_parse_types_labels_and_histogram_parts():
    samples = {(s.name, s.labels): s for s in parse_prometheus(TEXT)}
    bucket = samples[("kunserve_time_to_first_token_seconds_bucket", (("le", "+Inf"),))]
    assert bucket.kind == "counter" and bucket.value == 3 and bucket.help == "Time to first token."
    assert samples[("kunserve_kv_pages_used", (("rank", "0"),))].kind == "gauge"
    assert samples[("kunserve_drops_total", ())].value == 1


def test_mirror_sets_gauges_and_advances_counters_by_the_difference():
    families = {}

    def make(name, description, kind):
        families[name] = FakeFamily(name, description, kind)
        return families[name]

    mirror = MetricsMirror(make)
    mirror.update(parse_prometheus(TEXT))
    later = TEXT.replace('{rank="0"} 12', '{rank="0"} 30').replace("kunserve_drops_total 1", "kunserve_drops_total 4")
    mirror.update(parse_prometheus(later))
    assert families["kunserve_kv_pages_used"].metrics[(("rank", "0"),)].value == 30
    assert families["kunserve_drops_total"].metrics[()].value == 4
    assert families["kunserve_time_to_first_token_seconds_count"].metrics[()].value == 3
    # a restarted source (counter went down) continues from its new value
    mirror.update(parse_prometheus(later.replace("kunserve_drops_total 4", "kunserve_drops_total 1")))
    assert families["kunserve_drops_total"].metrics[()].value == 5


def test_unchanged_values_make_no_calls():
    calls = []

    class CountingFamily(FakeFamily):
        def Metric(self, labels):  # noqa: N802
            m = super().Metric(labels)
            original_set, original_inc = m.set, m.increment
            m.set = lambda v: (calls.append(("set", v)), original_set(v))
            m.increment = lambda v: (calls.append(("inc", v)), original_inc(v))
            return m

    mirror = MetricsMirror(CountingFamily)
    mirror.update(parse_prometheus(TEXT))
    first = len(calls)
    mirror.update(parse_prometheus(TEXT))
    assert first > 0 and len(calls) == first  # the second scrape changed nothing
