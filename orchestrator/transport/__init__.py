"""Tensor transports behind one interface, chosen by name.

    transport = make_transport("auto", comm)   # "mpi", "nccl" or "auto"
    transport.isend(tensor, dst=1, tag=7).wait()

Implementations are imported only when made, so importing this package neither
initializes MPI nor touches CUDA.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from orchestrator.transport.base import Handle, Transport

__all__ = ["Handle", "Transport", "known_transports", "make_transport", "register_transport", "resolve_kind"]

logger = logging.getLogger(__name__)

TransportFactory = Callable[[Any], Transport]
"""Builds a transport from an MPI communicator (collectively, on every rank)."""


def _mpi(comm: Any) -> Transport:
    from orchestrator.transport.mpi import MpiTransport

    return MpiTransport(comm)


def _nccl(comm: Any) -> Transport:
    from orchestrator.transport.nccl import NcclTransport

    return NcclTransport(comm)


_REGISTRY: dict[str, TransportFactory] = {"mpi": _mpi, "nccl": _nccl}
AUTO = "auto"


def register_transport(name: str, factory: TransportFactory) -> None:
    """Add a transport under ``name`` (e.g. a CUDA IPC one); names are unique."""
    if name == AUTO or name in _REGISTRY:
        raise ValueError(f"transport name {name!r} is taken")
    _REGISTRY[name] = factory


def known_transports() -> list[str]:
    """The names :func:`make_transport` accepts, ``auto`` included."""
    return [AUTO, *sorted(_REGISTRY)]


def resolve_kind(kind: str) -> str:
    """The registered name ``kind`` stands for: ``auto`` is nccl where CUDA is present, else mpi.

    ``auto`` assumes every rank's tensors live on CUDA when this process sees a GPU,
    which holds for the homogeneous clusters this project runs on.
    """
    if kind == AUTO:
        return "nccl" if torch.cuda.is_available() else "mpi"
    if kind not in _REGISTRY:
        raise ValueError(f"unknown transport {kind!r}; known: {', '.join(known_transports())}")
    return kind


def make_transport(kind: str, comm: Any) -> Transport:
    """Build the transport named ``kind`` over the MPI communicator ``comm``.

    Collective: every rank of ``comm`` must call it with the same ``kind``. ``auto`` takes
    mpi instead of nccl when a host runs more ranks than it has GPUs: NCCL refuses two
    ranks on one device, and the mpi transport stages CUDA tensors through host memory.
    """
    name = resolve_kind(kind)
    if kind == AUTO and name == "nccl" and _ranks_share_gpus(comm):
        logger.info("more ranks than GPUs on this host: the mpi transport (staged through host "
                    "memory) instead of nccl")
        name = "mpi"
    return _REGISTRY[name](comm)


def _ranks_share_gpus(comm: Any) -> bool:
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return bool(comm.allreduce(local.Get_size() > torch.cuda.device_count(), op=MPI.LOR))
    finally:
        local.Free()
