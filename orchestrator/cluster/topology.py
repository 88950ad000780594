"""Which ranks form which serving instances: ``--groups 0-1,2-3``."""

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
    def parse(cls, text: str | None, world_size: int) -> "Topology":
        """Parse ``"0-1,2,3"``: ranges are groups, single ranks replicas; ranks not named
        become replicas. Groups must be contiguous ranges of ranks."""
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

    def instance_of(self, rank: int) -> int:
        for i, ranks in enumerate(self.instances):
            if rank in ranks:
                return i
        raise KeyError(rank)

    def ranks_of_rank(self, rank: int) -> tuple[int, ...]:
        """The ranks of the instance ``rank`` belongs to."""
        return self.instances[self.instance_of(rank)]

    def stage_of(self, rank: int) -> int:
        return self.instances[self.instance_of(rank)].index(rank)

    def ranks_of(self, instance: int) -> tuple[int, ...]:
        """The ranks of the instance led by rank ``instance``."""
        for ranks in self.instances:
            if ranks[0] == instance:
                return ranks
        raise KeyError(f"no instance is led by rank {instance}")

    def group_sizes(self) -> set[int]:
        return {len(ranks) for ranks in self.instances}

    def __str__(self) -> str:
        return ",".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in self.instances)
