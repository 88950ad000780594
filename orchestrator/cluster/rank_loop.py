"""Every rank's main loop: the only thread that talks MPI.

Each turn: receive control messages, stage steps and stage results; let the controller
(rank 0) dispatch the ingress's requests; let the instance leader launch work; report.
When a turn finds nothing to do the loop backs off with short sleeps (0.1 ms growing to
0.3 ms while pipeline work is pending, 2 ms otherwise) instead of spinning, so that idle
ranks leave the cores to ranks that compute. The controller's rank is woken early by the
ingress, so a new request does not wait for its next poll.
"""

from __future__ import annotations

import logging
import signal
import time
import traceback

import torch
from mpi4py import MPI

from engines.config import parse_dtype
from orchestrator.core.block_manager import PoolSpec
from orchestrator.cluster.controller import Controller
from orchestrator.cluster.rank_context import Role
from orchestrator.cluster.faults import Faults
from orchestrator.cluster.instance import InstanceDriver, StageWorker
from orchestrator.cluster.kv_mover import KvMover
from orchestrator.cluster.migration import MigrationSource, MigrationTarget
from orchestrator.cluster.member import on_drop_group, on_split_group
from orchestrator.cluster.messages import (MIGRATION_EPOCH, RESTORE_BATCH, TAG_CONTROL, TAG_HIDDEN, TAG_RESULT, TAG_STAGE,
                                           AbortRequest, AddRequest, DropGroup, ExchangeAbort, ExchangeBatch,
                                           ExchangeDone, GroupFormed, InstanceReport, MemberReady, MigrationCancel,
                                           MigrationCommit, MigrationDone, MigrationOffer, MigrationReply, RankFailed,
                                           RankInfo, Regroup, RegroupDone, ReshapeEvent, Restored, RestoreGroup,
                                           Shutdown, SplitGroup, StageResult, StageStep, StartMigration)
from orchestrator.cluster.reshape import Formation, Split
from engines.rank_engine import RankEngine
from orchestrator.contracts import Topology
from orchestrator.kunserve.cost_model import CostModel
from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.transport import Transport

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25


class Messenger:
    """Non-blocking sends; keeps each in-flight buffer alive until its send completes."""

    def __init__(self, comm: MPI.Comm, transport: Transport) -> None:
        self.comm = comm
        self.transport = transport
        self._pending: list = []

    def send_control(self, dst: int, msg: object) -> None:
        self._pending.append(self.comm.isend(msg, dest=dst, tag=TAG_CONTROL))

    def send_stage(self, dst: int, step: StageStep, hidden: torch.Tensor) -> None:
        self._pending.append(self.comm.isend(step, dest=dst, tag=TAG_STAGE))
        hidden = hidden.contiguous()
        self._pending.append((self.transport.isend(hidden, dst, TAG_HIDDEN), hidden))

    def send_result(self, dst: int, result: StageResult) -> None:
        self._pending.append(self.comm.isend(result, dest=dst, tag=TAG_RESULT))

    def progress(self) -> None:
        self._pending = [p for p in self._pending if not self._done(p)]

    @staticmethod
    def _done(p) -> bool:
        if isinstance(p, tuple):
            return p[0].test()
        return p.Test()

    def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self.progress()
            time.sleep(0.001)


class RankLoop:
    """One rank: its role in the current topology, and rank 0's controller."""

    def __init__(self, comm: MPI.Comm, engine: RankEngine, topology: Topology, kv_pages: list[int],
                 sched_config: SchedulerConfig, transport: Transport, device_memory: int,
                 cost_model: CostModel | None = None, faults: Faults | None = None) -> None:
        self.comm = comm
        self.faults = faults or Faults()
        """Fallback paths taken on purpose (tests only; see ``faults``)."""
        self.rank = comm.Get_rank()
        self.world = comm.Get_size()
        self.engine = engine
        self.kv_pages = kv_pages
        self.sched_config = sched_config
        self.device_memory = device_memory
        self.cost_model = cost_model
        self.messenger = Messenger(comm, transport)
        self.transport = transport
        self.controller: Controller | None = None
        self._driver: InstanceDriver | None = None
        self.worker: StageWorker | None = None
        self.stop_reason: str | None = None
        self.mover = KvMover(self.rank, engine.kv, transport)
        self.migration_source = MigrationSource(self)
        self.migration_target = MigrationTarget(self)
        self.formation: Formation | None = None
        self.split: Split | None = None
        self.early_ready: list[MemberReady] = []
        self._regroup_waiting: dict[int, Topology] = {}
        self._epoch = 0
        self._last_stats = 0.0
        self.apply_topology(topology)

    # Roles ---------------------------------------------------------------------------------
    def apply_topology(self, topology: Topology) -> None:
        """Take this rank's role in ``topology`` (instances must be idle)."""
        self.topology = topology
        ranks = topology.instances[topology.instance_of(self.rank)]
        inst = ranks[0]  # an instance is known by its leader rank: stable across reshapes
        mapping = self.engine.store.mapping(len(ranks))
        ranges = [mapping.layer_range(s) for s in range(len(ranks))]
        stage = ranks.index(self.rank)
        role = Role(inst, stage, len(ranks), ranges[stage])
        if stage == 0:
            pools = [PoolSpec(r, self.kv_pages[rank]) for r, rank in zip(ranges, ranks)]
            self.take_role(role, driver=InstanceDriver(inst, ranks, ranges, pools, self.engine, self.messenger,
                                                       self.sched_config, self.cost_model))
        else:
            self.take_role(role, worker=StageWorker(inst, ranks, stage, ranges, self.engine, self.messenger))

    @property
    def driver(self) -> InstanceDriver | None:
        return self._driver

    def take_role(self, role: Role, driver: InstanceDriver | None = None, worker: StageWorker | None = None) -> None:
        """The one place a rank's role, driver and worker change (``RankContext``)."""
        self.role, self._driver, self.worker = role, driver, worker
        logger.info("rank %d: instance %d, stage %d of %d, layers %s%s", self.rank, role.instance, role.stage,
                    role.size, role.layers, "" if driver or worker else " (forming)")

    def rank_info(self) -> RankInfo:
        r, plan = self.role, self.engine.plan
        return RankInfo(self.rank, self.engine.kv.num_pages, self.engine.weight_memory(), self.engine.kv.nbytes,
                        self.device_memory, self.engine.resident_growth(), plan.workspace_bytes, r.kind,
                        r.instance, r.stage, r.size, (r.layers.start, r.layers.end), self.engine.can_grow_kv)

    # Delivery (local when the destination is this rank) --------------------------------------
    def to_leader(self, instance: int, msg: object) -> None:
        leader = instance  # instances are named by their leader rank
        if leader == self.rank:
            self._on_control(msg, self.rank)
        else:
            self.messenger.send_control(leader, msg)

    def send_to_rank(self, rank: int, msg: object) -> None:
        if rank == self.rank:
            self._on_control(msg, self.rank)
        else:
            self.messenger.send_control(rank, msg)

    def to_controller(self, msg: object) -> None:
        if self.rank == 0:
            self._on_control(msg, 0)
        else:
            self.messenger.send_control(0, msg)

    # The loop ------------------------------------------------------------------------------
    def run(self) -> None:
        idle = 0.0001
        while self.stop_reason is None:
            did = self._receive()
            if self.controller is not None:
                did |= self.controller.poll()
            did |= self._reshape_turn()
            if self.driver is not None:
                did |= self.driver.step()
                if self.driver.updates:
                    self.to_controller(self.driver.report())
            self.messenger.progress()
            self._periodic()
            if did:
                idle = 0.0001
            else:
                self._idle_wait(idle)
                idle = min(idle * 2, self._max_idle_sleep())

    def _idle_wait(self, seconds: float) -> None:
        """Sleep through an idle turn. The controller's rank wakes as soon as the ingress
        posts a command; other ranks' messages arrive over MPI and wait for the next poll."""
        if self.controller is None:
            time.sleep(seconds)
            return
        self.controller.wake.wait(seconds)
        self.controller.wake.clear()  # before the next turn reads the inbox: no post is missed

    def _max_idle_sleep(self) -> float:
        # A stage of a group, or a leader with micro-batches out, expects work within a step:
        # answer it quickly. A rank with nothing pending sleeps longer and leaves the core.
        if self.worker is not None or (self.driver is not None and self.driver.inflight):
            return 0.0003
        return 0.002

    def _reshape_turn(self) -> bool:
        """Advance KV moves (one layer per batch per turn) and the leader's reshape protocols."""
        did = False
        # The protocols first: a batch the leader launches now is posted in this same turn,
        # not one loop turn (a pipeline step, perhaps) after its peers have posted theirs.
        if self.formation is not None and self.formation.poll():
            self.formation = None
        if self.split is not None:
            self.split.poll(exchanging=self.formation is not None and bool(self.formation.pending))
        if self.migration_source.out:
            self.migration_source.poll()
        for epoch, batch, nbytes, seconds in self.mover.poll():
            self.send_to_rank(self.role.instance, ExchangeDone(self.rank, epoch, batch, nbytes, seconds))
            logger.debug("exchange batch %d: %d bytes in %.3f s", batch, nbytes, seconds)
            did = True
        return did or self.mover.busy

    def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < STATS_INTERVAL_S:
            return
        self._last_stats = now
        self.to_controller(self.rank_info())
        if self.driver is not None:
            self.to_controller(self.driver.report())

    def _receive(self) -> bool:
        did = False
        st = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_CONTROL, status=st):
            self._on_control(self.comm.recv(source=st.Get_source(), tag=TAG_CONTROL), st.Get_source())
            did = True
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=st):
            result = self.comm.recv(source=st.Get_source(), tag=TAG_RESULT)
            self.driver.on_result(result)
            did = True
        if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_STAGE, status=st):
            src = st.Get_source()
            step: StageStep = self.comm.recv(source=src, tag=TAG_STAGE)
            hidden = torch.empty(step.num_tokens, step.hidden_size, dtype=parse_dtype(step.dtype),
                                 device=self.engine.kv.data.device)
            self.transport.recv(hidden, src, TAG_HIDDEN)
            self.worker.on_step(step, hidden)
            did = True
        return did

    def _on_control(self, msg: object, src: int) -> None:
        if isinstance(msg, AddRequest):
            self.driver.add(msg)
        elif isinstance(msg, AbortRequest):
            self._on_abort(msg)
        elif isinstance(msg, InstanceReport):
            self.controller.on_report(msg)
        elif isinstance(msg, RankInfo):
            self.controller.on_rank_info(msg)
        elif isinstance(msg, Regroup):
            self.apply_topology(msg.topology)
            self.to_controller(self.rank_info())  # arrives before RegroupDone: same pair, same tag
            self.to_controller(RegroupDone(self.rank, msg.epoch))
        elif isinstance(msg, RegroupDone):
            self._on_regroup_done(msg)
        elif isinstance(msg, RankFailed):
            logger.error("rank %d failed: %s", msg.rank, msg.error)
            self.stop_reason = f"rank {msg.rank} failed: {msg.error}"
        elif isinstance(msg, Shutdown):
            self.stop_reason = msg.reason
        elif not self._on_reshape_message(msg) and not self._on_migration_message(msg):
            raise TypeError(f"unexpected control message {type(msg).__name__} from rank {src}")

    def _on_reshape_message(self, msg: object) -> bool:
        if isinstance(msg, DropGroup):
            self.formation = on_drop_group(self, msg)
            if self.formation is not None:  # this rank leads the new group
                for early in self.early_ready:
                    self.formation.on_member_ready(early)
                self.early_ready = []
        elif isinstance(msg, MemberReady):
            if self.formation is None:
                self.early_ready.append(msg)  # a peer was faster than our own drop order
            else:
                self.formation.on_member_ready(msg)
        elif isinstance(msg, ExchangeBatch):
            if not (self.faults.exchange_stall and msg.purpose == "exchange"):
                self.mover.start(msg)
        elif isinstance(msg, ExchangeAbort):
            self.mover.abort(msg.epoch, msg.batch)
        elif isinstance(msg, ExchangeDone) and msg.epoch >= MIGRATION_EPOCH:
            if not self.migration_target.on_exchange_done(msg):
                self.migration_source.on_exchange_done(msg)
        elif isinstance(msg, ExchangeDone):
            if msg.batch == RESTORE_BATCH and self.split is not None:
                self.split.on_exchange_done(msg)
            elif self.formation is not None:
                self.formation.on_exchange_done(msg)
        elif isinstance(msg, RestoreGroup):
            self.split = Split(self, self.driver, msg.epoch)
        elif isinstance(msg, SplitGroup):
            on_split_group(self, msg)
            self.formation = self.split = None
        elif isinstance(msg, (GroupFormed, Restored, ReshapeEvent)):
            self.controller.on_reshaped(msg)
        else:
            return False
        return True

    def _on_abort(self, msg: AbortRequest) -> None:
        moved_to = self.migration_source.forward_abort(msg.request_id)
        if self.driver is not None and msg.request_id in self.driver.requests:
            self.driver.abort(msg.request_id)
        elif moved_to is not None:  # it migrated away after the controller sent this
            self.send_to_rank(moved_to, msg)

    def _on_migration_message(self, msg: object) -> bool:
        if isinstance(msg, StartMigration):
            self.migration_source.start(msg)
        elif isinstance(msg, MigrationOffer):
            self.migration_target.on_offer(msg)
        elif isinstance(msg, MigrationReply):
            self.migration_source.on_reply(msg)
        elif isinstance(msg, MigrationCommit):
            self.migration_target.on_commit(msg)
        elif isinstance(msg, MigrationCancel):
            self.migration_target.on_cancel(msg)
        elif isinstance(msg, MigrationDone):
            self.controller.on_migration_done(msg)
        else:
            return False
        return True

    # Regrouping (driven by rank 0) ------------------------------------------------------------
    def start_regroup(self, topology: Topology) -> None:
        self._epoch += 1
        self._regroup_waiting = {r: topology for r in range(self.world)}
        for r in range(1, self.world):
            self.messenger.send_control(r, Regroup(topology, self._epoch))
        self._on_control(Regroup(topology, self._epoch), 0)

    def _on_regroup_done(self, msg: RegroupDone) -> None:
        topology = self._regroup_waiting.pop(msg.rank, None)
        if topology is not None and not self._regroup_waiting:
            self.controller.on_regrouped(topology)
            logger.info("regrouped into %s", topology)

    # Stopping ----------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.stop_reason = f"received {signal.Signals(signum).name}"
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def shutdown(self) -> None:
        """Rank 0: fail what is in flight, tell every rank to stop."""
        reason = self.stop_reason or "shutting down"
        if self.controller is not None:
            self.controller.fail_all(f"the server is shutting down ({reason})")
            for r in range(1, self.world):
                self.messenger.send_control(r, Shutdown(reason))
        # Short: under mpirun's SIGTERM the peers are stopping too and may never receive.
        self.messenger.drain(0.5)

    def report_failure(self, exc: BaseException) -> None:
        """A fatal error on this rank: tell the controller, so clients get errors, then abort."""
        text = f"{type(exc).__name__}: {exc}"
        logger.error("rank %d fatal error:\n%s", self.rank, traceback.format_exc())
        if self.controller is not None:
            self.controller.fail_all(f"rank 0 failed: {text}")
        else:
            self.messenger.send_control(0, RankFailed(self.rank, text))
            self.messenger.drain(2.0)
