"""The controller (rank 0): the ingress backend, dispatch, and the policies' decisions.

The ingress calls ``submit``/``abort``/``state``/``regroup``/``drop``/``restore`` from its
own thread; those touch only thread-safe structures and post commands. The rank's main
loop (the only thread that talks MPI) runs the commands in ``poll`` and feeds the ranks'
reports back through the ``on_*`` methods. Its state has one owner each:

- ``RequestTable``: the requests in flight and the instance serving each;
- ``ReshapeCoordinator``: drops and restores under way, and the topology;
- ``MigrationBook``: live migrations under way (the llumnix policy);
- ``EventLog``: what happened (drops, exchanges, restores, decisions, migrations) and counts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from engines.tokenizer import Tokenizer
from orchestrator.cluster.event_log import EventKind, EventLog
from orchestrator.cluster.messages import (AbortRequest, AddRequest, DropGroup, GroupFormed, InstanceReport,
                                           MigrationDone, RankInfo, ReshapeEvent, Restored, RestoreGroup)
from orchestrator.cluster.migration_book import MigrationBook
from orchestrator.cluster.request_table import NOT_DISPATCHED, RequestTable
from orchestrator.cluster.reshape_coordinator import Reshape, ReshapeCoordinator, ReshapeKind
from orchestrator.contracts import (BackendUnavailable, ClusterState, GenerateRequest, InstanceState, InstanceStats,
                                    RankState, Refused, ReshapeTimeout, TokenEvent, Topology)
from orchestrator.policy.dispatch import DispatchPolicy, InstanceLoad
from orchestrator.policy.migration import MigrationPolicy
from orchestrator.policy.reshape import NeverReshape, ReshapePolicy

logger = logging.getLogger(__name__)

DECISION_INTERVAL_S = 0.1
"""How often the reshape and migration policies see the load."""
REGROUP_TIMEOUT_S = 30.0


# Commands from the ingress thread to the main loop -------------------------------------------
@dataclass(frozen=True)
class _Submit:
    req: GenerateRequest


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Regroup:
    topology: Topology


@dataclass(frozen=True)
class _Reshape:
    reshape: Reshape


class Controller:
    """Implements the ingress backend on top of the rank loop's messaging."""

    def __init__(self, topology: Topology, model_name: str, tokenizer: Tokenizer, max_model_len: int,
                 max_queued: int, policy: DispatchPolicy, send_to_leader: Callable[[int, object], None],
                 start_regroup: Callable[[Topology], None], splits: list[int] | None = None,
                 num_layers: int = 0, reshape_policy: ReshapePolicy | None = None,
                 migration_policy: MigrationPolicy | None = None, policy_name: str = "vllm") -> None:
        self.policy_name = policy_name
        """The serving policy (``serve --policy``) this cluster runs."""
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._policy = policy
        self._send = send_to_leader
        self._start_regroup = start_regroup
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        """Set whenever the ingress posts a command: the rank loop's idle wait ends at once,
        instead of at its next poll (up to 2 ms later, on every request's TTFT)."""
        self.requests = RequestTable(max_queued)
        self.reshapes = ReshapeCoordinator(topology, splits or [1], num_layers)
        self.log = EventLog()
        self.migrations = MigrationBook(migration_policy, send_to_leader, self.log) if migration_policy else None
        self.reshape_policy = reshape_policy or NeverReshape()
        self._lock = threading.Lock()
        """Guards the leaders' and ranks' latest reports."""
        self._stats: dict[int, InstanceStats] = {}
        self._ranks: dict[int, RankInfo] = {}
        self._rank_seen: dict[int, float] = {}
        """When each rank last reported (``time.monotonic``)."""
        self._ready = False
        self._reason_down = "the cluster is starting"
        self._regrouped = threading.Event()
        self._deferred: list[GenerateRequest] = []
        self._last_decision = 0.0
        self._commands = {_Submit: lambda c: self._dispatch(c.req), _Abort: lambda c: self._abort(c.request_id),
                          _Regroup: lambda c: self._start_regroup(c.topology), _Reshape: self._order}

    @property
    def topology(self) -> Topology:
        return self.reshapes.topology

    # Ingress side (any thread) -----------------------------------------------------------
    def submit(self, req: GenerateRequest):
        if not self._ready:
            raise BackendUnavailable(self._reason_down)
        q = self.requests.open(req.request_id)
        self._post(_Submit(req))
        return q

    def _post(self, command: object) -> None:
        self._inbox.put(command)
        self.wake.set()

    def abort(self, request_id: str) -> None:
        self._post(_Abort(request_id))

    def healthy(self) -> bool:
        return self._ready

    def regroup(self, groups: str) -> None:
        topology = Topology.parse(groups, sum(len(g) for g in self.topology.instances))
        if in_flight := len(self.requests):
            raise Refused(f"cannot regroup while {in_flight} requests are in flight")
        self._ready = False
        self._reason_down = "the cluster is regrouping"
        self._regrouped.clear()
        self._post(_Regroup(topology))
        if not self._regrouped.wait(timeout=REGROUP_TIMEOUT_S):
            raise ReshapeTimeout(f"regrouping did not finish within {REGROUP_TIMEOUT_S:.0f} s")

    def drop(self, ranks: list[int], wait_s: float = 60.0) -> tuple[int, ...]:
        """Fuse the instances on ``ranks`` into one group (replicas in the order given);
        returns its ranks in stage order once it serves."""
        reshape = self._begin_drop(tuple(int(r) for r in ranks))
        self.reshapes.wait(reshape.ranks, wait_s)
        return reshape.ranks

    def _begin_drop(self, ranks: tuple[int, ...]) -> Reshape:
        with self._lock:
            cannot_grow = {r for r, info in self._ranks.items() if not info.can_grow_kv}
        migrating = self.migrations.busy_ranks() if self.migrations else set()
        reshape = self.reshapes.begin_drop(ranks, migrating, cannot_grow)
        self._post(_Reshape(reshape))
        return reshape

    def restore(self, ranks: list[int] | None = None, wait_s: float = 60.0) -> list[tuple[int, ...]]:
        """Split one group (``ranks``) or every group back into the instances it was fused
        from (replicas, for a group it started as); returns those split."""
        reshapes = self._begin_restore(None if ranks is None else tuple(int(r) for r in ranks))
        for r in reshapes:
            self.reshapes.wait(r.ranks, wait_s)
        return [r.ranks for r in reshapes]

    def _begin_restore(self, ranks: tuple[int, ...] | None) -> list[Reshape]:
        reshapes = self.reshapes.begin_restore(ranks)
        for r in reshapes:
            self._post(_Reshape(r))
        return reshapes

    def plan(self) -> dict:
        """What the reshape policy would do now, without doing it (``GET /admin/plan``)."""
        topology = self.topology
        plan = self.reshape_policy.plan(topology)
        body = {"policy": self.policy_name, "reshape_policy": self.reshape_policy.name, "topology": str(topology)}
        return {**body, **(plan.to_json() if plan is not None else {"groups": [], "reason": "this policy never drops"})}

    def state(self) -> ClusterState:
        with self._lock:
            ranks = [self._rank_state(info) for _, info in sorted(self._ranks.items())]
            stats = dict(self._stats)
        instances = [InstanceState(r[0], list(r), stats[r[0]].waiting if r[0] in stats else 0,
                                   stats[r[0]].running if r[0] in stats else 0, *self._shape(r))
                     for r in self.topology.instances]
        events, counters = self.log.snapshot()
        return ClusterState(ranks, instances, self.requests.queued(), events, counters)

    def _shape(self, ranks: tuple[int, ...]) -> tuple[str, list[int]]:
        """An instance's ``tp{T}xpp{P}`` and its devices' world ranks."""
        infos = [self._ranks.get(r) for r in ranks]
        tp = infos[0].tp_size if infos[0] is not None else 1
        world = [w for i, r in zip(infos, ranks) for w in (i.world_ranks if i is not None else (r,))]
        return f"tp{tp}xpp{len(ranks)}", world

    def _rank_state(self, info: RankInfo) -> RankState:
        used = sum(p.used for stats in self._stats.values() for p in stats.pools if p.rank == info.rank)
        return RankState(info.rank, info.role, info.instance, info.stage, info.group_size, info.layer_range,
                         info.weight_bytes, info.kv_pages, used, info.device_memory, info.resident_growth,
                         info.kv_bytes, info.workspace_bytes, info.tp_size, list(info.world_ranks or (info.rank,)))

    # Main-loop side ------------------------------------------------------------------------
    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready = ready
        self._reason_down = reason or self._reason_down

    def poll(self) -> bool:
        """Let the policies decide, then run the ingress's commands; True if there were any."""
        did = False
        self._decide()
        if self._deferred and not self.reshapes.busy:
            deferred, self._deferred = self._deferred, []
            for req in deferred:
                self._dispatch(req)
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return did
            did = True
            self._commands[type(command)](command)

    def _order(self, command: _Reshape) -> None:
        """Send a recorded drop's or restore's orders to its ranks."""
        r = command.reshape
        if r.kind == ReshapeKind.DROP:
            for part in r.parts:  # each instance's leader; a group's tells its stages once drained
                self._send(part[0], DropGroup(r.ranks, r.epoch, r.parts))
        else:
            self._send(r.ranks[0], RestoreGroup(r.epoch))

    def _decide(self) -> None:
        """Let the reshape policy see the load; start what it decides (main loop, not blocking)."""
        now = time.monotonic()
        if now - self._last_decision < DECISION_INTERVAL_S:
            return
        self._last_decision = now
        with self._lock:
            stats = dict(self._stats)
        topology = self.topology
        self.reshape_policy.observe(stats, now)
        if self.reshapes.busy or not self._ready:
            return
        if self.migrations is not None:
            self.migrations.start(stats, topology, now)
        for action in self.reshape_policy.decide(topology, now):
            try:
                if action.kind == "drop":
                    self._begin_drop(tuple(action.ranks))
                else:
                    self._begin_restore(tuple(action.ranks))
                self.log.record(EventKind.DECISION, action.ranks, action=action.kind, **action.detail)
            except Refused as exc:
                logger.warning("policy %s could not %s %s: %s", self.reshape_policy.name, action.kind,
                               list(action.ranks), exc)

    def _dispatch(self, req: GenerateRequest) -> None:
        if self.requests.instance_of(req.request_id) is None:
            return  # aborted before dispatch
        loads = [self._load(ranks) for ranks in self.topology.instances if not self.reshapes.reshaping(ranks[0])]
        if not loads:
            self._deferred.append(req)  # every instance is reshaping: dispatch it right after
            return
        instance = self._policy.choose(loads, req.prompt_token_ids)
        self.requests.move([req.request_id], instance)
        self._send(instance, AddRequest(req.request_id, req.prompt_token_ids, req.sampling, self.max_model_len,
                                           list(req.output_token_ids)))

    def _load(self, ranks: tuple[int, ...]) -> InstanceLoad:
        instance = ranks[0]
        with self._lock:
            stats = self._stats.get(instance)
        return InstanceLoad(instance, len(ranks), stats.free_fraction if stats else 1.0,
                            stats.waiting if stats else 0, stats.running if stats else 0,
                            self.requests.outstanding(instance), stats.capacity_tokens if stats else 0)

    def _abort(self, request_id: str) -> None:
        instance = self.requests.instance_of(request_id)
        if instance == NOT_DISPATCHED:  # finish it here
            self.requests.deliver(TokenEvent(request_id, [], True, "abort"))
        elif instance is not None:
            self._send(instance, AbortRequest(request_id))

    # Reports from the ranks (main loop) ---------------------------------------------------------
    def on_report(self, report: InstanceReport) -> None:
        with self._lock:
            self._stats[report.stats.instance] = report.stats
        self.log.count(report.stats.counts)
        for update in report.updates:
            self.requests.deliver(update)

    def on_rank_info(self, info: RankInfo) -> None:
        with self._lock:
            self._ranks[info.rank] = info
            self._rank_seen[info.rank] = time.monotonic()

    def rank_silence(self) -> dict[int, float]:
        """Seconds since each rank's last report (every rank reports every
        ``STATS_INTERVAL_S``): a rank that stopped or hangs falls silent (any thread)."""
        now = time.monotonic()
        with self._lock:
            return {r: now - t for r, t in self._rank_seen.items()}

    def on_reshape_event(self, msg: ReshapeEvent) -> None:
        self.log.record(msg.kind, msg.ranks, **msg.detail)

    def on_group_formed(self, msg: GroupFormed) -> None:
        self.requests.move(msg.request_ids, msg.instance)
        self.log.record(EventKind.DROP, msg.ranks, requests=len(msg.request_ids), stale=msg.stale,
                        in_prefill=msg.in_prefill)
        self.reshapes.group_formed(msg)
        self._reshaped(msg.ranks)

    def on_restored(self, msg: Restored) -> None:
        self.requests.move(msg.request_ids, msg.rank)
        group = self.reshapes.member_restored(msg)
        if group is not None:
            self.log.record(EventKind.RESTORE, group)
            self._reshaped(group)

    def _reshaped(self, ranks: tuple[int, ...]) -> None:
        for r in ranks:
            self.reshape_policy.forget(r)
        leaders = {g[0] for g in self.topology.instances}
        with self._lock:
            self._stats = {k: v for k, v in self._stats.items() if k in leaders}
        self.reshapes.finish(ranks)
        logger.info("topology is now %s", self.topology)

    def on_migration_done(self, msg: MigrationDone) -> None:
        if self.migrations is not None and self.migrations.done(msg):
            self.requests.move([msg.request_id], msg.dst)

    def on_regrouped(self, topology: Topology) -> None:
        self.reshapes.regrouped(topology)
        with self._lock:
            self._stats.clear()
        self._ready = True
        self._regrouped.set()

    def fail_all(self, reason: str) -> None:
        """End every in-flight request with an error (shutdown, or a rank died)."""
        self._ready = False
        self._reason_down = reason
        self.requests.fail_all(reason)
