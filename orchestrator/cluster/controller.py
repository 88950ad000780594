"""The controller (rank 0): request table, dispatch, and the bridge to the HTTP ingress.

The ingress calls ``submit``/``abort``/``state``/``regroup`` from its own thread; those only
touch thread-safe structures and queue commands. The rank's main loop (the only thread that
talks MPI) drains the commands in ``poll`` and feeds leader reports back through
``on_report``, which hands token events to the ingress's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from engines.tokenizer import Tokenizer
from orchestrator.cluster.event_log import EventKind, EventLog
from orchestrator.cluster.messages import (AbortRequest, AddRequest, DropGroup, GroupFormed, InstanceReport,
                                           MigrationDone, RankInfo, ReshapeEvent, RestoreGroup)
from orchestrator.cluster.migration_book import MigrationBook
from orchestrator.contracts import (BackendUnavailable, ClusterState, GenerateRequest, InstanceState, InstanceStats,
                                    QueueFullError, RankState, Refused, ReshapeTimeout, TokenEvent, Topology)
from orchestrator.policy.dispatch import DispatchPolicy, InstanceLoad
from orchestrator.policy.migration import MigrationPolicy
from orchestrator.policy.reshape import NeverReshape, ReshapePolicy

logger = logging.getLogger(__name__)

@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    instance: int = -1
    first_token: bool = False


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
        self.topology = topology
        self._max_queued = max_queued
        self._policy = policy
        self._send = send_to_leader
        self._start_regroup = start_regroup
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        """Set whenever the ingress posts a command: the rank loop's idle wait ends at once,
        instead of at its next poll (up to 2 ms later, on every request's TTFT)."""
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._stats: dict[int, InstanceStats] = {}
        self._ranks: dict[int, RankInfo] = {}
        self._ready = False
        self._reason_down = "the cluster is starting"
        self._regrouped = threading.Event()
        self._splits = splits or [1]
        self._num_layers = num_layers
        self._epoch = 0
        self._reshaping: dict[int, tuple[str, tuple[int, ...], int]] = {}
        """leader rank -> (kind, ranks, epoch) of a drop or restore under way."""
        self._restored: dict[int, set[int]] = {}
        self._reshaped = threading.Condition()
        self._deferred: list[GenerateRequest] = []
        self.log = EventLog()
        """Drops, exchanges, restores, decisions and migrations, and their totals."""
        self.reshape_policy = reshape_policy or NeverReshape()
        self.migrations = MigrationBook(migration_policy, send_to_leader, self.log) if migration_policy else None
        self._last_decision = 0.0

    # Ingress side (any thread) -----------------------------------------------------------
    def submit(self, req: GenerateRequest) -> asyncio.Queue:
        if not self._ready:
            raise BackendUnavailable(self._reason_down)
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            queued = sum(1 for s in self._streams.values() if not s.first_token)
            if queued >= self._max_queued:
                raise QueueFullError(f"{queued} requests are waiting for a first token "
                                     f"(--max-queued-requests {self._max_queued})")
            self._streams[req.request_id] = _Stream(asyncio.get_running_loop(), q)
        self._post(("submit", req))
        return q

    def _post(self, command: tuple[str, object]) -> None:
        self._inbox.put(command)
        self.wake.set()

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def healthy(self) -> bool:
        return self._ready

    def regroup(self, groups: str) -> None:
        topology = Topology.parse(groups, sum(len(g) for g in self.topology.instances))
        with self._lock:
            if self._streams:
                raise Refused(f"cannot regroup while {len(self._streams)} requests are in flight")
            self._ready = False
            self._reason_down = "the cluster is regrouping"
        self._regrouped.clear()
        self._post(("regroup", topology))
        if not self._regrouped.wait(timeout=30):
            raise ReshapeTimeout("regrouping did not finish within 30 s")

    # Drop and restore (manual, or from the kunserve policy) -----------------------------------
    def drop(self, ranks: list[int], wait_s: float = 60.0) -> None:
        """Fuse the replicas on ``ranks`` (stage order) into one group; returns once it serves."""
        ranks = self._begin_drop(tuple(int(r) for r in ranks))
        self._wait_reshaped(ranks, wait_s)

    def _begin_drop(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        with self._lock:
            world = sum(len(g) for g in self.topology.instances)
            unknown = [r for r in ranks if not 0 <= r < world]
            if unknown or not ranks:
                raise Refused(f"unknown ranks {unknown or ranks}: the cluster has ranks 0-{world - 1}")
            if len(set(ranks)) != len(ranks) or len(ranks) < 2:
                raise Refused(f"a group needs at least 2 distinct ranks, got {list(ranks)}")
            if self._reshaping:
                raise Refused("a drop or restore is already in progress")
            migrating = sorted((self.migrations.busy_ranks() if self.migrations else set()) & set(ranks))
            if migrating:
                raise Refused(f"ranks {migrating} are migrating a request; retry in a moment")
            grouped = [r for r in ranks if len(self.topology.ranks_of_rank(r)) > 1]
            if grouped:
                raise Refused(f"ranks {grouped} are already in a group; restore it first")
            stuck = [r for r in ranks if r in self._ranks and not self._ranks[r].can_grow_kv]
            if stuck:
                raise Refused(f"ranks {stuck} cannot turn dropped weights into KV: their CUDA KV pool needs "
                                 "the virtual-memory driver (pip install 'kunserve-orchestrator[cuda]', then "
                                 "--kv-extension remap)")
            if len(ranks) not in self._splits or len(ranks) > self._num_layers:
                raise Refused(f"no {len(ranks)}-way split: the store has splits {self._splits} for a "
                                 f"{self._num_layers}-layer model")
            self._epoch += 1
            for r in ranks:
                self._reshaping[r] = ("drop", ranks, self._epoch)
        self._post(("drop", ranks))
        return ranks

    def restore(self, ranks: list[int] | None = None, wait_s: float = 60.0) -> list[tuple[int, ...]]:
        """Split one group (``ranks``) or every group back into replicas; returns those split."""
        groups = self._begin_restore(ranks)
        for g in groups:
            self._wait_reshaped(g, wait_s)
        return groups

    def _begin_restore(self, ranks: list[int] | None) -> list[tuple[int, ...]]:
        with self._lock:
            groups = [g for g in self.topology.instances if len(g) > 1]
            if ranks is not None:
                groups = [g for g in groups if list(g) == [int(r) for r in ranks]]
                if not groups:
                    raise Refused(f"ranks {list(ranks)} do not form a group")
            if not groups:
                raise Refused("nothing is dropped: every rank serves as a replica")
            if self._reshaping:
                raise Refused("a drop or restore is already in progress")
            for g in groups:
                self._epoch += 1
                for r in g:
                    self._reshaping[r] = ("restore", g, self._epoch)
                self._restored[g[0]] = set()
        for g in groups:
            self._post(("restore", g))
        return groups

    def plan(self) -> dict:
        """What the reshape policy would do now, without doing it (``GET /admin/plan``)."""
        with self._lock:
            topology = self.topology
        plan = self.reshape_policy.plan(topology)
        body = {"policy": self.policy_name, "reshape_policy": self.reshape_policy.name, "topology": str(topology)}
        return {**body, **(plan.to_json() if plan is not None else {"groups": [], "reason": "this policy never drops"})}

    def _decide(self) -> None:
        """Let the reshape policy see the load; start what it decides (main loop, not blocking)."""
        now = time.monotonic()
        if now - self._last_decision < 0.1:
            return
        self._last_decision = now
        with self._lock:
            stats, topology, busy = dict(self._stats), self.topology, bool(self._reshaping)
        self.reshape_policy.observe(stats, now)
        if busy or not self._ready:
            return
        if self.migrations is not None:
            self.migrations.start(stats, topology, now)
        for action in self.reshape_policy.decide(topology, now):
            try:
                if action.kind == "drop":
                    self._begin_drop(action.ranks)
                else:
                    self._begin_restore(list(action.ranks))
                self.log.record(EventKind.DECISION, action.ranks, action=action.kind, **action.detail)
            except Refused as exc:
                logger.warning("policy %s could not %s %s: %s", self.reshape_policy.name, action.kind,
                               list(action.ranks), exc)

    def on_migration_done(self, msg: MigrationDone) -> None:
        if self.migrations is not None and self.migrations.done(msg):
            with self._lock:
                self._move_streams([msg.request_id], msg.dst)

    def _wait_reshaped(self, ranks: tuple[int, ...], wait_s: float) -> None:
        with self._reshaped:
            if not self._reshaped.wait_for(lambda: not any(r in self._reshaping for r in ranks), wait_s):
                raise ReshapeTimeout(f"reshaping ranks {list(ranks)} did not finish within {wait_s:.0f} s")

    def on_reshaped(self, msg) -> None:
        """A group formed (drop) or a member is a replica again (restore)."""
        with self._lock:
            if isinstance(msg, ReshapeEvent):
                self.log.record(msg.kind, msg.ranks, **msg.detail)
                return
            if isinstance(msg, GroupFormed):
                self.topology = self.topology.fuse(msg.ranks)
                self._move_streams(msg.request_ids, msg.instance)
                done = msg.ranks
                self.log.record(EventKind.DROP, msg.ranks, requests=len(msg.request_ids), stale=msg.stale,
                                in_prefill=msg.in_prefill)
            else:
                kind, group, _epoch = self._reshaping[msg.rank]
                self._move_streams(msg.request_ids, msg.rank)
                members = self._restored.setdefault(group[0], set())
                members.add(msg.rank)
                if members != set(group):
                    return
                self.topology = self.topology.split(group)
                done = group
                self.log.record(EventKind.RESTORE, group)
            for r in done:
                self._reshaping.pop(r, None)
                self.reshape_policy.forget(r)
            self._stats = {k: v for k, v in self._stats.items() if k in {g[0] for g in self.topology.instances}}
        with self._reshaped:
            self._reshaped.notify_all()
        logger.info("topology is now %s", self.topology)

    def _move_streams(self, request_ids: list[str], instance: int) -> None:
        for rid in request_ids:
            if rid in self._streams:
                self._streams[rid].instance = instance

    def state(self) -> ClusterState:
        with self._lock:
            ranks = [self._rank_state(info) for _, info in sorted(self._ranks.items())]
            instances = [InstanceState(r[0], list(r), self._stats[r[0]].waiting if r[0] in self._stats else 0,
                                       self._stats[r[0]].running if r[0] in self._stats else 0)
                         for r in self.topology.instances]
            queued = sum(1 for s in self._streams.values() if not s.first_token)
        events, counters = self.log.snapshot()
        return ClusterState(ranks, instances, queued, events, counters)

    def _rank_state(self, info: RankInfo) -> RankState:
        used = 0
        for stats in self._stats.values():
            used += sum(p.used for p in stats.pools if p.rank == info.rank)
        return RankState(info.rank, info.role, info.instance, info.stage, info.group_size, info.layer_range,
                         info.weight_bytes, info.kv_pages, used, info.device_memory, info.resident_growth,
                         info.kv_bytes, info.workspace_bytes)

    # Main-loop side ------------------------------------------------------------------------
    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready = ready
        self._reason_down = reason or self._reason_down

    def on_rank_info(self, info: RankInfo) -> None:
        with self._lock:
            self._ranks[info.rank] = info

    def on_regrouped(self, topology: Topology) -> None:
        with self._lock:
            self.topology = topology
            self._stats.clear()
        self._ready = True
        self._regrouped.set()

    def poll(self) -> bool:
        """Dispatch the ingress's commands; True if there were any."""
        did = False
        self._decide()
        if self._deferred and not self._reshaping:
            deferred, self._deferred = self._deferred, []
            for req in deferred:
                self._dispatch(req)
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return did
            did = True
            if kind == "submit":
                self._dispatch(arg)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "regroup":
                self._start_regroup(arg)
            elif kind == "drop":
                for r in arg:
                    self._send(r, DropGroup(arg, self._reshaping[r][2]))
            elif kind == "restore":
                self._send(arg[0], RestoreGroup(self._reshaping[arg[0]][2]))

    def _dispatch(self, req: GenerateRequest) -> None:
        with self._lock:
            stream = self._streams.get(req.request_id)
            if stream is None:
                return  # aborted before dispatch
            loads = [self._load(ranks[0], ranks) for ranks in self.topology.instances
                     if ranks[0] not in self._reshaping]
            if not loads:
                self._deferred.append(req)  # every instance is reshaping: dispatch it right after
                return
            stream.instance = self._policy.choose(loads)
        self._send(stream.instance, AddRequest(req.request_id, req.prompt_token_ids, req.sampling,
                                               self.max_model_len))

    def _load(self, instance: int, ranks: tuple[int, ...]) -> InstanceLoad:
        stats = self._stats.get(instance)
        outstanding = sum(1 for s in self._streams.values() if s.instance == instance)
        return InstanceLoad(instance, len(ranks), stats.free_fraction if stats else 1.0,
                            stats.waiting if stats else 0, stats.running if stats else 0, outstanding)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None and stream.instance >= 0:
            self._send(stream.instance, AbortRequest(request_id))
        elif stream is not None:  # not dispatched yet: finish it here
            self._deliver(TokenEvent(request_id, [], True, "abort"))

    def on_report(self, report: InstanceReport) -> None:
        with self._lock:
            self._stats[report.stats.instance] = report.stats
        self.log.count(report.stats.counts)
        for update in report.updates:
            self._deliver(update)

    def _deliver(self, u: TokenEvent) -> None:
        with self._lock:
            stream = self._streams.get(u.request_id)
            if stream is None:
                return
            if u.token_ids:
                stream.first_token = True
            if u.finished:
                del self._streams[u.request_id]
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, u)
        except RuntimeError:
            pass  # the ingress loop is closed: nobody is listening any more

    def fail_all(self, reason: str) -> None:
        """End every in-flight request with an error (shutdown, or a rank died)."""
        self._ready = False
        self._reason_down = reason
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._deliver(TokenEvent(rid, [], True, "abort", reason))
