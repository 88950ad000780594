"""The controller's book of live migrations (the llumnix policy): which are under way,
starting new ones from the policy's decisions, and forgetting those that never report.
The protocol itself runs between the two leaders (``cluster/migration.py``)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from orchestrator.cluster.event_log import EventKind, EventLog
from orchestrator.cluster.messages import MigrationDone, StartMigration
from orchestrator.contracts import InstanceStats, Topology
from orchestrator.policy.migration import MigrationPolicy

logger = logging.getLogger(__name__)

MIGRATION_TIMEOUT_S = 60.0
"""A migration that reports nothing for this long is forgotten (its source reports every ending)."""


@dataclass(frozen=True)
class _Migration:
    src: int
    dst: int
    started: float


class MigrationBook:
    """Migrations under way, by id."""

    def __init__(self, policy: MigrationPolicy, send: Callable[[int, object], None], log: EventLog) -> None:
        self.policy = policy
        self._send = send
        self._log = log
        self._lock = threading.Lock()
        self._under_way: dict[int, _Migration] = {}
        self._ids = 0

    def busy_ranks(self) -> set[int]:
        with self._lock:
            return {r for m in self._under_way.values() for r in (m.src, m.dst)}

    def start(self, stats: dict[int, InstanceStats], topology: Topology, now: float) -> None:
        """Forget silent migrations, then start what the policy decides (main loop)."""
        with self._lock:
            for mid in [mid for mid, m in self._under_way.items() if now - m.started > MIGRATION_TIMEOUT_S]:
                logger.warning("migration %d reported nothing for %.0f s", mid, MIGRATION_TIMEOUT_S)
                del self._under_way[mid]
        for d in self.policy.decide(stats, topology, self.busy_ranks(), now):
            with self._lock:
                self._ids += 1
                mid = self._ids
                self._under_way[mid] = _Migration(d.src, d.dst, now)
            self._send(d.src, StartMigration(mid, d.dst, d.dst_free_tokens))

    def done(self, msg: MigrationDone) -> bool:
        """A migration ended; True when the request moved (its stream follows it)."""
        with self._lock:
            self._under_way.pop(msg.migration_id, None)
        if not msg.ok:
            logger.debug("migration %d from %d to %d did not happen: %s", msg.migration_id, msg.src, msg.dst,
                         msg.reason)
            return False
        self._log.record(EventKind.MIGRATION, [msg.src, msg.dst], request=msg.request_id, bytes=msg.bytes_moved,
                         seconds=round(msg.seconds, 4), stop_seconds=round(msg.stop_seconds, 4), stages=msg.stages)
        return True
