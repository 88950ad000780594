"""The controller's side of drops and restores: which are under way, the checks a drop or
restore passes before any rank is told, and the topology they change (its one writer).

The ranks run the protocols (``Reshaper``); the coordinator hands out epochs, remembers
each rank's reshape until the group has formed or every member is a replica again, and
wakes those waiting for it (``drop``/``restore`` on the admin API).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

from engines.mapping import LayerRange, pp_partition
from orchestrator.cluster.messages import GroupFormed, Restored
from orchestrator.contracts import Refused, ReshapeTimeout, Topology


class ReshapeKind(enum.Enum):
    DROP = "drop"
    RESTORE = "restore"


@dataclass(frozen=True)
class Reshape:
    """One drop or restore under way."""

    kind: ReshapeKind
    ranks: tuple[int, ...]
    """The group's ranks, in stage order."""
    epoch: int
    parts: tuple[tuple[int, ...], ...] = ()
    """The instances the group is fused from (a drop) or split into (a restore)."""


@dataclass
class _Restoring:
    reshape: Reshape
    members: set[int] = field(default_factory=set)
    """The members that serve as replicas again."""


class ReshapeCoordinator:
    """Drops and restores under way, and the topology."""

    def __init__(self, topology: Topology, splits: list[int], num_layers: int) -> None:
        self._cond = threading.Condition()
        self._topology = topology
        self._splits = splits
        self._num_layers = num_layers
        self._by_rank: dict[int, Reshape] = {}
        self._restoring: dict[int, _Restoring] = {}
        """Leader rank -> a restore's progress."""
        self._parts: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {}
        """Each group a drop formed -> the instances it was fused from (a group it started
        as splits into replicas)."""
        self._epoch = 0

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def busy(self) -> bool:
        return bool(self._by_rank)

    def reshaping(self, rank: int) -> bool:
        return rank in self._by_rank

    def epoch_of(self, rank: int) -> int:
        return self._by_rank[rank].epoch

    # Starting ------------------------------------------------------------------------------
    def begin_drop(self, ranks: tuple[int, ...], migrating: set[int], cannot_grow: set[int]) -> Reshape:
        """Check and record a drop that fuses the instances on ``ranks`` (replicas in the
        order given; groups' stages where their layers nest); ``Refused`` says why not."""
        with self._cond:
            world = sum(len(g) for g in self._topology.instances)
            unknown = [r for r in ranks if not 0 <= r < world]
            if unknown or not ranks:
                raise Refused(f"unknown ranks {unknown or list(ranks)}: the cluster has ranks 0-{world - 1}")
            if len(set(ranks)) != len(ranks) or len(ranks) < 2:
                raise Refused(f"a group needs at least 2 distinct ranks, got {list(ranks)}")
            if self._by_rank:
                raise Refused("a drop or restore is already in progress")
            if busy := sorted(migrating & set(ranks)):
                raise Refused(f"ranks {busy} are migrating a request; retry in a moment")
            try:
                parts = self._topology.parts_of(ranks)
            except ValueError as exc:
                raise Refused(f"{exc}: a drop fuses whole instances") from None
            if len(parts) < 2:
                raise Refused(f"ranks {list(ranks)} are one instance already")
            if stuck := sorted(cannot_grow & set(ranks)):
                raise Refused(f"ranks {stuck} cannot turn dropped weights into KV: their CUDA KV pool needs "
                              "the virtual-memory driver (pip install 'kunserve-orchestrator[cuda]', then "
                              "--kv-extension remap)")
            if len(ranks) not in self._splits or len(ranks) > self._num_layers:
                raise Refused(f"no {len(ranks)}-way split: the store has splits {self._splits} for a "
                              f"{self._num_layers}-layer model")
            order = self._stage_order(ranks, parts)
            return self._record(ReshapeKind.DROP, order, parts)

    def _ranges(self, g: int) -> list[LayerRange]:
        counts = pp_partition(self._num_layers, g)
        return [LayerRange(sum(counts[:s]), sum(counts[:s + 1])) for s in range(g)]

    def _stage_order(self, ranks: tuple[int, ...], parts: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
        """The new group's ranks in stage order: each stage's layers must lie within those
        the rank runs now, so that it only drops weights (its KV of those layers stays).
        A matching of stages to ranks, the tightest fit first, then the order given."""
        runs = {r: rng for p in parts for r, rng in zip(p, self._ranges(len(p)))}
        stages = self._ranges(len(ranks))
        fits = [sorted((r for r in ranks if runs[r].start <= st.start and st.end <= runs[r].end),
                       key=lambda r: (len(runs[r]), ranks.index(r))) for st in stages]
        taken: dict[int, int] = {}  # rank -> stage

        def assign(stage: int, seen: set[int]) -> bool:  # a free rank first, else an augmenting path
            for r in sorted(fits[stage], key=lambda r: r in taken):
                if r not in seen:
                    seen.add(r)
                    if r not in taken or assign(taken[r], seen):
                        taken[r] = stage
                        return True
            return False

        if not all(assign(st, set()) for st in range(len(stages))):
            raise Refused(f"the instances {[list(p) for p in parts]} cannot fuse into a {len(ranks)}-stage group: "
                          f"its stages' layers {[str(st) for st in stages]} do not nest in the layers their "
                          f"ranks run ({', '.join(f'{r}: {runs[r]}' for r in ranks)})")
        return tuple(sorted(taken, key=taken.get))

    def begin_restore(self, ranks: tuple[int, ...] | None) -> list[Reshape]:
        """Check and record the restore of the group on ``ranks``, or (None) of every group."""
        with self._cond:
            groups = [g for g in self._topology.instances if len(g) > 1]
            if ranks is not None:
                groups = [g for g in groups if g == ranks]
                if not groups:
                    raise Refused(f"ranks {list(ranks)} do not form a group")
            if not groups:
                raise Refused("nothing is dropped: every rank serves as a replica")
            if self._by_rank:
                raise Refused("a drop or restore is already in progress")
            out = [self._record(ReshapeKind.RESTORE, g, self._parts.get(g, ())) for g in groups]
            for r in out:
                self._restoring[r.ranks[0]] = _Restoring(r)
            return out

    def _record(self, kind: ReshapeKind, ranks: tuple[int, ...], parts: tuple[tuple[int, ...], ...] = ()) -> Reshape:
        self._epoch += 1
        reshape = Reshape(kind, ranks, self._epoch, parts)
        for r in ranks:
            self._by_rank[r] = reshape
        return reshape

    # Finishing (the rank loop) ---------------------------------------------------------------
    def group_formed(self, msg: GroupFormed) -> None:
        """The group serves: it is one instance of the topology from now on."""
        with self._cond:
            self._parts[msg.ranks] = self._by_rank[msg.ranks[0]].parts
            self._topology = self._topology.fuse(msg.ranks)

    def member_restored(self, msg: Restored) -> tuple[int, ...] | None:
        """A member serves as a replica again; the group's ranks once all of them do."""
        with self._cond:
            group = self._by_rank[msg.rank].ranks
            progress = self._restoring[group[0]]
            progress.members.add(msg.rank)
            if progress.members != set(group):
                return None
            del self._restoring[group[0]]
            self._topology = self._topology.split(group, self._parts.pop(group, ()))
            return group

    def finish(self, ranks: tuple[int, ...]) -> None:
        """The reshape of ``ranks`` is over (the controller has caught up with it): wake its waiters."""
        with self._cond:
            for r in ranks:
                self._by_rank.pop(r, None)
            self._cond.notify_all()

    def regrouped(self, topology: Topology) -> None:
        with self._cond:
            self._topology = topology

    def wait(self, ranks: tuple[int, ...], wait_s: float) -> None:
        """Block until no rank of ``ranks`` is reshaping; ``ReshapeTimeout`` after ``wait_s``."""
        with self._cond:
            if not self._cond.wait_for(lambda: not any(r in self._by_rank for r in ranks), wait_s):
                raise ReshapeTimeout(f"reshaping ranks {list(ranks)} did not finish within {wait_s:.0f} s")
