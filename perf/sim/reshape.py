"""Drops and restores on the simulated clock, as ``serve`` carries them out
(``orchestrator/cluster/formation.py`` and ``split.py``), with their times from the fabric.

A drop (``SimDrop``):

    DRAINING    each instance to fuse launches nothing new; its micro-batches finish
    REMAPPING   every member frees the layers outside its new stage and turns their memory
                into KV (``Fabric.remap_seconds``); the members do it at once
    EXCHANGING  the group serves: every request is adopted at once; a request with KV
                ("stale") is held while its pages of the layers its home no longer runs
                move to their new owners, in batches of ``EXCHANGE_BATCH_REQUESTS``, up to
                ``BATCHES_IN_FLIGHT`` at once, each batch's requests resuming when it lands;
                a request the owners have no room for is recomputed
    DONE

A restore (``SimRestore``):

    DRAINING    the group launches nothing new; its micro-batches finish
    MOVING      every request goes to the part (the instances the group was fused from)
                with the most free pages, its KV of each layer moved to the part's rank
                that runs the layer, in one batch; one no part can hold is recomputed there
    PULLING     each member takes back the layers it dropped from the peers that kept
                them, and gives the KV extension back; a part serves when its members have
    DONE

Both are the same state machines as the real ones, with each transfer's bytes computed
from the pages and layers it moves; their results are typed records (``ReshapeRecord``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from engines.mapping import LayerRange, pp_partition
from engines.paging import pages_for_tokens
from orchestrator.cluster.formation import BATCHES_IN_FLIGHT, EXCHANGE_BATCH_REQUESTS
from orchestrator.core.block_manager import PoolSpec
from perf.sim.instance import Moved, SimContext, SimInstance
from perf.sim.loop_turns import turn_bound_copy
from perf.sim.memory import MemoryLayout


class Phase(enum.IntEnum):
    DRAINING = 0
    REMAPPING = 1
    EXCHANGING = 2
    MOVING = 3
    PULLING = 4
    DONE = 5


@dataclass
class ReshapeRecord:
    """What one drop or restore did, in simulated seconds and bytes."""

    kind: str
    ranks: tuple[int, ...]
    started_s: float
    serving_s: float | None = None
    """When the new shape served (a drop: the group; a restore: the last part)."""
    done_s: float | None = None
    """When the last move landed."""
    requests: int = 0
    kv_bytes: int = 0
    """KV moved between ranks."""
    weight_bytes: int = 0
    """Weights pulled back (a restore) or turned into KV (a drop), all members."""
    recomputed: int = 0
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kind": self.kind, "ranks": list(self.ranks), "started_s": self.started_s,
                "serving_s": self.serving_s, "done_s": self.done_s, "requests": self.requests,
                "kv_bytes": self.kv_bytes, "weight_bytes": self.weight_bytes, "recomputed": self.recomputed,
                **self.detail}


def stage_ranges(num_layers: int, stages: int) -> list[LayerRange]:
    counts = pp_partition(num_layers, stages)
    starts = [sum(counts[:i]) for i in range(stages)]
    return [LayerRange(s, s + c) for s, c in zip(starts, counts)]


def _kv_moves(m: Moved, owner: tuple[int, ...], layout: MemoryLayout) -> dict[tuple[int, int], int]:
    """Bytes of ``m``'s KV per (source rank, destination rank) to bring each layer to
    ``owner`` (a rank's: its TP set's devices move their heads' pages side by side)."""
    per_layer = pages_for_tokens(m.computed, layout.page_size) * layout.page_bytes * layout.tp
    out: dict[tuple[int, int], int] = {}
    for src, dst in zip(m.layer_rank, owner):
        if src != dst:
            out[src, dst] = out.get((src, dst), 0) + per_layer
    return out


class _Batch:
    """Transfers that land together, each bound to its ranks' loop turns
    (``perf.sim.loop_turns.turn_bound_copy``); ``then`` runs at ``leader``'s next turn after
    the last has landed (the members' done messages reach it there)."""

    def __init__(self, ctx: SimContext, moves: dict[tuple[int, int], int], then: Callable[[], None],
                 leader: int) -> None:
        self.ctx = ctx
        self.left = sum(1 for n in moves.values() if n)
        self.then = then
        self.leader = leader
        if not self.left:
            ctx.clock.after(0.0, then)
        for (src, dst), n in moves.items():
            if n:
                turn_bound_copy(ctx, src, dst, n, self._landed)

    def _landed(self) -> None:
        self.left -= 1
        if not self.left:
            self.ctx.rank(self.leader).at_turn(self.then)


class SimDrop:
    def __init__(self, ctx: SimContext, parts: list[SimInstance], on_group: Callable[[SimInstance], None],
                 on_done: Callable[["SimDrop"], None]) -> None:
        self.ctx = ctx
        self.parts = parts
        self.ranks = tuple(r for p in parts for r in p.ranks)
        self.on_group = on_group
        self.on_done = on_done
        self.phase = Phase.DRAINING
        self.record = ReshapeRecord("drop", self.ranks, ctx.clock.now)
        self.group: SimInstance | None = None
        self._idle = 0
        self._stale: list[Moved] = []
        self._in_flight = 0

    def start(self) -> None:
        for p in self.parts:
            p.pause(self._drained)

    def _drained(self) -> None:
        self._idle += 1
        if self._idle < len(self.parts):
            return
        self.phase = Phase.REMAPPING
        layout = self.ctx.layout
        self.ranges = stage_ranges(layout.num_layers, len(self.ranks))
        before = {r: len(rng) for p in self.parts for r, rng in zip(p.ranks, p.ranges)}
        freed = [(before[r] - len(rng)) * layout.layer_weight_bytes * layout.tp for r, rng in zip(self.ranks, self.ranges)]
        self.record.weight_bytes = sum(freed)
        self.ctx.clock.after(max(self.ctx.fabric.remap_seconds(b) for b in freed), self._form)

    def _form(self) -> None:
        layout = self.ctx.layout
        pools = [PoolSpec(rng, layout.stage_pages(len(rng))) for rng in self.ranges]
        group = SimInstance(self.ctx, self.ranks, self.ranges, pools)
        owner = group.layer_rank()
        moved = [m for p in self.parts for m in p.export()]
        for m in moved:
            stale = m.computed > 0 and m.layer_rank != owner
            if group.adopt(m, held=stale):
                if stale:
                    self._stale.append(m)
            else:
                self.record.recomputed += 1
        self.record.requests = len(moved)
        self.group = group
        self.phase = Phase.EXCHANGING
        self.record.serving_s = self.ctx.clock.now
        self.on_group(group)
        group.kick()
        self._owner = owner
        self._post()

    def _post(self) -> None:
        while self._stale and self._in_flight < BATCHES_IN_FLIGHT:
            batch, self._stale = self._stale[:EXCHANGE_BATCH_REQUESTS], self._stale[EXCHANGE_BATCH_REQUESTS:]
            moves: dict[tuple[int, int], int] = {}
            for m in batch:
                for key, n in _kv_moves(m, self._owner, self.ctx.layout).items():
                    moves[key] = moves.get(key, 0) + n
            self.record.kv_bytes += sum(moves.values())
            self._in_flight += 1
            _Batch(self.ctx, moves, lambda batch=batch: self._landed(batch), self.ranks[0])
        if not self._stale and not self._in_flight and self.phase == Phase.EXCHANGING:
            self.phase = Phase.DONE
            self.record.done_s = self.ctx.clock.now
            self.on_done(self)

    def _landed(self, batch: list[Moved]) -> None:
        self._in_flight -= 1
        self.group.release_held([m.req.seq_id for m in batch])
        self._post()


class SimRestore:
    def __init__(self, ctx: SimContext, group: SimInstance, parts: list[tuple[int, ...]],
                 on_parts: Callable[[SimInstance, list[SimInstance]], None],
                 on_done: Callable[["SimRestore"], None]) -> None:
        """``parts``: the rank tuples of the instances the group was fused from."""
        self.ctx = ctx
        self.group = group
        self.part_ranks = parts
        self.on_parts = on_parts
        self.on_done = on_done
        self.phase = Phase.DRAINING
        self.record = ReshapeRecord("restore", group.ranks, ctx.clock.now)

    def start(self) -> None:
        self.group.pause(self._drained)

    def _drained(self) -> None:
        self.phase = Phase.MOVING
        layout = self.ctx.layout
        parts = []
        for ranks in self.part_ranks:
            ranges = stage_ranges(layout.num_layers, len(ranks))
            pools = [PoolSpec(rng, layout.stage_pages(len(rng)) if len(ranks) > 1 else layout.replica_pages())
                     for rng in ranges]
            inst = SimInstance(self.ctx, ranks, ranges, pools)
            inst.paused = True  # until its weights are back
            parts.append(inst)
        moved = sorted(self.group.export(), key=lambda m: m.sim.arrival_s)
        load = [0] * len(parts)
        moves: dict[tuple[int, int], int] = {}
        for m in moved:
            target = self._place(m, parts, load, moves)
            load[target] += m.req.num_tokens
        self.record.requests = len(moved)
        self.record.kv_bytes = sum(moves.values())
        self.parts = parts
        _Batch(self.ctx, moves, self._pull, self.group.leader)

    def _place(self, m: Moved, parts: list[SimInstance], load: list[int], moves: dict) -> int:
        """The part with the most free pages that can hold ``m``'s KV (``Split._place``);
        when none can, the least loaded one recomputes it."""
        order = range(len(parts))
        if m.computed:
            for p in sorted(order, key=lambda p: -min(a.num_free for a in parts[p].scheduler.blocks.allocators)):
                if parts[p].adopt(m, or_recompute=False):
                    for key, n in _kv_moves(m, parts[p].layer_rank(), self.ctx.layout).items():
                        moves[key] = moves.get(key, 0) + n
                    return p
            self.record.recomputed += 1
        p = min(order, key=lambda p: load[p])
        parts[p].adopt(m)
        return p

    def _pull(self) -> None:
        """Each member pulls the layers it dropped from the group's rank that ran them."""
        self.phase = Phase.PULLING
        layout = self.ctx.layout
        holder = self.group.layer_rank()
        self._waiting = {id(p): 0 for p in self.parts}
        pulls: list[tuple[SimInstance, dict[tuple[int, int], int]]] = []
        for part in self.parts:
            moves: dict[tuple[int, int], int] = {}
            for layer, dst in enumerate(part.layer_rank()):
                src = holder[layer]
                if src != dst:
                    moves[src, dst] = moves.get((src, dst), 0) + layout.layer_weight_bytes * layout.tp
            self.record.weight_bytes += sum(moves.values())
            pulls.append((part, moves))
        self.on_parts(self.group, self.parts)
        self._left = len(pulls)
        for part, moves in pulls:
            _Batch(self.ctx, moves, lambda part=part: self._served(part), part.leader)

    def _served(self, part: SimInstance) -> None:
        part.paused = False
        part.kick()
        self._left -= 1
        if not self._left:
            self.phase = Phase.DONE
            self.record.serving_s = self.record.done_s = self.ctx.clock.now
            self.on_done(self)
