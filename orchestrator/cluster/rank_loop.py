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
from dataclasses import dataclass
from typing import Callable

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
from orchestrator.cluster.messages import (TAG_CONTROL, TAG_HIDDEN, TAG_RESULT, TAG_STAGE, AbortRequest, AddRequest,
                                           DropGroup, ExchangeAbort, ExchangeBatch, ExchangeDone, GroupFormed,
                                           InstanceReport, MemberReady, MigrationCancel, MigrationCommit,
                                           MigrationDone, MigrationOffer, MigrationReply, MovePurpose, RankFailed,
                                           RankInfo, Regroup, RegroupDone, ReshapeEvent, Restored, RestoreGroup,
                                           Shutdown, SplitGroup, StageResult, StageStep, StartMigration)
from orchestrator.cluster.reshaper import Reshaper
from orchestrator.cluster.tp_set import SoleRank
from engines.rank_engine import RankEngine
from orchestrator.contracts import Topology
from orchestrator.kunserve.cost_model import CostModel
from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.transport import Handle, Transport

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25


@dataclass(frozen=True)
class _TensorSend:
    handle: Handle
    tensor: torch.Tensor
    """Kept alive until the send completes."""


class Messenger:
    """Non-blocking sends; keeps each in-flight buffer alive until its send completes."""

    def __init__(self, comm: MPI.Comm, transport: Transport) -> None:
        self.comm = comm
        self.transport = transport
        self._pending: list[MPI.Request | _TensorSend] = []

    def send_control(self, dst: int, msg: object) -> None:
        self._pending.append(self.comm.isend(msg, dest=dst, tag=TAG_CONTROL))

    def send_stage(self, dst: int, step: StageStep, hidden: torch.Tensor) -> None:
        self._pending.append(self.comm.isend(step, dest=dst, tag=TAG_STAGE))
        hidden = hidden.contiguous()
        self._pending.append(_TensorSend(self.transport.isend(hidden, dst, TAG_HIDDEN), hidden))

    def send_result(self, dst: int, result: StageResult) -> None:
        self._pending.append(self.comm.isend(result, dest=dst, tag=TAG_RESULT))

    def progress(self) -> None:
        self._pending = [p for p in self._pending if not self._done(p)]

    @staticmethod
    def _done(p: MPI.Request | _TensorSend) -> bool:
        if isinstance(p, _TensorSend):
            return p.handle.test()
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
                 cost_model: CostModel | None = None, faults: Faults | None = None,
                 devices: SoleRank | None = None) -> None:
        self.comm = comm
        self.faults = faults or Faults()
        """Fallback paths taken on purpose (tests only; see ``faults``)."""
        self.rank = comm.Get_rank()
        self.world = comm.Get_size()
        self.engine = engine
        self.devices = devices or SoleRank(engine, self.rank)
        """The devices behind this rank: itself, or a TP set it leads."""
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
        self.mover = KvMover(self.rank, engine.kv, transport, mirror=self.devices)
        self.migration_source = MigrationSource(self)
        self.migration_target = MigrationTarget(self)
        self.reshaper = Reshaper(self)
        self._table = self._handlers()
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
        mapping = self.engine.store.mapping(len(ranks), self.devices.size)
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
                        r.instance, r.stage, r.size, (r.layers.start, r.layers.end), self.engine.can_grow_kv,
                        self.devices.size, self.devices.world_ranks)

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
        """Advance KV moves (one turn of layers per turn) and the protocols this rank leads."""
        did = False
        # The protocols first: a batch the leader launches now is posted in this same turn,
        # not one loop turn (a pipeline step, perhaps) after its peers have posted theirs.
        self.reshaper.poll()
        if self.migration_source.out:
            self.migration_source.poll()
        for done in self.mover.poll():  # to this rank's leader, which owns the batch
            self.send_to_rank(self.role.instance, done)
            logger.debug("%s: %d bytes in %.3f s", done.id, done.bytes_moved, done.seconds)
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

    def _handlers(self) -> dict[type, Callable]:
        """Every control message a rank may get, by type, and who takes it (the controller's
        own messages are added by ``attach_controller``)."""
        reshaper, source, target = self.reshaper, self.migration_source, self.migration_target
        return {
            AddRequest: lambda msg: self.driver.add(msg),
            AbortRequest: self._on_abort,
            Regroup: self._on_regroup,
            RegroupDone: self._on_regroup_done,
            RankFailed: self._on_rank_failed,
            Shutdown: self._on_shutdown,
            DropGroup: reshaper.on_drop_group,
            MemberReady: reshaper.on_member_ready,
            RestoreGroup: reshaper.on_restore_group,
            SplitGroup: reshaper.on_split_group,
            ExchangeBatch: self._on_exchange_batch,
            ExchangeAbort: lambda msg: self.mover.abort(msg.id),
            ExchangeDone: self._on_exchange_done,
            StartMigration: source.start,
            MigrationOffer: target.on_offer,
            MigrationReply: source.on_reply,
            MigrationCommit: target.on_commit,
            MigrationCancel: target.on_cancel,
        }

    def attach_controller(self, controller: Controller) -> None:
        """Make this rank (0) the cluster's controller: it takes the leaders' reports."""
        self.controller = controller
        self._table.update({
            InstanceReport: controller.on_report,
            RankInfo: controller.on_rank_info,
            GroupFormed: controller.on_group_formed,
            Restored: controller.on_restored,
            ReshapeEvent: controller.on_reshape_event,
            MigrationDone: controller.on_migration_done,
        })

    def _on_control(self, msg: object, src: int) -> None:
        handler = self._table.get(type(msg))
        if handler is None:
            raise TypeError(f"unexpected control message {type(msg).__name__} from rank {src}")
        handler(msg)

    def _on_regroup(self, msg: Regroup) -> None:
        self.apply_topology(msg.topology)
        self.to_controller(self.rank_info())  # arrives before RegroupDone: same pair, same tag
        self.to_controller(RegroupDone(self.rank, msg.epoch))

    def _on_rank_failed(self, msg: RankFailed) -> None:
        logger.error("rank %d failed: %s", msg.rank, msg.error)
        self.stop_reason = f"rank {msg.rank} failed: {msg.error}"

    def _on_shutdown(self, msg: Shutdown) -> None:
        self.stop_reason = msg.reason

    def _on_exchange_batch(self, msg: ExchangeBatch) -> None:
        if not (self.faults.exchange_stall and msg.id.purpose == MovePurpose.EXCHANGE):
            self.mover.start(msg)

    def _on_exchange_done(self, msg: ExchangeDone) -> None:
        """A batch's completion on one member, routed by the protocol the batch belongs to."""
        if msg.id.purpose != MovePurpose.MIGRATION:
            self.reshaper.on_exchange_done(msg)
        elif not self.migration_target.on_exchange_done(msg):  # the target forwards it to the source
            self.migration_source.on_exchange_done(msg)

    def _on_abort(self, msg: AbortRequest) -> None:
        moved_to = self.migration_source.forward_abort(msg.request_id)
        if self.driver is not None and msg.request_id in self.driver.requests:
            self.driver.abort(msg.request_id)
        elif moved_to is not None:  # it migrated away after the controller sent this
            self.send_to_rank(moved_to, msg)

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
