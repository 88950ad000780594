"""Start-up and tear-down of one rank of the serving cluster: the composition root that
puts the rank's engine, loop, policies, controller, ingress and Triton front end together
(so the cluster itself imports no front end)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

import torch
from mpi4py import MPI

from engines.config import parse_dtype
from engines.errors import EngineError
from engines.store import EngineStore
from engines.tokenizer import Tokenizer
from engines.weights import LayerWeights
from engines.tensor_parallel import TpShard
from orchestrator.cluster import tp_set
from orchestrator.cluster.tp_set import SoleRank, TpLeader
from orchestrator.cluster.controller import Controller
from orchestrator.cluster.faults import Faults
from engines.rank_engine import RankEngine
from orchestrator.cluster.rank_loop import RankLoop
from orchestrator.contracts import Topology
from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.kunserve.cost_model import CostModel
from orchestrator.kunserve.planner import ModelMemory
from orchestrator.policy.bundles import get_policy
from orchestrator.policy.dispatch import make_dispatch_policy
from orchestrator.policy.migration import MIGRATION
from orchestrator.policy.reshape import make_reshape_policy
from orchestrator.serve import ServeConfig, config_from_args, default_device_memory, rank_device
from orchestrator.transport import make_transport
from orchestrator.transport.mpi import all_reduce_over
from orchestrator.triton.server import TritonError

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """Any rank's start-up failure, agreed on by every rank."""


def _agree(comm: MPI.Comm, error: str | None) -> None:
    """Every rank learns whether any rank failed; all raise the first failure."""
    errors = comm.allgather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        rank, err = failed[0]
        raise StartupError(err if rank == 0 or err.startswith("rank") else f"rank {rank}: {err}")


def _build(world: MPI.Comm, cfg: ServeConfig, tp_comm: MPI.Comm | None) -> tuple[RankEngine, Topology,
                                                                               CostModel | None, Faults]:
    device = rank_device(cfg.device, world)  # first: collective, before anything a rank alone may fail
    faults = Faults.from_env()
    store = EngineStore(cfg.engine_dir)
    if world.Get_size() % cfg.tp:
        raise ValueError(f"--tp {cfg.tp} needs a multiple of {cfg.tp} ranks; the job has {world.Get_size()}")
    store.mapping(1, cfg.tp)  # the split every instance needs must exist
    topology = Topology.parse(cfg.groups, world.Get_size(), cfg.tp)
    for size in sorted(topology.group_sizes()):
        store.mapping(size, cfg.tp)  # the split each group needs must exist
    memory = cfg.device_memory or default_device_memory(device)
    dtype = parse_dtype(cfg.dtype) if cfg.dtype else (None if device.type == "cpu" else torch.bfloat16)
    cost = CostModel.load(cfg.cost_model) if cfg.cost_model else None
    kv_pages = None
    if get_policy(cfg.policy).unlimited_kv:  # the oracle: room for max_num_seqs full contexts
        if device.type != "cpu":
            raise ValueError("--policy oracle needs a CPU pool (pages resident only when used)")
        ctx = store.config.max_position_embeddings
        kv_pages = cfg.max_num_seqs * -(-ctx // cfg.page_size) * store.config.num_hidden_layers
    tp = TpShard(cfg.tp, tp_comm.Get_rank() if tp_comm is not None else 0)
    engine = RankEngine(store, device, dtype, memory, cfg.page_size, kv_pages=kv_pages,
                        kv_extension=cfg.kv_extension, tp=tp,
                        all_reduce=all_reduce_over(tp_comm) if tp_comm is not None else None)
    return engine, topology, cost, faults


def start_rank(world: MPI.Comm, args: argparse.Namespace) -> int:
    rank = world.Get_rank()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    if args.log_level.upper() != "DEBUG":  # one line per request (and per metrics scrape) is noise
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    engine = topology = loop = ingress = cost = triton = faults = None
    leading = False
    tp_comm, comm = tp_set.shadow_comms(world, getattr(args, "tp", 1) or 1)
    try:
        err = None
        try:
            cfg = config_from_args(args)
            engine, topology, cost, faults = _build(world, cfg, tp_comm)
        except (EngineError, ValueError, OSError) as exc:
            err = str(exc)
        except (torch.OutOfMemoryError, MemoryError) as exc:  # told to every rank, not a lone death
            err = f"out of memory while loading the weights and KV pool ({exc}); lower --device-memory " \
                  f"or serve a smaller model or dtype"
        _agree(world, err)
        _agree(world, _same_pools(engine, tp_comm))
        if tp_comm is not None and tp_comm.Get_rank() > 0:  # a follower: it mirrors its leader until it stops
            return tp_set.follow(engine, tp_comm, comm, make_transport(cfg.transport, comm))
        devices = TpLeader(engine, tp_comm) if tp_comm is not None else SoleRank(engine, rank)
        leading = tp_comm is not None  # from here on, the followers wait for this rank's orders
        kv_pages = comm.allgather(engine.plan.kv_pages)
        policy = get_policy(cfg.policy)
        sched = SchedulerConfig(cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                preemption_mode=policy.preemption, swap_space_bytes=cfg.swap_space,
                                enable_prefix_caching=cfg.enable_prefix_caching)
        loop = RankLoop(comm, engine, topology, kv_pages, sched, make_transport(cfg.transport, comm),
                        engine.plan.device_memory, cost, faults, devices)
        err = None
        if rank == 0:
            try:
                ingress = _start_controller(loop, cfg, engine, comm.Get_size())
                triton = _start_triton(cfg, ingress, loop.controller) if cfg.supervisor_socket is None else None
            except (OSError, ValueError, EngineError) as exc:
                err = f"controller: {exc}"
            except TritonError as exc:
                err = f"triton: {exc}"
        _agree(comm, err)
        for info in comm.allgather(loop.rank_info()):
            if loop.controller is not None:
                loop.controller.on_rank_info(info)
    except StartupError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        for part in (triton, ingress):
            if part is not None:
                part.stop()
        if leading:
            devices.release()
        return 2
    if loop.controller is not None:
        loop.controller.set_ready(True)
        where = f"the supervisor at {cfg.supervisor_socket}" if cfg.supervisor_socket else \
            f"http://{cfg.host}:{ingress.port}"
        logger.info("serving %s on %s with %d ranks as %s", loop.controller.model_name, where,
                    comm.Get_size(), topology)
    try:
        return _serve(comm, loop, [p for p in (triton, ingress) if p is not None])
    finally:
        devices.release()


def _same_pools(engine: RankEngine, tp_comm: MPI.Comm | None) -> str | None:
    """Page ids are shared by a TP set, so its ranks' pools must be the same size."""
    if tp_comm is None:
        return None
    pages = tp_comm.allgather(engine.plan.kv_pages)
    if len(set(pages)) > 1:
        return f"the TP set's KV pools differ ({pages} pages): give every rank the same --device-memory"
    return None


def _start_triton(cfg: ServeConfig, ingress, controller: Controller):
    """Start tritonserver in front of the ingress (rank 0, main thread), or None without --triton."""
    if cfg.triton is None:
        return None
    from orchestrator.triton.frontend import TritonFrontend

    frontend = TritonFrontend(cfg.triton, ingress.url, ingress.relay_socket, controller.healthy)
    frontend.start()
    return frontend


def _start_controller(loop: RankLoop, cfg: ServeConfig, engine: RankEngine, world_size: int):
    """The controller, and what serves it: the HTTP ingress, or the supervisor's channel."""
    from orchestrator.ingress.server import IngressServer
    from orchestrator.ingress.supervisor_link import SupervisorLink

    store = engine.store
    cfg_m = engine.cfg  # what one device holds: the model, or its TP shard
    mem = ModelMemory(num_layers=cfg_m.num_hidden_layers,
                      kv_bytes_per_token=cfg_m.kv_bytes_per_token_per_layer(engine.weights.dtype) * cfg_m.num_hidden_layers,
                      layer_weight_bytes=LayerWeights.buffer_numel(cfg_m) * engine.weights.dtype.itemsize,
                      kv_pool_bytes=engine.plan.kv_bytes, splits=tuple(engine.splits))
    bundle = get_policy(cfg.policy)
    controller = Controller(
        loop.topology, cfg.model_name or store.path.resolve().name, Tokenizer(store.tokenizer_dir),
        store.config.max_position_embeddings, cfg.max_queued_requests, make_dispatch_policy(cfg.dispatch, cfg.page_size),
        send_to_leader=loop.to_leader, start_regroup=loop.start_regroup, splits=engine.splits,
        num_layers=store.config.num_hidden_layers, reshape_policy=make_reshape_policy(bundle.reshape, mem, cfg.monitor),
        migration_policy=MIGRATION.make(bundle.migration, cfg.migration) if bundle.migration else None,
        policy_name=bundle.name)
    loop.attach_controller(controller)
    if cfg.supervisor_socket is not None:
        def lost(reason: str) -> None:
            loop.stop_reason = reason

        link = SupervisorLink(controller, cfg.supervisor_socket, world_size, controller.rank_silence, lost)
        link.start()
        return link
    ingress = IngressServer(controller, cfg.host, cfg.ingress_port, admin_token=cfg.admin_token,
                            relay_socket=cfg.relay_path(), request_log=cfg.request_log)
    ingress.start()
    return ingress


def _serve(comm: MPI.Comm, loop: RankLoop, frontends: list) -> int:
    """Run the rank's loop; ``frontends`` (Triton, then the ingress) stop with it, in order."""
    loop.install_signal_handlers()
    comm.Barrier()
    try:
        loop.run()
    except Exception as exc:  # a bug or a device failure: fail requests, then take the job down
        loop.report_failure(exc)
        for part in frontends:
            part.stop()
        traceback.print_exc()
        comm.Abort(1)
    failed = (loop.stop_reason or "").startswith("rank ")
    loop.shutdown()
    for part in frontends:
        part.stop()
    logger.info("stopped: %s", loop.stop_reason)
    if failed:
        comm.Abort(1)
    return 0
