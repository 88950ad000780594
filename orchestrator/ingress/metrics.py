"""Ingress statistics and their Prometheus text exposition (format 0.0.4), no extra dependency.

``IngressStats`` is updated by the server as requests arrive, produce tokens and end; it
lives on the ingress's event loop thread and is only touched there, so it needs no lock.
``render_metrics`` adds gauges from the cluster's ``ClusterState`` at scrape time.

Two sets of names: the project's own ``kunserve_*``, and next to them vLLM's ``vllm:*`` with
vLLM v1's types, buckets, ``model_name`` label and meaning (checked against vLLM's
``vllm/v1/metrics/loggers.py`` and ``stats.py``), so a Grafana dashboard built for vLLM reads
this cluster unchanged. A ``vllm:*`` series is left out rather than written as 0 when what it
measures is unknown (no model name, no cluster state, no queue time reported, no KV pool).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.contracts import ClusterState, RankState

if TYPE_CHECKING:
    from orchestrator.ingress.request_log import RequestLog

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Content-Type of ``/metrics``."""

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
"""Seconds; vLLM's buckets, so dashboards built for vLLM read the same."""
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
"""Seconds per output token."""
VLLM_TTFT_BUCKETS = TTFT_BUCKETS + (640.0, 2560.0)
"""vLLM v1's ``time_to_first_token_seconds`` buckets (they reach further than ours)."""
VLLM_ITL_BUCKETS = TPOT_BUCKETS
"""vLLM's ``inter_token_latency_seconds`` (and ``time_per_output_token_seconds``) buckets."""
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                                50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
"""vLLM's buckets for ``e2e_request_latency_seconds`` and ``request_queue_time_seconds``."""
VLLM_FINISHED_REASONS = ("stop", "length", "abort")
"""vLLM creates ``request_success_total`` for each of these at start; so do we (0 is measured)."""


@dataclass
class Histogram:
    """A Prometheus histogram: per-bucket counts (not cumulative until rendered), sum, count."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if list(self.buckets) != sorted(self.buckets):
            raise ValueError("histogram buckets must be increasing")
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float, times: int = 1) -> None:
        """Add ``times`` observations of ``value`` (one per token of an event, for instance)."""
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += times
                break
        self.total += value * times
        self.count += times


@dataclass
class RequestTiming:
    """One request's timeline, kept by the server while it answers the request."""

    arrival_time: float
    """``GenerateRequest.arrival_time`` (``time.monotonic``)."""
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    request_id: str = ""
    route: str = ""
    """What carried it: ``http`` or ``triton`` (the request log's field)."""
    prompt_tokens: int = 0
    queue_time_s: float | None = None
    """Seconds it waited in its instance's queue, once the cluster reported it."""
    cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache, once the cluster reported it (caching on)."""
    instance: int | None = None
    """The instance (leader rank) that computed the prompt, once the cluster reported it."""
    instance_shape: str | None = None
    """That instance's ``tp{T}xpp{P}`` when it computed the prompt."""


@dataclass
class IngressStats:
    """What the ingress measures; the server feeds it, ``/metrics`` renders it."""

    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    """Seconds from arrival (queueing included) to the first output token."""
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    """Per request: seconds per output token after the first."""
    finished: Counter[str] = field(default_factory=Counter)
    """Requests that ended, by finish reason (``stop``, ``length``, ``abort``)."""
    errors: Counter[str] = field(default_factory=Counter)
    """Error answers, by error type (``BadRequestError``, ``TooManyRequestsError``, ...)."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefilled_prompt_tokens: int = 0
    """Prompt tokens of requests that got their first token (vLLM's ``prompt_tokens``)."""
    vllm_ttft: Histogram = field(default_factory=lambda: Histogram(VLLM_TTFT_BUCKETS))
    """``ttft``'s observations again, in vLLM's buckets."""
    itl: Histogram = field(default_factory=lambda: Histogram(VLLM_ITL_BUCKETS))
    """Per output token after the first event: the gap since the previous event over that
    event's tokens, observed once per token (vLLM observes once per engine step, which is one
    token without speculative decoding)."""
    e2e: Histogram = field(default_factory=lambda: Histogram(VLLM_REQUEST_LATENCY_BUCKETS))
    """Seconds from arrival to the end of the request, for every request that ended."""
    queue_time: Histogram = field(default_factory=lambda: Histogram(VLLM_REQUEST_LATENCY_BUCKETS))
    """Seconds in the instance's queue, as the cluster reports it (``TokenEvent.queue_time_s``)."""
    in_flight: int = 0
    """Generation requests the ingress is answering now."""
    request_log: RequestLog | None = None
    """Where each admitted request is written when it ends (``serve --request-log``)."""

    def on_tokens(self, timing: RequestTiming, n: int, now: float | None = None, *,
                  queue_time_s: float | None = None) -> None:
        """``n`` new output tokens of a request arrived; ``queue_time_s`` is the event's
        (the cluster reports it once, with the first tokens; observed once per request)."""
        if queue_time_s is not None and timing.queue_time_s is None:
            timing.queue_time_s = queue_time_s
            self.queue_time.observe(max(0.0, queue_time_s))
        if n <= 0:
            return
        now = time.monotonic() if now is None else now
        if timing.first_token_time is None:
            timing.first_token_time = now
            ttft = max(0.0, now - timing.arrival_time)
            self.ttft.observe(ttft)
            self.vllm_ttft.observe(ttft)
            self.prefilled_prompt_tokens += timing.prompt_tokens
        elif timing.last_token_time is not None:
            self.itl.observe(max(0.0, now - timing.last_token_time) / n, times=n)
        timing.last_token_time = now
        timing.num_output_tokens += n
        self.generation_tokens += n

    def on_finish(self, timing: RequestTiming, reason: str | None, now: float | None = None) -> None:
        """A request ended with ``reason``: counted, its end-to-end latency observed, and its
        TPOT if it made two tokens or more."""
        self.finished[reason or "unknown"] += 1
        now = time.monotonic() if now is None else now
        self.e2e.observe(max(0.0, now - timing.arrival_time))
        if timing.num_output_tokens > 1 and timing.first_token_time is not None:
            decode = (timing.last_token_time or timing.first_token_time) - timing.first_token_time
            self.tpot.observe(decode / (timing.num_output_tokens - 1))

    def on_error(self, err_type: str) -> None:
        """The ingress answered with an error (or a stream ended with one)."""
        self.errors[err_type] += 1


def render_metrics(stats: IngressStats, state: ClusterState | None, model_name: str | None = None) -> str:
    """The Prometheus text exposition of ``stats`` and, when given, the cluster ``state``.

    ``model_name`` is the served model's name; vLLM's series carry it as ``model_name`` and
    are left out without it (a vLLM dashboard selects by it; a made-up one would mislead)."""
    lines: list[str] = []
    _histogram(lines, "kunserve_time_to_first_token_seconds",
               "Time from request arrival to its first output token.", stats.ttft)
    _histogram(lines, "kunserve_time_per_output_token_seconds",
               "Per request: time per output token after the first.", stats.tpot)
    _family(lines, "kunserve_request_success_total", "counter", "Requests finished, by finish reason.",
            [({"finish_reason": k}, v) for k, v in sorted(stats.finished.items())])
    _family(lines, "kunserve_request_errors_total", "counter", "Error answers, by error type.",
            [({"type": k}, v) for k, v in sorted(stats.errors.items())])
    _family(lines, "kunserve_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
            [({}, stats.prompt_tokens)])
    _family(lines, "kunserve_generation_tokens_total", "counter", "Output tokens sent.",
            [({}, stats.generation_tokens)])
    _family(lines, "kunserve_requests_in_flight", "gauge", "Generation requests being answered.",
            [({}, stats.in_flight)])
    if state is not None:
        _cluster_gauges(lines, state)
    if model_name is not None:
        _vllm_families(lines, stats, state, {"model_name": model_name})
    return "\n".join(lines) + "\n"


def _cluster_gauges(lines: list[str], state: ClusterState) -> None:
    _family(lines, "kunserve_num_requests_queued", "gauge",
            "Requests accepted by the controller that have no first token yet.", [({}, state.queued)])
    ranks = sorted(state.ranks, key=lambda r: r.rank)
    instances = sorted(state.instances, key=lambda i: i.instance)
    per_rank = [
        ("kunserve_kv_pages_used", "KV pages in use, per rank.", lambda r: r.kv_pages_used),
        ("kunserve_kv_pages_total", "KV pages of the pool, per rank.", lambda r: r.kv_pages_total),
        ("kunserve_kv_cache_usage_ratio", "Fraction of KV pages in use, per rank.",
         lambda r: r.kv_pages_used / r.kv_pages_total if r.kv_pages_total else 0.0),
        ("kunserve_weight_bytes", "Resident weight bytes, per rank.", lambda r: r.weight_bytes),
    ]
    for name, help_text, value in per_rank:
        _family(lines, name, "gauge", help_text, [({"rank": str(r.rank)}, value(r)) for r in ranks])
    per_instance = [
        ("kunserve_num_requests_waiting", "Requests waiting, per serving instance.", lambda i: i.waiting),
        ("kunserve_num_requests_running", "Requests running, per serving instance.", lambda i: i.running),
    ]
    for name, help_text, value in per_instance:
        _family(lines, name, "gauge", help_text, [({"instance": str(i.instance)}, value(i)) for i in instances])
    _family(lines, "kunserve_instance_info", "gauge", "Each serving instance's shape (tp x pp) and devices.",
            [({"instance": str(i.instance), "shape": i.shape, "world_ranks": ",".join(map(str, i.world_ranks))}, 1)
             for i in instances])
    for name, (help_text, value) in sorted(_reshape_counters(state).items()):
        _family(lines, name, "counter", help_text, [({}, value)])


def _reshape_counters(state: ClusterState) -> dict[str, tuple[str, float]]:
    c = state.counters
    return {
        "kunserve_drops_total": ("Drops (replicas fused into a group).", c.get("drops", 0)),
        "kunserve_restores_total": ("Restores (groups split into replicas).", c.get("restores", 0)),
        "kunserve_exchange_bytes_total": ("KV bytes moved by live exchanges after drops.",
                                          c.get("exchange_bytes", 0)),
        "kunserve_exchange_seconds_total": ("Time spent in live KV exchanges.", c.get("exchange_seconds", 0.0)),
        "kunserve_exchange_recomputes_total": ("Requests a drop recomputed instead of exchanging their KV "
                                               "(owners' pools full, a batch timed out).",
                                               c.get("exchange_recomputes", 0)),
        "kunserve_restore_recomputes_total": ("Requests a restore recomputed (no member could hold their KV).",
                                              c.get("restore_recomputes", 0)),
        "kunserve_lookahead_microbatches_total": ("Micro-batches formed jointly by lookahead (--cost-model).",
                                                  c.get("lookahead_microbatches", 0)),
        "kunserve_restore_weight_bytes_total": ("Weight bytes pulled back from peers on restores.",
                                                c.get("weight_bytes", 0)),
        "kunserve_restore_weight_seconds_total": ("Time spent pulling weights back (per rank, summed).",
                                                  c.get("weight_seconds", 0.0)),
        "kunserve_preemptions_total": ("Running requests preempted to make room for others.",
                                       c.get("preemptions", 0)),
        "kunserve_swaps_total": ("Preemptions whose KV went to host memory (--policy swap).", c.get("swaps", 0)),
        "kunserve_migrations_total": ("Requests migrated live between replicas (--policy llumnix).",
                                      c.get("migrations", 0)),
        "kunserve_migration_bytes_total": ("KV bytes moved by migrations.", c.get("migration_bytes", 0)),
        **({"kunserve_prefix_cache_queries_total": ("Prompt tokens looked up in the prefix caches.",
                                                    c["prefix_cache_queries"]),
            "kunserve_prefix_cache_hits_total": ("Of those, tokens whose KV the caches held.",
                                                 c.get("prefix_cache_hits", 0))}
           if "prefix_cache_queries" in c else {}),  # prefix caching on, and a request looked up
    }


def _vllm_families(lines: list[str], stats: IngressStats, state: ClusterState | None,
                   model: dict[str, str]) -> None:
    """vLLM's names for what the ingress measures, then for the cluster ``state``."""
    _histogram(lines, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
               stats.vllm_ttft, model)
    _histogram(lines, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
               stats.itl, model)
    _histogram(lines, "vllm:time_per_output_token_seconds",
               "Histogram of time per output token in seconds (vLLM's older name for "
               "vllm:inter_token_latency_seconds; the same observations).", stats.itl, model)
    _histogram(lines, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
               stats.e2e, model)
    if stats.queue_time.count:  # unknown until the cluster reports a queue time
        _histogram(lines, "vllm:request_queue_time_seconds",
                   "Histogram of time spent in WAITING phase for request.", stats.queue_time, model)
    _family(lines, "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
            [(model, stats.prefilled_prompt_tokens)])
    _family(lines, "vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
            [(model, stats.generation_tokens)])
    finished = {**dict.fromkeys(VLLM_FINISHED_REASONS, 0), **stats.finished}
    _family(lines, "vllm:request_success_total", "counter", "Count of successfully processed requests.",
            [({**model, "finished_reason": k}, v) for k, v in sorted(finished.items())])
    if state is not None:
        _vllm_cluster(lines, state, model)


def _vllm_cluster(lines: list[str], state: ClusterState, model: dict[str, str]) -> None:
    """vLLM's scheduler gauges per serving instance (vLLM's ``engine`` label: one engine core
    per instance, named by its leader rank) and the cluster's preemption total."""
    instances = [({**model, "engine": str(i.instance)}, i) for i in sorted(state.instances, key=lambda i: i.instance)]
    _family(lines, "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
            [(labels, i.running) for labels, i in instances])
    _family(lines, "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
            [(labels, i.waiting) for labels, i in instances])
    ranks = {r.rank: r for r in state.ranks}
    usage = [(labels, _kv_usage([ranks[r] for r in i.ranks if r in ranks])) for labels, i in instances]
    usage = [(labels, u) for labels, u in usage if u is not None]
    if usage:
        _family(lines, "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage)
        _family(lines, "vllm:gpu_cache_usage_perc", "gauge",
                "GPU KV-cache usage. 1 means 100 percent usage (vLLM's older name for "
                "vllm:kv_cache_usage_perc; the same value).", usage)
    # The schedulers count every preemption; the key appears with the first one.
    _family(lines, "vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
            [(model, state.counters.get("preemptions", 0))])
    if "prefix_cache_queries" in state.counters:  # only with prefix caching on
        _family(lines, "vllm:prefix_cache_queries_total", "counter",
                "Prefix cache queries, in terms of number of queried tokens.",
                [(model, state.counters["prefix_cache_queries"])])
        _family(lines, "vllm:prefix_cache_hits_total", "counter",
                "Prefix cache hits, in terms of number of cached tokens.",
                [(model, state.counters.get("prefix_cache_hits", 0))])


def _kv_usage(ranks: list[RankState]) -> float | None:
    """Fraction of an instance's KV pages in use (over its ranks), None without a pool."""
    total = sum(r.kv_pages_total for r in ranks)
    return sum(r.kv_pages_used for r in ranks) / total if total else None


def _family(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[dict[str, str], float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lines.append(f"{name}{_labels(labels)} {_number(value)}")


def _histogram(lines: list[str], name: str, help_text: str, h: Histogram,
               labels: dict[str, str] | None = None) -> None:
    labels = labels or {}
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, n in zip(h.buckets, h.counts):
        cumulative += n
        lines.append(f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {cumulative}")
    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h.count}")
    lines.append(f"{name}_sum{_labels(labels)} {_number(h.total)}")
    lines.append(f"{name}_count{_labels(labels)} {h.count}")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))
