"""``mpirun -n N python -m orchestrator serve --engine-dir DIR``: start the serving cluster.

Every rank loads the store's pp1 weights and prepares the stage runners of its other
splits; rank 0 also runs the controller and the HTTP ingress. Start-up errors are agreed
on by all ranks (an allgather), so a bad option stops the whole job with one message.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.devices import rank_cuda_device
from orchestrator.config_cli import add_config_args, cli, fmt_bytes
from orchestrator.config_cli import config_from_args as config_from_args_of
from orchestrator.core.config import EngineConfig, parse_bytes, resolve_device
from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.kunserve.load_monitor import MonitorConfig
from orchestrator.policy.bundles import POLICIES, get_policy
from orchestrator.policy.dispatch import dispatch_policies
from orchestrator.policy.migration import MigrationConfig
from orchestrator.transport import known_transports
from orchestrator.triton.server import TritonConfig

logger = logging.getLogger(__name__)

MAX_UNIX_PATH = 107
"""Longest path Linux takes for a Unix socket (``sun_path`` is 108 bytes with the NUL)."""


def _policy_help() -> str:
    return "; ".join(f"{k}: {v.description}" for k, v in POLICIES.items())


@dataclass(frozen=True)
class ServeConfig:
    """Options of ``serve``: the one place their defaults are defined; the command line is
    built from these fields (``orchestrator.config_cli``), their docstrings are ``--help``."""

    engine_dir: Path = field(metadata=cli(metavar="DIR"))
    """The engine store (``python -m build_scripts.build_engines``)."""
    groups: str | None = None
    """Initial pipelined groups of MPI ranks, e.g. ``0-1,2-3``; ranks not named serve as
    replicas. With --tp N a group is whole TP sets (``--tp 2 --groups 0-3``: one TP2 x PP2
    instance on ranks 0-3)."""
    tp: int = 1
    """Tensor-parallel ranks per stage: ranks 0..N-1 form the first TP set, N..2N-1 the
    next, each a replica unless --groups pipelines several (the store needs its tp{N}
    splits: build_engines --tp N). --policy swap and llumnix need instances of one rank."""
    policy: str = field(default="vllm", metadata=cli(choices=lambda: list(POLICIES)))
    """The memory-overload policy (see the list above)."""
    dispatch: str = field(default="least_loaded", metadata=cli(choices=dispatch_policies))
    """Which instance serves a new request."""
    host: str = "127.0.0.1"
    """Ingress bind address (loopback only by default)."""
    http_port: int | None = None
    """Ingress port (OpenAI API, /metrics, /admin); 8000, or 8080 with --triton (Triton takes
    8000-8002); 0 picks a free one."""
    device_memory: int | None = field(default=None, metadata=cli(parse=parse_bytes, metavar="BYTES"))
    """Memory per rank for weights and KV, e.g. 768MiB; 1GiB on CPU, 90% of the GPU's free
    memory on CUDA when not given."""
    max_queued_requests: int = 256
    """Requests waiting for a first token before new ones get 429."""
    page_size: int = EngineConfig.page_size
    """Tokens per KV page."""
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    """Token budget of one step (prefill chunk tokens plus one per decode)."""
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    """Most running requests per replica (a g-stage group runs g times as many)."""
    transport: str = field(default="auto", metadata=cli(choices=known_transports))
    """Tensor transport between ranks; auto: nccl between GPUs that do not share one, else mpi."""
    kv_extension: str = field(default="auto", metadata=cli(choices=lambda: ["auto", "commit", "remap"]))
    """How a drop turns weights into KV: remap maps the dropped weights' memory onto the KV
    pool's tail (CUDA virtual memory, needs cuda-bindings; shared memory on CPU), commit frees
    them and commits pages (CPU); auto: remap on CUDA, commit on CPU."""
    device: str = "auto"
    """auto, cpu or cuda (a rank takes GPU (its index on its host) mod count; ranks sharing a GPU need --device-memory)."""
    dtype: str | None = None
    """Compute dtype; the store's on CPU, bfloat16 on CUDA when not given."""
    model_name: str | None = None
    """Model name in the API; the store's folder name when not given."""
    threads: int = 1
    """Torch CPU threads per rank."""
    admin_token: str | None = None
    """When set, POST /admin/* (drop, restore, regroup) need 'Authorization: Bearer TOKEN'."""
    swap_space: int = field(default=SchedulerConfig.swap_space_bytes, metadata=cli(parse=parse_bytes,
                                                                                  show=fmt_bytes, metavar="BYTES"))
    """Host memory per rank for swapped-out KV (--policy swap)."""
    cost_model: Path | None = field(default=None, metadata=cli(metavar="PATH"))
    """Fitted step-cost model (python -m perf.profile_cost): groups then form their
    micro-batches jointly (lookahead), balanced by estimated time."""
    request_log: Path | None = field(default=None, metadata=cli(metavar="PATH"))
    """Append one JSON line per request to PATH when it ends: id, route (http or triton),
    arrival, first token and end (time.monotonic), TTFT, tokens, finish reason."""
    relay_socket: Path | None = field(default=None, metadata=cli(metavar="PATH"))
    """Unix socket on which the ingress takes requests from the Triton model; default with
    --triton: a private path in the temporary directory, none without. Set it to run your
    own tritonserver with triton_repo/ on this host: pass the same path in the model's
    relay_socket parameter or the KUNSERVE_RELAY_SOCKET variable."""
    triton: TritonConfig | None = None
    """Also serve through a Triton Inference Server started on the controller's host."""
    supervisor_socket: Path | None = field(default=None, metadata=cli(metavar="PATH"))
    """Set by ``supervise``, which runs the front ends (the ingress, Triton) itself: the
    controller rank serves them over this Unix socket instead of starting them, and the
    job stops when the supervisor goes away. The front-end options are the supervisor's."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """The kunserve policy's load monitor (--monitor-*)."""
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    """The llumnix policy's thresholds (--migration-*)."""
    enable_prefix_caching: bool = SchedulerConfig.enable_prefix_caching
    """Share the KV of full pages between requests with a common prefix, in each instance
    (vLLM's automatic prefix caching), under every policy; a drop and a restore carry the
    shared pages once and keep them shared, and give back cached pages no request uses."""

    def relay_path(self) -> Path | None:
        """Where the Triton relay listens, or None when nothing needs it."""
        if self.relay_socket is not None:
            return self.relay_socket
        return default_relay_socket() if self.triton is not None else None

    @property
    def ingress_port(self) -> int:
        if self.http_port is not None:
            return self.http_port
        return 8080 if self.triton is not None else 8000

    def __post_init__(self) -> None:
        policy = get_policy(self.policy)
        if policy.preemption == "swap" and self.groups:
            raise ValueError("--policy swap needs each instance's KV on one rank: it cannot start with --groups")
        if self.max_queued_requests < 1:
            raise ValueError("--max-queued-requests must be >= 1")
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if self.tp > 1 and (policy.migration is not None or policy.preemption == "swap"):
            raise ValueError(f"--tp {self.tp}: --policy {self.policy} swaps or migrates KV of one rank per instance; "
                             "TP instances run --policy kunserve, vllm or oracle")
        # Options that only one policy reads are refused under the others, not ignored.
        if self.monitor != MonitorConfig() and policy.reshape != "kunserve":
            raise ValueError(f"--monitor-* options tune the kunserve policy's load monitor; --policy {self.policy} "
                             "has none")
        if self.migration != MigrationConfig() and policy.migration is None:
            raise ValueError(f"--migration-* options tune the llumnix policy; --policy {self.policy} never migrates")
        if self.swap_space != SchedulerConfig.swap_space_bytes and policy.preemption != "swap":
            raise ValueError(f"--swap-space sizes --policy swap's host memory; --policy {self.policy} does not swap")
        t = self.triton
        if t is not None and self.ingress_port in (t.http_port, t.grpc_port, t.metrics_port):
            raise ValueError(f"--http-port {self.ingress_port} is also one of Triton's ports; pick another")
        relay = self.relay_path()
        if relay is not None and len(os.fsencode(relay)) > MAX_UNIX_PATH:
            raise ValueError(f"--relay-socket {relay} is longer than a Unix socket path may be "
                             f"({MAX_UNIX_PATH} bytes); pick a shorter path (or TMPDIR)")


def default_relay_socket() -> Path:
    """A socket path private to this process (a stale one left by a dead ingress is replaced)."""
    return Path(tempfile.gettempdir()) / f"kunserve-relay-{os.getpid()}.sock"


NESTED = ("triton", "monitor", "migration")
"""ServeConfig's fields that are configs of their own, each with its option group."""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every ServeConfig field as an option, the nested configs as groups of their own."""
    p.description = (p.description or "") + " Memory-overload policies (--policy): " + _policy_help() + "."
    add_config_args(p, ServeConfig, skip=NESTED)
    g = p.add_argument_group("Triton Inference Server front end")
    g.add_argument("--triton", action="store_true",
                   help="also serve through tritonserver (the one in PATH, else nvidia-pytriton's) "
                        "with triton_repo/; its model is ready only while every rank is up")
    add_config_args(g, TritonConfig, prefix="triton-")
    add_config_args(p.add_argument_group("KunServe's load monitor (--policy kunserve)"), MonitorConfig,
                    prefix="monitor-")
    add_config_args(p.add_argument_group("Llumnix-style migration (--policy llumnix)"), MigrationConfig,
                    prefix="migration-")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    triton = config_from_args_of(TritonConfig, args, prefix="triton-")
    if not args.triton:
        default = TritonConfig()
        changed = [f.name for f in dataclasses.fields(TritonConfig) if getattr(triton, f.name) != getattr(default, f.name)]
        if changed:
            raise ValueError(f"Triton options ({', '.join(changed)}) were given without --triton")
        triton = None
    return config_from_args_of(ServeConfig, args, triton=triton,
                               monitor=config_from_args_of(MonitorConfig, args, prefix="monitor-"),
                               migration=config_from_args_of(MigrationConfig, args, prefix="migration-"))


def rank_device(name: str, comm) -> torch.device:
    """This rank's device; a CUDA one is picked from the rank's index on its host, as the
    transport picks it (collective over ``comm`` then: every rank must call it)."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = rank_cuda_device(comm)
    return device


def default_device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return 1 << 30


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of every rank."""
    from mpi4py import MPI

    from orchestrator.launch import start_rank

    comm = MPI.COMM_WORLD
    torch.set_num_threads(args.threads)
    return start_rank(comm, args)

