"""The online drop planner: which replicas to fuse into pipeline groups, and how large.

DESIGN.md section 2, step 2. A pure function of a load snapshot and of the model's memory
figures: no MPI, no torch. The cluster carries the plan out (drop, exchange, pipeline).

Terms used below, for one instance:

- *need*: the tokens its requests need, ``max(demand, used + queued)``;
- *deficit*: ``max(0, need - capacity)``, the tokens that do not fit in its own pool;
- *spare*: ``capacity - need``, what a partner brings besides its dropped weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engines.mapping import pp_partition

logger = logging.getLogger(__name__)

# The reason line names this many groups, then counts the rest (plans over 1,000
# instances would otherwise log a page).
_REASON_GROUPS = 4


@dataclass(frozen=True)
class InstanceSnapshot:
    """What the planner sees of one instance."""

    instance: int
    """The instance id."""
    ranks: tuple[int, ...]
    """Its ranks: one for a replica, several for a group already fused."""
    capacity_tokens: int
    """Tokens its KV pool holds (a group's: tokens every stage can hold)."""
    demand_tokens: int
    """Full token counts of its running, waiting and swapped requests."""
    queued_tokens: int
    """Tokens of the requests waiting for admission."""
    free_tokens: int
    """Tokens its pool can still take."""
    overloaded: bool
    """Its overload vote (``LoadMonitor.votes_overload``)."""

    def __post_init__(self) -> None:
        if not self.ranks:
            raise ValueError(f"instance {self.instance} has no ranks")
        for name in ("capacity_tokens", "demand_tokens", "queued_tokens", "free_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"instance {self.instance}: {name} must be >= 0")
        if self.free_tokens > self.capacity_tokens:
            raise ValueError(
                f"instance {self.instance}: free_tokens ({self.free_tokens}) exceeds "
                f"capacity_tokens ({self.capacity_tokens})")

    @property
    def is_replica(self) -> bool:
        """One rank with the full model: the only kind this planner merges."""
        return len(self.ranks) == 1

    @property
    def need_tokens(self) -> int:
        """Tokens its requests need: their full demand, and never less than what is
        resident plus what waits (``capacity - free`` is what is resident)."""
        return max(self.demand_tokens, self.capacity_tokens - self.free_tokens + self.queued_tokens)

    @property
    def deficit_tokens(self) -> int:
        """Tokens of need that its own pool cannot hold."""
        return max(0, self.need_tokens - self.capacity_tokens)

    @property
    def spare_tokens(self) -> int:
        """Capacity its requests will not need (negative when it has a deficit)."""
        return self.capacity_tokens - self.need_tokens


@dataclass(frozen=True)
class ModelMemory:
    """The model's memory figures, from which group capacities follow."""

    num_layers: int
    """Decoder layers of the model."""
    kv_bytes_per_token: int
    """K and V bytes of one token over all layers."""
    layer_weight_bytes: int
    """Bytes of one decoder layer's weights (embeddings and head are never dropped)."""
    kv_pool_bytes: int
    """A replica rank's KV pool bytes before any drop."""
    splits: tuple[int, ...]
    """Pipeline sizes the engine store was built for, e.g. ``(1, 2, 4)``."""

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.kv_bytes_per_token < 1:
            raise ValueError("num_layers and kv_bytes_per_token must be >= 1")
        if self.layer_weight_bytes < 0 or self.kv_pool_bytes < 0:
            raise ValueError("layer_weight_bytes and kv_pool_bytes must be >= 0")
        if not self.splits or min(self.splits) < 1:
            raise ValueError(f"splits must be non-empty positive sizes, got {self.splits}")


@dataclass(frozen=True)
class DropPlan:
    """Which instances to fuse, and what it buys."""

    groups: tuple[tuple[int, ...], ...]
    """Instance ids to fuse; each tuple becomes one group, its order the stage order."""
    deficit_tokens: int
    """Total deficit of the instances voting overload, before the plan."""
    added_tokens: int
    """KV capacity the plan adds: groups' capacities minus their members' capacities."""
    unmet_tokens: int
    """Deficit the plan cannot cover (0 when it covers everything)."""
    reason: str
    """One human-readable line saying why."""

    @property
    def empty(self) -> bool:
        """Nothing to merge."""
        return not self.groups

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for /admin and the log)."""
        return {
            "groups": [list(group) for group in self.groups],
            "deficit_tokens": self.deficit_tokens,
            "added_tokens": self.added_tokens,
            "unmet_tokens": self.unmet_tokens,
            "reason": self.reason,
        }


def group_capacity_tokens(mem: ModelMemory, g: int) -> int:
    """KV token capacity of a g-stage group fused from g replicas.

    The largest stage, ``ceil(L/g)`` layers, binds: its pool grows by the weights of the
    layers it drops, and one token costs it only its layers' share of the KV bytes. A
    token occupies every stage, so that stage's token count is the group's. ``g = 1``
    gives ``kv_pool_bytes // kv_bytes_per_token``.
    """
    layers = mem.num_layers
    if not 1 <= g <= layers:
        raise ValueError(f"the model's {layers} layers cannot be split {g} ways")
    stage = -(-layers // g)
    pool = mem.kv_pool_bytes + (layers - stage) * mem.layer_weight_bytes
    # pool / (kv_bytes_per_token * stage / layers), kept in integers.
    return pool * layers // (mem.kv_bytes_per_token * stage)


def allowed_group_sizes(mem: ModelMemory, max_group_size: int | None = None) -> tuple[int, ...]:
    """Group sizes the planner may form, ascending: store splits in ``[2, max_group_size]``.

    Raises ``ValueError`` when no merge is possible, so a misconfiguration is reported at
    the first plan, not silently planned around.
    """
    layers = mem.num_layers
    if max_group_size is not None:
        if max_group_size > layers:
            raise ValueError(f"the model's {layers} layers cannot be split {max_group_size} ways")
        if max_group_size < 2:
            raise ValueError(f"max_group_size must be >= 2 to merge anything, got {max_group_size}")
    larger = sorted({g for g in mem.splits if g >= 2})
    if not larger:
        raise ValueError(f"the store has no pipeline split larger than 1 (splits {mem.splits})")
    if larger[0] > layers:
        raise ValueError(f"the model's {layers} layers cannot be split {larger[0]} ways")
    limit = layers if max_group_size is None else max_group_size
    sizes = tuple(g for g in larger if g <= limit)
    if not sizes:
        raise ValueError(
            f"the store has no pipeline split between 2 and max_group_size={max_group_size} "
            f"(splits {mem.splits})")
    return sizes


class _Cursor:
    """The instances still free while a plan is built.

    Leads are the overloaded replicas ``voters[head..tail]`` (most deficit first); a
    group fills up with partners from ``next_partner`` on (most spare first), then with
    the least overloaded free voters from ``tail`` down. Every instance is taken once,
    so every instance lands in at most one group.
    """

    def __init__(self, voters: list[InstanceSnapshot], partners: list[InstanceSnapshot]) -> None:
        self.voters = voters
        self.partners = partners
        self.head = 0
        self.tail = len(voters) - 1
        self.next_partner = 0

    def has_lead(self) -> bool:
        return self.head <= self.tail

    def take_lead(self) -> InstanceSnapshot:
        self.head += 1
        return self.voters[self.head - 1]

    def take_member(self) -> tuple[InstanceSnapshot, bool] | None:
        """The next member and whether it is a voter; None when nobody is free."""
        if self.next_partner < len(self.partners):
            self.next_partner += 1
            return self.partners[self.next_partner - 1], False
        if self.tail >= self.head:
            self.tail -= 1
            return self.voters[self.tail + 1], True
        return None

    def give_back(self, taken: list[tuple[InstanceSnapshot, bool]]) -> None:
        """Return the last members taken (a suffix of the taking order)."""
        for _, is_voter in taken:
            if is_voter:
                self.tail += 1
            else:
                self.next_partner -= 1


def _build_group(cursor: _Cursor, mem: ModelMemory,
                 sizes: tuple[int, ...]) -> tuple[list[InstanceSnapshot], int]:
    """Grow a group around the next lead through ``sizes`` until it covers its need.

    Returns the members (overloaded ones first, then partners) and the shortfall, need
    minus capacity (<= 0 when covered). When no size covers, the size leaving the least
    deficit unmet wins, counting a merged voter's own deficit as a saving: normally the
    largest reachable size, but a larger group is never taken when it would do worse
    (capacities reported apart from the model's figures can make it so). A single
    member means the lead stays alone.
    """
    lead = cursor.take_lead()
    taken: list[tuple[InstanceSnapshot, bool]] = []
    need, merged_deficit = lead.need_tokens, 0
    best_size, best_shortfall, best_score = 1, lead.deficit_tokens, lead.deficit_tokens
    for g in sizes:
        while 1 + len(taken) < g and (member := cursor.take_member()) is not None:
            taken.append(member)
            need += member[0].need_tokens
            merged_deficit += member[0].deficit_tokens  # 0 for a partner
        if 1 + len(taken) < g:
            break
        shortfall = need - group_capacity_tokens(mem, g)
        unmet = min(max(0, shortfall), lead.deficit_tokens + merged_deficit)
        if unmet - merged_deficit < best_score:
            best_size, best_shortfall, best_score = g, shortfall, unmet - merged_deficit
        if shortfall <= 0:
            break
    cursor.give_back(taken[best_size - 1:])
    kept = taken[:best_size - 1]
    voters = [m for m, is_voter in kept if is_voter]
    partners = [m for m, is_voter in kept if not is_voter]
    return [lead] + voters + partners, best_shortfall


def plan_drop(snapshot: list[InstanceSnapshot], mem: ModelMemory,
              max_group_size: int | None = None) -> DropPlan:
    """Plan which replicas to fuse so that the overloaded ones' requests fit.

    Greedy, O(N log N): overloaded replicas by deficit, descending, each leads a group
    and takes the least loaded non-overloaded replicas (by spare, descending) through the
    allowed sizes (``allowed_group_sizes``), stopping at the smallest size whose
    capacity (``group_capacity_tokens``) covers the members' total need. When no such
    partner is left, the least overloaded remaining replicas join instead: they too gain
    their dropped weights' memory. An overloaded replica with no deficit (its queue is
    exactly its free space) is left alone. Deficit, need and spare are defined in the
    module docstring.

    An overloaded group with a deficit then fuses with a group of its own size that has
    spare room, into one of twice the size, where the store has that split and its stages
    nest in the groups' (``grows_into``): such a group ends as one fused from replicas
    would, so ``group_capacity_tokens`` gives its capacity. An overloaded group with no
    such partner keeps its deficit unmet. Raises ``ValueError`` for duplicate instance ids
    or group sizes the model or store cannot take.
    """
    sizes = allowed_group_sizes(mem, max_group_size)
    ids = [s.instance for s in snapshot]
    if len(set(ids)) != len(ids):
        raise ValueError("the snapshot names an instance more than once")
    voters = [s for s in snapshot if s.overloaded]
    if not voters:
        return DropPlan((), 0, 0, 0, "no instance votes overload")
    leads = sorted((s for s in voters if s.is_replica and s.deficit_tokens > 0),
                   key=lambda s: (-s.deficit_tokens, s.instance))
    partners = sorted((s for s in snapshot
                       if s.is_replica and not s.overloaded and s.deficit_tokens == 0),
                      key=lambda s: (-s.spare_tokens, s.instance))
    cursor = _Cursor(leads, partners)
    groups: list[tuple[int, ...]] = []
    added = 0
    unmet = 0
    while cursor.has_lead():
        members, shortfall = _build_group(cursor, mem, sizes)
        voters_deficit = sum(m.deficit_tokens for m in members if m.overloaded)
        unmet += min(max(0, shortfall), voters_deficit)
        if len(members) > 1:
            groups.append(tuple(m.instance for m in members))
            capacity = group_capacity_tokens(mem, len(members))
            added += capacity - sum(m.capacity_tokens for m in members)
    grown, grown_added, grown_unmet = _grow_groups(snapshot, mem, sizes)
    groups += grown
    added += grown_added
    unmet += grown_unmet
    deficit = sum(s.deficit_tokens for s in voters)
    reason = _reason(voters, deficit, groups, added, unmet)
    plan = DropPlan(tuple(groups), deficit, added, unmet, reason)
    logger.debug("drop plan: %s", plan.reason)
    return plan


def grows_into(num_layers: int, p: int, q: int) -> bool:
    """Whether every stage of a q-stage split lies within one stage of a p-stage split, so
    that p-groups fuse into a q-group by dropping weights only."""
    def bounds(g: int) -> set[int]:
        counts = pp_partition(num_layers, g)
        return {sum(counts[:i]) for i in range(g + 1)}
    return q % p == 0 and bounds(p) <= bounds(q)


def _grow_groups(snapshot: list[InstanceSnapshot], mem: ModelMemory,
                 sizes: tuple[int, ...]) -> tuple[list[tuple[int, ...]], int, int]:
    """Overloaded groups fused pairwise with a same-size group that has room: (the new
    groups, tokens added, deficit unmet). Most deficit first, each with the most spare."""
    groups, added, unmet = [], 0, 0
    for p in sorted({len(s.ranks) for s in snapshot if not s.is_replica}):
        same = [s for s in snapshot if len(s.ranks) == p]
        leads = sorted((s for s in same if s.overloaded and s.deficit_tokens > 0),
                       key=lambda s: (-s.deficit_tokens, s.instance))
        partners = sorted((s for s in same if not s.overloaded and s.deficit_tokens == 0),
                          key=lambda s: (-s.spare_tokens, s.instance))
        can_grow = 2 * p in sizes and grows_into(mem.num_layers, p, 2 * p)
        for lead in leads:
            if not (can_grow and partners):
                unmet += lead.deficit_tokens
                continue
            partner = partners.pop(0)
            capacity = group_capacity_tokens(mem, 2 * p)
            groups.append((lead.instance, partner.instance))
            added += capacity - lead.capacity_tokens - partner.capacity_tokens
            unmet += min(max(0, lead.need_tokens + partner.need_tokens - capacity), lead.deficit_tokens)
    return groups, added, unmet


def _reason(voters: list[InstanceSnapshot], deficit: int, groups: list[tuple[int, ...]],
            added: int, unmet: int) -> str:
    """The plan's one-line explanation."""
    n = len(voters)
    text = f"{n} instance{'s' if n != 1 else ''} overloaded (deficit {deficit:,} tokens)"
    if groups:
        named = ", ".join("+".join(str(i) for i in group) for group in groups[:_REASON_GROUPS])
        if len(groups) > _REASON_GROUPS:
            named += f" and {len(groups) - _REASON_GROUPS} more groups"
        text += f"; merging {named} adds {added:,} tokens"
    else:
        text += "; nothing to merge"
    grown = {g[0] for g in groups}
    stuck = [s.instance for s in voters if not s.is_replica and s.deficit_tokens > 0 and s.instance not in grown]
    if stuck:
        which = "group" if len(stuck) == 1 else "groups"
        verb = "has" if len(stuck) == 1 else "have"
        named = ", ".join(map(str, stuck))
        text += f"; {which} {named} {verb} no same-size partner or split to grow into"
    if unmet:
        text += f"; {unmet:,} tokens unmet"
    return text
