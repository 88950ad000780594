"""Sliding windows of KV load per instance: overload votes, trends, restore decisions.

DESIGN.md section 2, step 1 (an instance votes to drop when its KV demand is high *and*
queued demand cannot be admitted) and step 7 (a group restores when demand is low and
falling, with hysteresis). The monitor only judges; the planner and the cluster act.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# A flat load's least-squares slope can come out as +1e-17 from float rounding; anything
# below this (demand/capacity per second) counts as "not rising".
_FLAT_TREND = 1e-9


@dataclass(frozen=True)
class LoadSample:
    """One instance's KV load at one moment, in tokens."""

    instance: int
    """The instance (replica or group) the sample describes."""
    time: float
    """When the sample was taken, in seconds on a monotonic clock."""
    capacity_tokens: int
    """Tokens the instance's KV pool can hold."""
    demand_tokens: int
    """Full token counts of its running, waiting and swapped requests: what they will need."""
    used_tokens: int
    """Tokens whose KV is resident now."""
    queued_tokens: int
    """Tokens of the requests waiting for admission."""
    free_tokens: int
    """Tokens the pool can still take."""
    num_waiting: int
    """Requests waiting for admission."""

    def __post_init__(self) -> None:
        if self.capacity_tokens <= 0:
            raise ValueError(
                f"instance {self.instance}: capacity_tokens must be positive, "
                f"got {self.capacity_tokens}")
        counts = {"demand_tokens": self.demand_tokens, "used_tokens": self.used_tokens,
                  "queued_tokens": self.queued_tokens, "free_tokens": self.free_tokens,
                  "num_waiting": self.num_waiting}
        for name, value in counts.items():
            if value < 0:
                raise ValueError(f"instance {self.instance}: {name} must be >= 0, got {value}")
        if not math.isfinite(self.time):
            raise ValueError(f"instance {self.instance}: time must be finite, got {self.time}")

    @property
    def level(self) -> float:
        """Demand over capacity; above 1 when the requests will need more than the pool."""
        return self.demand_tokens / self.capacity_tokens

    @property
    def queue_blocked(self) -> bool:
        """Queued demand exists and cannot be admitted: queuing is really happening."""
        return self.queued_tokens > 0 and self.queued_tokens >= self.free_tokens


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the overload vote and of the restore decision."""

    window: int = 30
    """Samples kept per instance (the reference keeps 30)."""
    overload_level: float = 0.95
    """Demand/capacity at or above which an instance may vote overload."""
    restore_level: float = 0.5
    """Demand/capacity at or below which a group may restore."""
    restore_patience: int = 10
    """Consecutive samples that must all satisfy the restore condition, so that drop and
    restore do not oscillate."""
    min_trend_samples: int = 5
    """Fewest samples from which a trend is computed (the trend is 0 below it)."""

    def __post_init__(self) -> None:
        if self.min_trend_samples < 2:
            raise ValueError(
                "min_trend_samples must be >= 2 (a slope needs two points), "
                f"got {self.min_trend_samples}")
        if self.window < self.min_trend_samples:
            raise ValueError(
                f"window ({self.window}) must hold at least min_trend_samples "
                f"({self.min_trend_samples})")
        if not 0.0 < self.restore_level < self.overload_level <= 1.0:
            raise ValueError(
                "levels must satisfy 0 < restore_level < overload_level <= 1, got "
                f"restore_level={self.restore_level}, overload_level={self.overload_level}")
        if not 1 <= self.restore_patience <= self.window:
            raise ValueError(
                f"restore_patience must be between 1 and window ({self.window}), "
                f"got {self.restore_patience}")


class LoadMonitor:
    """Keeps the last ``config.window`` samples of every instance and judges them.

    ``add`` is O(1) (a bounded deque per instance); the judgements read at most one
    window. An instance with no samples never votes and never wants a restore.
    """

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self._samples: dict[int, deque[LoadSample]] = {}

    def add(self, sample: LoadSample) -> None:
        """Record a sample; the oldest one of its instance falls out of a full window."""
        window = self._samples.get(sample.instance)
        if window is None:
            window = self._samples[sample.instance] = deque(maxlen=self.config.window)
        elif sample.time < window[-1].time:
            raise ValueError(
                f"instance {sample.instance}: sample at t={sample.time} is older than the "
                f"last one (t={window[-1].time}); times must come from a monotonic clock")
        window.append(sample)

    def forget(self, instance: int) -> None:
        """Drop an instance's history (it disappeared, e.g. merged into a group)."""
        if self._samples.pop(instance, None) is not None:
            logger.debug("load monitor forgets instance %s", instance)

    def instances(self) -> list[int]:
        """Instances with at least one sample, in ascending order."""
        return sorted(self._samples)

    def history(self, instance: int) -> tuple[LoadSample, ...]:
        """The instance's samples in the window, oldest first (empty if unknown)."""
        return tuple(self._samples.get(instance, ()))

    def snapshot(self) -> dict[int, LoadSample]:
        """The latest sample of every known instance."""
        return {instance: window[-1] for instance, window in self._samples.items()}

    def level(self, instance: int) -> float:
        """Latest demand/capacity of the instance (may exceed 1)."""
        window = self._samples.get(instance)
        if not window:
            raise KeyError(f"no load sample for instance {instance}")
        return window[-1].level

    def trend(self, instance: int) -> float:
        """Least-squares slope of demand/capacity per second over the window.

        0 with fewer than ``min_trend_samples`` samples, or when they all share one time.
        """
        window = self._samples.get(instance, ())
        if len(window) < self.config.min_trend_samples:
            return 0.0
        return _slope([s.time for s in window], [s.level for s in window])

    def votes_overload(self, instance: int) -> bool:
        """The reference vote: latest level >= overload_level and queued demand is blocked."""
        window = self._samples.get(instance)
        if not window:
            return False
        latest = window[-1]
        return latest.level >= self.config.overload_level and latest.queue_blocked

    def wants_restore(self, instance: int) -> bool:
        """Demand is low and not rising: restore may begin.

        The last ``restore_patience`` samples must all have no waiting request and a level
        at or below ``restore_level``, and the trend over the window must not be rising.
        A trend needs ``min_trend_samples`` samples, so with fewer the answer is no: a
        group that just formed has no history to judge.
        """
        cfg = self.config
        window = self._samples.get(instance, ())
        if len(window) < max(cfg.restore_patience, cfg.min_trend_samples):
            return False
        recent = list(window)[-cfg.restore_patience:]
        if any(s.num_waiting > 0 or s.level > cfg.restore_level for s in recent):
            return False
        return self.trend(instance) <= _FLAT_TREND


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 when the xs do not vary)."""
    n = len(xs)
    # Centring keeps large monotonic-clock values from swamping the sums.
    x_mean = math.fsum(xs) / n
    y_mean = math.fsum(ys) / n
    sxx = math.fsum((x - x_mean) ** 2 for x in xs)
    if sxx == 0.0:
        return 0.0
    sxy = math.fsum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
    return sxy / sxx
