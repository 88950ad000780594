"""Mirror the ingress's Prometheus metrics into Triton's ``/metrics``.

The cluster's metrics (TTFT/TPOT histograms, KV usage per rank, drops and restores) are
rendered by the ingress. The ``kunserve`` model's stub scrapes them about once a second and
sets Triton custom metrics (``pb_utils.MetricFamily``) to the same values, so one scrape of
Triton's metrics port shows Triton's own ``nv_*`` metrics and the cluster's ``kunserve_*``.

Triton's Python API has counters and gauges: gauges are set, counters are advanced by the
difference since the last scrape, and a histogram becomes its ``_bucket`` (with the ``le``
label), ``_sum`` and ``_count`` counters, which is what ``histogram_quantile`` reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    """One line of the exposition format, with its family's type and help."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float
    kind: str
    """``counter`` or ``gauge`` (histogram lines are counters)."""
    help: str


def parse_prometheus(text: str) -> list[Sample]:
    """Parse the text exposition format (the subset the ingress writes)."""
    kinds: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            kinds[name] = kind.strip()
        elif line.startswith("# HELP "):
            parts = line.split(None, 3)
            helps[parts[2]] = parts[3] if len(parts) > 3 else ""
        elif line and not line.startswith("#"):
            sample = _sample(line, kinds, helps)
            if sample is not None:
                samples.append(sample)
    return samples


def _sample(line: str, kinds: dict[str, str], helps: dict[str, str]) -> Sample | None:
    m = _SAMPLE.match(line)
    if m is None:
        return None
    name, labels_text, value = m.group(1), m.group(3) or "", m.group(4)
    family = _family_of(name, kinds)
    kind = kinds.get(family, "gauge")
    labels = tuple((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                   for k, v in _LABEL.findall(labels_text))
    return Sample(name, labels, float(value), "gauge" if kind == "gauge" else "counter",
                  helps.get(family, name))


def _family_of(name: str, kinds: dict[str, str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and kinds.get(base) == "histogram":
            return base
    return name


class _Metric(Protocol):
    def set(self, value: float) -> None: ...
    def increment(self, value: float) -> None: ...


FamilyFactory = Callable[[str, str, str], Any]
"""``(name, description, kind)`` -> an object with ``Metric(labels=...)`` (pb_utils.MetricFamily)."""


class MetricsMirror:
    """Keeps Triton metrics equal to the last scraped values."""

    def __init__(self, make_family: FamilyFactory) -> None:
        self._make_family = make_family
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, tuple], tuple[_Metric, float]] = {}

    def update(self, samples: list[Sample]) -> None:
        """Apply a scrape. Unchanged values are skipped: each set or increment is an IPC
        round trip from the stub to the server."""
        for s in samples:
            metric, last = self._metric(s)
            if s.value == last and (s.name, s.labels) in self._metrics:
                continue
            if s.kind == "gauge":
                metric.set(s.value)
            elif s.value >= last:
                metric.increment(s.value - last)
            else:  # the source restarted: count from its new value
                metric.increment(s.value)
            self._metrics[(s.name, s.labels)] = (metric, s.value)

    def _metric(self, s: Sample) -> tuple[_Metric, float]:
        known = self._metrics.get((s.name, s.labels))
        if known is not None:
            return known
        family = self._families.get(s.name)
        if family is None:
            family = self._families[s.name] = self._make_family(s.name, s.help, s.kind)
        return family.Metric(labels=dict(s.labels)), 0.0
