"""Which ranks form which serving instances (``--groups 0-1,2-3``), and how a drop
(``fuse``) or a restore (``split``) changes that."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """A partition of the ranks into instances, each listing its ranks in stage order.

    An instance is named by its first rank, its leader: that name survives reshapes of
    other instances."""

    instances: tuple[tuple[int, ...], ...]

    @classmethod
    def replicas(cls, world_size: int) -> "Topology":
        return cls(tuple((r,) for r in range(world_size)))

    @classmethod
    def parse(cls, text: str | None, world_size: int, tp: int = 1) -> "Topology":
        """Parse ``"0-1,2,3"``: ranges are groups, single ranks replicas; ranks not named
        become replicas. Groups must be contiguous ranges of ranks.

        With ``tp`` > 1 the text names MPI world ranks, of which each ``tp`` in a row form one
        cluster rank (a TP set: world ranks k*tp .. k*tp+tp-1 are set k); a group must be
        whole sets, and the topology is over the sets."""
        if tp > 1:
            return cls._parse_tp(text, world_size, tp)
        if not text:
            return cls.replicas(world_size)
        groups: list[tuple[int, ...]] = []
        for part in text.split(","):
            part = part.strip()
            try:
                lo, _, hi = part.partition("-")
                first, last = int(lo), int(hi or lo)
            except ValueError:
                raise ValueError(f"--groups: cannot parse {part!r} (use e.g. 0-1,2-3)") from None
            if first > last:
                raise ValueError(f"--groups: {part!r} runs backwards")
            groups.append(tuple(range(first, last + 1)))
        named = [r for g in groups for r in g]
        if len(set(named)) != len(named):
            raise ValueError(f"--groups {text!r} names a rank twice")
        if any(r < 0 or r >= world_size for r in named):
            raise ValueError(f"--groups {text!r} names ranks outside 0-{world_size - 1}")
        groups += [(r,) for r in range(world_size) if r not in named]
        return cls(tuple(sorted(groups)))

    @classmethod
    def _parse_tp(cls, text: str | None, world_size: int, tp: int) -> "Topology":
        named = [g for g in cls.parse(text, world_size).instances if text and len(g) > 1 or g[0] in cls._singles(text)]
        groups = []
        for g in named:
            if g[0] % tp or len(g) % tp:
                raise ValueError(f"--groups {text!r}: with --tp {tp} an instance is whole TP sets (world ranks "
                                 f"{tp}k to {tp}k+{tp - 1} form set k); {g[0]}-{g[-1]} splits one")
            groups.append(f"{g[0] // tp}-{(g[-1] + 1) // tp - 1}")
        return cls.parse(",".join(groups), world_size // tp)

    @staticmethod
    def _singles(text: str | None) -> set[int]:
        """The ranks ``text`` names alone (replicas), already checked by ``parse``."""
        return {int(p) for p in (text or "").split(",") if p.strip() and "-" not in p}

    def instance_of(self, rank: int) -> int:
        for i, ranks in enumerate(self.instances):
            if rank in ranks:
                return i
        raise KeyError(rank)

    def ranks_of_rank(self, rank: int) -> tuple[int, ...]:
        """The ranks of the instance ``rank`` belongs to."""
        return self.instances[self.instance_of(rank)]

    def parts_of(self, ranks: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """The instances ``ranks`` cover, which must be whole."""
        parts = sorted({self.ranks_of_rank(r) for r in ranks})
        if broken := [p for p in parts if not set(p) <= set(ranks)]:
            raise ValueError(f"ranks {sorted(ranks)} take only part of the instances {[list(p) for p in broken]}")
        return tuple(parts)

    def fuse(self, ranks: tuple[int, ...]) -> "Topology":
        """The topology once the instances on ``ranks`` form one group (stage order)."""
        parts = self.parts_of(ranks)
        return Topology(tuple(sorted([i for i in self.instances if i not in parts] + [tuple(ranks)])))

    def split(self, group: tuple[int, ...], parts: tuple[tuple[int, ...], ...] = ()) -> "Topology":
        """The topology once ``group`` is split back into ``parts`` (default: replicas)."""
        if group not in self.instances:
            raise ValueError(f"{list(group)} is not a group of {self}")
        parts = parts or tuple((r,) for r in group)
        if sorted(r for p in parts for r in p) != sorted(group):
            raise ValueError(f"{[list(p) for p in parts]} do not make up the group {list(group)}")
        return Topology(tuple(sorted([i for i in self.instances if i != group] + list(parts))))

    def group_sizes(self) -> set[int]:
        return {len(ranks) for ranks in self.instances}

    def __str__(self) -> str:
        return ",".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in self.instances)
