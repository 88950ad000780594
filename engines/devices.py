"""Which GPU a rank uses, decided in one place for the engine and the transport.

A rank takes the visible GPU of its index among the ranks of its host (its *local* rank),
modulo the number of GPUs it sees. The engine (``orchestrator/serve.py``) and the NCCL
transport used to decide this apart (global rank vs local rank), so on a host whose rank
count is not a multiple of a node's the two could pick different GPUs; both call
:func:`rank_cuda_device` now.

Whether ranks share a GPU is decided from the GPUs' identities, ``(host, device UUID)``,
never from counts: with ``CUDA_VISIBLE_DEVICES`` giving each rank one GPU, every rank sees
one device, index 0, yet no two ranks share one. See :func:`gpus_shared`.

Nothing here initializes MPI or CUDA on import.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import torch

GpuIdentity = tuple[str, str]
"""``(host name, device UUID)``: names one physical GPU (or MIG instance) across a cluster."""


def cuda_index(local_rank: int, visible: int) -> int:
    """The visible CUDA device index of the rank with index ``local_rank`` on its host.

    Ranks of a host spread over the GPUs they see, round-robin; more ranks than GPUs share
    them (which the transport then learns from :func:`gpus_shared`).
    """
    if visible < 1:
        raise RuntimeError("no CUDA device is visible to this rank")
    if local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {local_rank}")
    return local_rank % visible


def local_rank(comm: Any = None) -> int:
    """This rank's index among the ranks of ``comm`` (default: ``MPI.COMM_WORLD``) on its host.

    From MPI's shared-memory split, keyed by rank, so local ranks follow global order on
    each host; no launcher-specific environment variable is needed. Collective over ``comm``.
    """
    from mpi4py import MPI

    local = (MPI.COMM_WORLD if comm is None else comm).Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank()
    finally:
        local.Free()


def rank_cuda_device(comm: Any = None) -> torch.device:
    """The CUDA device of this rank: :func:`cuda_index` of its local rank (collective over ``comm``)."""
    return torch.device("cuda", cuda_index(local_rank(comm), torch.cuda.device_count()))


def gpu_identity(device: torch.device) -> GpuIdentity:
    """``(host, UUID)`` of ``device``: the same for two ranks only if they use one GPU."""
    return socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid)


def gpus_shared(identities: Sequence[GpuIdentity | None]) -> bool:
    """Whether a GPU-per-rank backend (NCCL) cannot be used: two ranks name the same GPU,
    or a rank has none (``None``: it sees no CUDA device).

    ``identities`` holds every rank's :func:`gpu_identity`, e.g. from an allgather.
    """
    if any(ident is None for ident in identities):
        return True
    return len(set(identities)) < len(identities)
