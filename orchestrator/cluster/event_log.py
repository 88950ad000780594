"""The cluster's event log: drops, exchanges, restores, decisions and migrations as
``/admin/state`` lists them (the newest ``KEEP``), and the running totals ``/metrics``
exports. Thread-safe: the rank loop records, the ingress thread reads."""

from __future__ import annotations

import enum
import logging
import threading
import time

logger = logging.getLogger(__name__)


class EventKind(str, enum.Enum):
    """What an event records (its ``event`` field in ``/admin/state``)."""

    DROP = "drop"
    """A group formed: requests adopted, how many were stale (had KV) and in prefill."""
    EXCHANGE = "exchange"
    """A drop's live KV exchange finished: bytes, slices, requests recomputed, seconds."""
    RESTORE_MOVES = "restore_moves"
    """A restore's KV moves home finished: slices, requests recomputed."""
    RESTORE = "restore"
    """A group split back into replicas."""
    WEIGHTS_DROPPED = "weights_dropped"
    """One member's weights became KV: bytes freed, bytes remapped, pages added."""
    WEIGHTS_PULLED = "weights_pulled"
    """One member pulled its dropped weights back from its peers."""
    DECISION = "decision"
    """The reshape policy started a drop or a restore, and why."""
    MIGRATION = "migration"
    """A request migrated live between replicas (llumnix)."""


_TOTALS: dict[EventKind, tuple[tuple[str, str | None], ...]] = {
    EventKind.DROP: (("drops", None),),
    EventKind.RESTORE: (("restores", None),),
    EventKind.EXCHANGE: (("exchange_bytes", "bytes"), ("exchange_seconds", "seconds"),
                         ("exchange_slices", "slices"), ("exchange_recomputes", "recomputed")),
    EventKind.RESTORE_MOVES: (("restore_slices", "slices"), ("restore_recomputes", "recomputed")),
    EventKind.MIGRATION: (("migrations", None), ("migration_bytes", "bytes")),
    EventKind.WEIGHTS_PULLED: (("weight_bytes", "bytes"), ("weight_seconds", "seconds")),
}
"""Per kind: (counter, the event's field it adds up, or None to count events)."""


class EventLog:
    """Recent events and running totals."""

    KEEP = 100

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._counters: dict[str, float] = {}

    def record(self, kind: EventKind, ranks, **detail) -> None:
        event = {"event": EventKind(kind).value, "ranks": list(ranks), "time": time.time(), **detail}
        logger.info("reshape event: %s", event)
        with self._lock:
            self._events = self._events[1 - self.KEEP:] + [event]
            for counter, key in _TOTALS.get(EventKind(kind), ()):
                self._counters[counter] = self._counters.get(counter, 0) + (1 if key is None else event[key])

    def count(self, counts: dict[str, int]) -> None:
        """Add an instance's event counts (preemptions, swaps, lookahead micro-batches)."""
        with self._lock:
            for name, n in counts.items():
                self._counters[name] = self._counters.get(name, 0) + n

    def snapshot(self) -> tuple[list[dict], dict[str, float]]:
        with self._lock:
            return list(self._events), dict(self._counters)
