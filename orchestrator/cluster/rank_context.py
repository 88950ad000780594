"""What the reshape and migration protocols may use of their rank, and the rank's role.

``RankContext`` is the typed face a protocol (drop, restore, migration) gets of its rank:
identity, resources, delivery, and the one way to change what the rank is, ``take_role``.
The rank loop implements it and is the only writer of a rank's role, driver and worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engines.mapping import LayerRange

if TYPE_CHECKING:  # types only: the loop imports these modules, not the other way round
    from engines.rank_engine import RankEngine
    from orchestrator.cluster.faults import Faults
    from orchestrator.cluster.instance import InstanceDriver, StageWorker
    from orchestrator.cluster.tp_set import SoleRank
    from orchestrator.core.scheduler import SchedulerConfig
    from orchestrator.kunserve.cost_model import CostModel
    from orchestrator.transport import Transport


@dataclass(frozen=True)
class Role:
    """A rank's place in the topology."""

    instance: int
    """The instance it belongs to, named by its leader rank."""
    stage: int
    size: int
    """Stages of the instance: 1 for a replica."""
    layers: LayerRange
    """The layers this rank runs."""

    @property
    def kind(self) -> str:
        return "replica" if self.size == 1 else "group"


class Sender(Protocol):
    """Non-blocking sends of control messages and pipeline traffic (the rank's Messenger)."""

    def send_control(self, dst: int, msg: object) -> None: ...


class RankContext(Protocol):
    """A rank as its protocols see it."""

    rank: int
    engine: RankEngine
    devices: SoleRank
    """The devices behind this rank (a TP set's leader and followers): the one way to drop
    and restore weights, so that every device of the set does it."""
    transport: Transport
    messenger: Sender
    sched_config: SchedulerConfig
    cost_model: CostModel | None
    faults: Faults
    role: Role

    @property
    def driver(self) -> InstanceDriver | None:
        """The instance driver when this rank leads an instance that serves."""

    def take_role(self, role: Role, driver: InstanceDriver | None = None,
                  worker: StageWorker | None = None) -> None:
        """Become ``role``: a leader with ``driver``, a later stage with ``worker``, or (during
        a drop, before the group forms) neither."""

    def rank_info(self) -> object:
        """This rank's ``RankInfo`` for the controller."""

    def send_to_rank(self, rank: int, msg: object) -> None: ...

    def to_controller(self, msg: object) -> None: ...
