"""Pipeline mappings: which contiguous layer range each stage of a pp-g split owns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.errors import StoreError


def pp_partition(num_layers: int, pp_size: int) -> list[int]:
    """Layer counts per stage: as even as possible, the larger stages first.

    30 layers over 4 stages gives ``[8, 8, 7, 7]`` (TensorRT-LLM's ``Mapping.pp_layers``
    split, which this store records as ``pp_partition``).
    """
    if pp_size <= 0:
        raise ValueError(f"pipeline size must be positive, got {pp_size}")
    if pp_size > num_layers:
        raise ValueError(
            f"a {pp_size}-way pipeline split needs at least {pp_size} layers; "
            f"this model has {num_layers}")
    base, extra = divmod(num_layers, pp_size)
    return [base + (1 if i < extra else 0) for i in range(pp_size)]


@dataclass(frozen=True)
class LayerRange:
    """Half-open range ``[start, end)`` of decoder layers."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid layer range [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


@dataclass(frozen=True)
class Holding:
    """Which weights a rank holds: a range of layers, and the tensors outside the layers."""

    layers: LayerRange
    embedding: bool
    final_norm: bool
    lm_head: bool
    """An untied head (a tied one is the embedding)."""

    @classmethod
    def full(cls, num_layers: int, tied: bool) -> Holding:
        return cls(LayerRange(0, num_layers), True, True, not tied)

    def lacks(self, other: Holding) -> bool:
        """Whether ``other`` holds something this does not."""
        return (other.layers.start < self.layers.start or other.layers.end > self.layers.end
                or any(getattr(other, n) and not getattr(self, n) for n in ("embedding", "final_norm", "lm_head")))


@dataclass(frozen=True)
class Mapping:
    """The TensorRT-LLM ``mapping`` of one split: world, tensor and pipeline sizes.

    Ranks are numbered as TensorRT-LLM numbers them, tensor-parallel rank innermost:
    ``rank = pp_rank * tp_size + tp_rank``.
    """

    pp_size: int
    num_layers: int
    tp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.pp_size * self.tp_size

    @property
    def partition(self) -> list[int]:
        return pp_partition(self.num_layers, self.pp_size)

    def layer_range(self, pp_rank: int) -> LayerRange:
        if not 0 <= pp_rank < self.pp_size:
            raise ValueError(f"pp rank {pp_rank} out of range for pp_size {self.pp_size}")
        counts = self.partition
        start = sum(counts[:pp_rank])
        return LayerRange(start, start + counts[pp_rank])

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    def to_json(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size,
            "pp_partition": self.partition,
            "layer_ranges": [[r.start, r.end] for r in map(self.layer_range, range(self.pp_size))],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], num_layers: int) -> "Mapping":
        try:
            mapping = cls(pp_size=int(data["pp_size"]), num_layers=num_layers,
                          tp_size=int(data.get("tp_size", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"mapping is malformed: {exc}") from exc
        if mapping.tp_size < 1:
            raise StoreError(f"mapping tp_size must be >= 1, got {mapping.tp_size}")
        recorded = data.get("pp_partition")
        if recorded is not None and list(recorded) != mapping.partition:
            raise StoreError(
                f"mapping pp_partition {recorded} does not match the expected {mapping.partition}")
        return mapping
