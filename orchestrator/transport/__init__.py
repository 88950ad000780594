"""Tensor transports behind one interface, chosen by name.

    transport = make_transport("auto", comm)   # "mpi", "nccl", "gloo" or "auto"
    transport.isend(tensor, dst=1, tag=TENSOR_TAGS[0]).wait()

- ``mpi``: CPU tensors over MPI (CUDA ones staged through host memory); any tag.
- ``nccl``: CUDA tensors over NCCL, one channel per tag of ``tags`` (NCCL has no tags).
- ``gloo``: the nccl transport's code over gloo, CPU tensors; for testing the NCCL path
  without a GPU.
- ``auto``: nccl on GPUs that no two ranks share, else mpi.

Implementations are imported only when made, so importing this package neither
initializes MPI nor touches CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Callable

import torch

from orchestrator.transport.base import Handle, Transport

__all__ = ["TENSOR_TAGS", "Handle", "Transport", "known_transports", "make_transport", "register_transport",
           "resolve_kind"]

logger = logging.getLogger(__name__)

TENSOR_TAGS: tuple[int, ...] = (3, 5, 6)
"""The tags of the cluster's tensor traffic: activations, KV pages, weights (``TAG_HIDDEN``,
``TAG_KV``, ``TAG_WEIGHTS`` of ``orchestrator/cluster/messages.py``, which this layer may not
import; a test pins them equal). Tagless transports make one channel for each."""

TransportFactory = Callable[[Any, Sequence[int]], Transport]
"""Builds a transport from an MPI communicator and the tags its traffic will use
(collectively, on every rank)."""


def _mpi(comm: Any, tags: Sequence[int]) -> Transport:
    from orchestrator.transport.mpi import MpiTransport

    return MpiTransport(comm)  # MPI has tags: any tag works


def _nccl(comm: Any, tags: Sequence[int]) -> Transport:
    from orchestrator.transport.nccl import NcclTransport

    return NcclTransport(comm, tags)


def _gloo(comm: Any, tags: Sequence[int]) -> Transport:
    """The nccl transport's code over gloo, CPU tensors; for testing the NCCL path without a GPU."""
    from orchestrator.transport.nccl import GlooTransport

    return GlooTransport(comm, tags)


_REGISTRY: dict[str, TransportFactory] = {"mpi": _mpi, "nccl": _nccl, "gloo": _gloo}
AUTO = "auto"


def register_transport(name: str, factory: TransportFactory) -> None:
    """Add a transport under ``name`` (e.g. a CUDA IPC one); names are unique.

    ``factory(comm, tags)`` is called collectively on every rank."""
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


def make_transport(kind: str, comm: Any, tags: Sequence[int] = TENSOR_TAGS) -> Transport:
    """Build the transport named ``kind`` over the MPI communicator ``comm``, for ``tags``.

    Collective: every rank of ``comm`` must call it with the same ``kind`` and ``tags``. A
    tagless transport (nccl, gloo) refuses a tag outside ``tags``. ``auto`` takes mpi
    instead of nccl when two ranks use one GPU or a rank has none: NCCL refuses two ranks
    on one device, and the mpi transport stages CUDA tensors through host memory.
    """
    name = resolve_kind(kind)
    if kind == AUTO and name == "nccl" and _ranks_share_gpus(comm):
        logger.info("ranks share a GPU (or one has none): the mpi transport (staged through host "
                    "memory) instead of nccl")
        name = "mpi"
    return _REGISTRY[name](comm, tuple(tags))


def _ranks_share_gpus(comm: Any) -> bool:
    """Whether two ranks use one GPU, from every rank's ``(host, GPU UUID)`` (collective).

    Identities, not counts: with ``CUDA_VISIBLE_DEVICES`` giving each rank one GPU, a host
    runs more ranks than any rank sees GPUs, yet none is shared.
    """
    from engines.devices import cuda_index, gpu_identity, gpus_shared, local_rank

    index = local_rank(comm)  # collective: every rank, GPU or not
    count = torch.cuda.device_count()
    identity = gpu_identity(torch.device("cuda", cuda_index(index, count))) if count else None
    return gpus_shared(comm.allgather(identity))
