"""A tensor-parallel set below the cluster (``serve --tp N``).

The set's first rank, its leader, is the rank the cluster knows: it takes part in every
protocol as a single rank would. The other ranks, its followers, are not in the cluster's
communicator; they mirror each step the leader's runners take. Before running a step on
its shard, the leader broadcasts the step over the set's communicator. Each follower then
runs the same step on its own shard and its own KV heads, with the same pages, and the
ranks meet in the two all-reduces of every layer. Only the leader's output is used: it
samples, and the others' equal logits are dropped. When the leader stops, it broadcasts
the end, and the followers return.
"""

from __future__ import annotations

import logging
import signal

from mpi4py import MPI

from engines.rank_engine import RankEngine
from engines.step import StepInput, StepOutput

logger = logging.getLogger(__name__)

_END = None
"""What the leader broadcasts when it stops (a step is a ``(layers, StepInput)`` pair)."""


class LeaderRunner:
    """A stage runner of the set's leader: the step goes to the followers, then it runs here."""

    def __init__(self, runner, comm: MPI.Comm) -> None:
        self.runner = runner
        self.comm = comm
        self.layer_range = runner.layer_range

    def execute(self, step: StepInput) -> StepOutput:
        self.comm.bcast((self.layer_range, step), root=0)
        return self.runner.execute(step)


def lead(engine: RankEngine, comm: MPI.Comm) -> None:
    """Make ``engine``'s runners broadcast their steps to the set's followers."""
    engine.runners = {k: LeaderRunner(r, comm) for k, r in engine.runners.items()}


def release(comm: MPI.Comm) -> None:
    """The leader is stopping: the followers' loops end."""
    comm.bcast(_END, root=0)


def follow(engine: RankEngine, comm: MPI.Comm) -> int:
    """A follower's life: run each step the leader broadcasts on this rank's shard.

    SIGINT and SIGTERM (which mpirun forwards to every rank) are left to the leader: it
    stops its loop and then releases the followers, so a follower never leaves a leader
    waiting in an all-reduce. A leader that dies takes the job down (mpirun aborts it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logger.info("tp follower of world rank %d: rank %d of %d", MPI.COMM_WORLD.Get_rank() - comm.Get_rank(),
                comm.Get_rank(), comm.Get_size())
    steps = 0
    while True:
        msg = comm.bcast(None, root=0)
        if msg is _END:
            logger.info("tp follower: the leader stopped after %d steps", steps)
            return 0
        layers, step = msg
        engine.runner(layers).execute(step)
        steps += 1
        if steps == 1:
            logger.info("tp follower: ran the leader's first step (%d tokens on layers %s)",
                        sum(c.num_tokens for c in step.chunks), layers)
