"""The ranks behind one cluster rank: alone (tp = 1), or a tensor-parallel set (``serve --tp N``).

The set's first rank, its leader, is the rank the cluster knows: it takes part in every
protocol as a single rank would. The other ranks, its followers, are not in the cluster's
communicator; each is in the communicator of the sets' k-th ranks (``shadow``), where its
rank number is its leader's cluster rank, so a follower meets its peers' followers exactly
where its leader meets their leaders.

Before the leader changes its state, it tells the followers over the set's communicator,
and each does the same to its own shard (``follow``):

- a step: each follower runs it on its shard, its KV heads and the same pages; the ranks
  meet in the two all-reduces of every layer. Only the leader's output is used.
- a drop to a stage: each follower keeps the same layers; its pool must grow by as many
  pages as the leader's (page ids are shared by the set), which the leader checks.
- a batch of KV moves: each follower posts the same moves of its own KV heads with the
  peer followers, and lands them when its leader's part has landed, before any later step.
- a restore: each follower pulls the weights it dropped from the peer followers.

When the leader stops, it tells the end, and the followers return.
"""

from __future__ import annotations

import logging
import signal
import traceback
from dataclasses import dataclass

from mpi4py import MPI

from engines.errors import EngineError
from engines.mapping import Holding, LayerRange
from engines.rank_engine import DropMeasure, RankEngine
from engines.step import StepInput, StepOutput
from orchestrator.cluster.kv_mover import KvMover
from orchestrator.cluster.messages import BatchId, ExchangeBatch
from orchestrator.cluster.weight_pull import restore_weights
from orchestrator.transport import Transport

logger = logging.getLogger(__name__)


# What the leader tells its followers -------------------------------------------------------
@dataclass(frozen=True)
class RunStep:
    layers: LayerRange
    step: StepInput


@dataclass(frozen=True)
class DropTo:
    layers: LayerRange


@dataclass(frozen=True)
class MovesStarted:
    batch: ExchangeBatch


@dataclass(frozen=True)
class MovesFinished:
    batch: BatchId


@dataclass(frozen=True)
class RestoreWeights:
    ranks: tuple[int, ...]
    now: tuple[Holding, ...]
    target: tuple[Holding, ...]
    stage: int


@dataclass(frozen=True)
class End:
    pass


@dataclass(frozen=True)
class TpRankDrop:
    """A TP rank's drop, measured on that rank (for the leader's event)."""

    world_rank: int
    kv_pages: int
    weight_bytes: int
    measure: DropMeasure


class SoleRank:
    """A cluster rank that is one device (tp = 1): its state changes here only."""

    size = 1

    def __init__(self, engine: RankEngine, world_rank: int) -> None:
        self.engine = engine
        self.world_ranks: tuple[int, ...] = (world_rank,)
        self.last_drop: list[TpRankDrop] = []
        """Each TP rank's part of the last drop, the leader's first."""

    def drop_to(self, layers: LayerRange) -> int:
        """Keep stage ``layers``' weights and grow the KV pool; returns the pages added."""
        pages = self.engine.drop_to(layers)
        self.last_drop = [self._measure(self.world_ranks[0])]
        return pages

    def _measure(self, world_rank: int) -> TpRankDrop:
        e = self.engine
        return TpRankDrop(world_rank, e.kv.num_pages, e.weight_memory(), e.last_drop)

    def restore(self, ranks: tuple[int, ...], now: list[Holding], target: list[Holding], stage: int,
                transport: Transport) -> tuple[int, float]:
        """Pull the weights the last drop dropped back from the peers (``now``: what each
        member holds, ``target``: what it gets back); returns (bytes received, seconds)."""
        return restore_weights(self.engine, ranks, now, target, stage, transport)

    def moves_started(self, msg: ExchangeBatch) -> None:
        pass

    def moves_finished(self, batch: BatchId) -> None:
        pass

    def release(self) -> None:
        pass


class TpLeader(SoleRank):
    """The leader of a TP set: each change goes to the followers first, then happens here."""

    def __init__(self, engine: RankEngine, comm: MPI.Comm) -> None:
        super().__init__(engine, MPI.COMM_WORLD.Get_rank())
        self.comm = comm
        self.size = comm.Get_size()
        first = MPI.COMM_WORLD.Get_rank()  # a set is world ranks in a row, its leader first (shadow_comms)
        self.world_ranks = tuple(range(first, first + self.size))
        engine.runners = {k: _LeaderRunner(r, self) for k, r in engine.runners.items()}
        self._released = False

    def tell(self, order: object) -> None:
        self.comm.bcast(order, root=0)

    def drop_to(self, layers: LayerRange) -> int:
        self.tell(DropTo(layers))
        pages = super().drop_to(layers)
        self.last_drop = self.comm.gather(self.last_drop[0], root=0)
        mismatched = [d for d in self.last_drop if d.kv_pages != self.engine.kv.num_pages]
        if mismatched:  # page ids are shared by the set: a block table would point past a pool
            raise EngineError(f"TP ranks' KV pools differ after the drop: {[(d.world_rank, d.kv_pages) for d in self.last_drop]}")
        return pages

    def restore(self, ranks, now, target, stage, transport):
        """The whole set's restore: bytes received by all its ranks, the slowest's seconds."""
        self.tell(RestoreWeights(tuple(ranks), tuple(now), tuple(target), stage))
        pulled = self.comm.gather(super().restore(ranks, now, target, stage, transport), root=0)
        return sum(b for b, _ in pulled), max(s for _, s in pulled)

    def moves_started(self, msg: ExchangeBatch) -> None:
        self.tell(MovesStarted(msg))

    def moves_finished(self, batch: BatchId) -> None:
        self.tell(MovesFinished(batch))

    def release(self) -> None:
        """The leader is stopping: the followers' loops end."""
        if not self._released:
            self._released = True
            self.tell(End())


class _LeaderRunner:
    """A stage runner of the set's leader: the step goes to the followers, then it runs here."""

    def __init__(self, runner, leader: TpLeader) -> None:
        self.runner = runner
        self.leader = leader
        self.layer_range = runner.layer_range

    def execute(self, step: StepInput) -> StepOutput:
        self.leader.tell(RunStep(self.layer_range, step))
        return self.runner.execute(step)


def shadow_comms(world: MPI.Comm, tp: int) -> tuple[MPI.Comm | None, MPI.Comm]:
    """(the TP set's communicator or None, the communicator of the sets' k-th ranks: the
    cluster's on a leader, its shadow on a follower; a set's rank there is its index).
    Collective over ``world``; with a world that ``tp`` does not divide, no split (start-up
    names the problem)."""
    if tp <= 1 or world.Get_size() % tp:
        return None, world
    rank = world.Get_rank()
    tp_comm = world.Split(rank // tp, rank)
    return tp_comm, world.Split(tp_comm.Get_rank(), rank)


def follow(engine: RankEngine, comm: MPI.Comm, shadow: MPI.Comm, transport: Transport) -> int:
    """A follower's life: do each change its leader tells, on this rank's shard.

    SIGINT and SIGTERM (which mpirun forwards to every rank) are left to the leader: it
    stops its loop and then releases the followers, so a follower never leaves a leader
    waiting in an all-reduce. A follower that fails takes the job down, as a leader does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    me = shadow.Get_rank()
    logger.info("tp follower of world rank %d: rank %d of %d", MPI.COMM_WORLD.Get_rank() - comm.Get_rank(),
                comm.Get_rank(), comm.Get_size())
    mover = KvMover(me, engine.kv, transport)
    steps = 0
    try:
        while True:
            order = comm.bcast(None, root=0)
            if isinstance(order, RunStep):
                engine.runner(order.layers).execute(order.step)
                steps += 1
                if steps == 1:
                    logger.info("tp follower: ran the leader's first step (%d tokens on layers %s)",
                                sum(c.num_tokens for c in order.step.chunks), order.layers)
            elif isinstance(order, DropTo):
                engine.drop_to(order.layers)
                comm.gather(TpRankDrop(MPI.COMM_WORLD.Get_rank(), engine.kv.num_pages, engine.weight_memory(),
                                       engine.last_drop), root=0)
            elif isinstance(order, MovesStarted):
                mover.start(order.batch)
                mover.post_all()
            elif isinstance(order, MovesFinished):
                logger.info("tp follower: %s landed, %d bytes of KV received", order.batch, mover.finish(order.batch))
            elif isinstance(order, RestoreWeights):
                nbytes, seconds = restore_weights(engine, order.ranks, list(order.now), list(order.target), order.stage,
                                                  transport)
                comm.gather((nbytes, seconds), root=0)
                logger.info("tp follower: restored %.1f MiB of weights from peer followers in %.3f s",
                            nbytes / 2**20, seconds)
            elif isinstance(order, End):
                logger.info("tp follower: the leader stopped after %d steps", steps)
                return 0
            else:
                raise TypeError(f"unexpected order {type(order).__name__} from the TP leader")
    except Exception:  # the leader would wait for this rank forever: end the job
        logger.error("tp follower failed:\n%s", traceback.format_exc())
        MPI.COMM_WORLD.Abort(1)
        raise
