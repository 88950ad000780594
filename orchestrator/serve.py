"""``mpirun -n N python -m orchestrator serve --engine-dir DIR``: start the serving cluster.

Every rank loads the store's pp1 weights and prepares the stage runners of its other
splits; rank 0 also runs the controller and the HTTP ingress. Start-up errors are agreed
on by all ranks (an allgather), so a bad option stops the whole job with one message.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.core.config import parse_bytes, resolve_device
from orchestrator.policy.bundles import POLICIES, get_policy
from orchestrator.triton.server import DEFAULT_REPOSITORY, MODEL_DIRS, TritonConfig

logger = logging.getLogger(__name__)

MAX_UNIX_PATH = 107
"""Longest path Linux takes for a Unix socket (``sun_path`` is 108 bytes with the NUL)."""


@dataclass(frozen=True)
class ServeConfig:
    """Options of ``serve`` (one place; the CLI maps onto it)."""

    engine_dir: Path
    groups: str | None = None
    """Initial grouping, e.g. ``0-1,2-3``; ranks not named are replicas."""
    policy: str = "vllm"
    dispatch: str = "least_loaded"
    host: str = "127.0.0.1"
    http_port: int | None = None
    """Ingress port; default 8000, or 8080 with ``triton`` (Triton takes 8000-8002)."""
    device_memory: int | None = None
    """Per-rank memory for weights and KV; default 1 GiB on CPU, 90% of the GPU's on CUDA."""
    max_queued_requests: int = 256
    page_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    transport: str = "auto"
    kv_extension: str = "auto"
    """How a drop grows the KV pool: ``remap`` (virtual memory: the dropped weights' chunks
    are mapped onto the pool's tail), ``commit`` (CPU: free, then commit pages) or ``auto``."""
    device: str = "auto"
    dtype: str | None = None
    model_name: str | None = None
    threads: int = 1
    admin_token: str | None = None
    """When set, POST /admin/* need ``Authorization: Bearer <token>``."""
    swap_space: int = 4 << 30
    """Host memory per rank for swapped-out KV (``--policy swap``)."""
    cost_model: Path | None = None
    """Fitted step-cost model (``python -m perf.profile_cost``): groups then form their
    micro-batches jointly (lookahead), balanced by estimated time."""
    triton: TritonConfig | None = None
    """Also serve through a Triton Inference Server started on the controller's host."""
    relay_socket: Path | None = None
    """Unix socket of the ingress's Triton relay; default with ``triton``: a private one in the
    temporary directory (``default_relay_socket``), none without."""
    request_log: Path | None = None
    """File the ingress appends a JSON line to per request (``orchestrator/ingress/request_log.py``)."""

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


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine-dir", type=Path, required=True, help="engine store (build_scripts.build_engines)")
    p.add_argument("--groups", default=None,
                   help="initial pipelined groups, e.g. 0-1,2-3 (ranks not named serve as replicas)")
    p.add_argument("--policy", default="vllm", choices=list(POLICIES),
                   help="memory-overload policy: " + "; ".join(f"{k}: {v.description}" for k, v in POLICIES.items()))
    p.add_argument("--swap-space", type=parse_bytes, default=4 << 30,
                   help="host memory per rank for swapped-out KV with --policy swap (default: 4GiB)")
    p.add_argument("--dispatch", default="least_loaded", help="dispatch policy: least_loaded or round_robin")
    p.add_argument("--host", default="127.0.0.1", help="ingress bind address (default: loopback only)")
    p.add_argument("--http-port", type=int, default=None,
                   help="ingress (OpenAI API, /metrics, /admin) port (default: 8000, or 8080 with --triton; 0 picks one)")
    p.add_argument("--device-memory", type=parse_bytes, default=None,
                   help="memory per rank for weights + KV, e.g. 768MiB (default: 1GiB on CPU, 90%% of the GPU)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting for a first token before new ones get 429 (default: 256)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: 16)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of a step")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most running requests per replica (a g-stage group runs g times as many)")
    p.add_argument("--transport", default="auto", help="tensor transport: auto, mpi or nccl")
    p.add_argument("--kv-extension", default="auto", choices=["auto", "commit", "remap"],
                   help="how a KunServe drop turns weights into KV: remap maps the dropped weights' "
                        "memory onto the KV pool's tail (CUDA virtual memory, needs cuda-bindings; "
                        "shared memory on CPU), commit frees them and commits pages (CPU); auto: "
                        "remap on CUDA, commit on CPU")
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda (rank r takes GPU r mod count; ranks sharing a GPU need --device-memory)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: store's on CPU, bf16 on CUDA)")
    p.add_argument("--model-name", default=None, help="model name in the API (default: the store's folder name)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (default: 1)")
    p.add_argument("--cost-model", type=Path, default=None,
                   help="cost model from python -m perf.profile_cost; enables lookahead micro-batches in groups")
    p.add_argument("--admin-token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on POST /admin/* (drop, restore, regroup)")
    p.add_argument("--request-log", type=Path, default=None, metavar="PATH",
                   help="append one JSON line per request to PATH when it ends: id, route (http or triton), "
                        "arrival, first token and end (time.monotonic), TTFT, tokens, finish reason")
    _add_triton_args(p)


def _add_triton_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Triton Inference Server front end")
    g.add_argument("--triton", action="store_true",
                   help="also serve through tritonserver (the one in PATH, else nvidia-pytriton's) "
                        "with triton_repo/; its model is ready only while every rank is up")
    g.add_argument("--triton-host", default="127.0.0.1", help="Triton bind address (default: loopback only)")
    g.add_argument("--triton-http-port", type=int, default=8000, help="Triton HTTP port (default: 8000)")
    g.add_argument("--triton-grpc-port", type=int, default=8001, help="Triton gRPC port (default: 8001)")
    g.add_argument("--triton-metrics-port", type=int, default=8002,
                   help="Triton metrics port, with the cluster's kunserve_* metrics (default: 8002)")
    g.add_argument("--triton-model-names", default=",".join(MODEL_DIRS),
                   help="models to serve: kunserve (decoupled: gRPC streaming, /generate_stream), "
                        "kunserve_unary (HTTP /infer and /generate, gRPC infer), and aliases as NAME=MODEL, "
                        "e.g. ensemble=kunserve for TensorRT-LLM clients (default: %(default)s)")
    g.add_argument("--triton-repo", type=Path, default=DEFAULT_REPOSITORY,
                   help="model repository holding kunserve/ (default: this checkout's triton_repo)")
    g.add_argument("--tritonserver", type=Path, default=None,
                   help="tritonserver binary to run (default: PATH, then the nvidia-pytriton wheel's)")
    g.add_argument("--triton-arg", action="append", default=[], metavar="FLAG",
                   help="one more tritonserver flag, after kunserve's own; repeat for more. Join it with '=', "
                        "as it starts with '--': --triton-arg=--trace-config=level=TIMESTAMPS")
    g.add_argument("--relay-socket", type=Path, default=None,
                   help="Unix socket on which the ingress takes requests from the Triton model "
                        "(default with --triton: a private path in the temporary directory). Set it to "
                        "run your own tritonserver with triton_repo/ on this host: pass the same path in "
                        "the model's relay_socket parameter or the KUNSERVE_RELAY_SOCKET variable")


def _triton_config(args: argparse.Namespace) -> TritonConfig | None:
    if not args.triton:
        return None
    names = tuple(n.strip() for n in args.triton_model_names.split(",") if n.strip())
    return TritonConfig(host=args.triton_host, http_port=args.triton_http_port, grpc_port=args.triton_grpc_port,
                        metrics_port=args.triton_metrics_port, model_names=names,
                        repository=args.triton_repo, binary=args.tritonserver, extra_args=tuple(args.triton_arg))


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        engine_dir=args.engine_dir, groups=args.groups, policy=args.policy, dispatch=args.dispatch,
        host=args.host, http_port=args.http_port, device_memory=args.device_memory,
        max_queued_requests=args.max_queued_requests, page_size=args.page_size,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        transport=args.transport, kv_extension=args.kv_extension, device=args.device, dtype=args.dtype,
        model_name=args.model_name, threads=args.threads, admin_token=args.admin_token, cost_model=args.cost_model, swap_space=args.swap_space,
        triton=_triton_config(args), relay_socket=args.relay_socket, request_log=args.request_log)


def rank_device(name: str, rank: int) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", rank % torch.cuda.device_count())
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

