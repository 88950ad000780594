"""CUDA tensors through ``torch.distributed`` with the NCCL backend, set up from MPI.

The process group is initialized from the MPI communicator: rank 0 picks a free TCP port
on its host and broadcasts ``host:port`` over MPI, then every rank joins with
``init_method="tcp://host:port"``. No MASTER_ADDR/MASTER_PORT to set, no torchrun.

NCCL has no tags: a transfer matches the next one posted between the same pair of ranks.
Ordering per (sender, receiver) pair is FIFO, and callers rely on exactly that: both sides
post their transfers for a pair in the same order. The ``tag`` argument is accepted for the
interface and ignored. A rank's sends and receives with one peer also run in posting order
(torch puts a pair's point-to-point work on one NCCL stream), so two ranks that both post
a receive before their send wait for each other until the NCCL timeout: one side of a
pair sends first.

The module imports without CUDA (and without NCCL in the torch build); only constructing
an :class:`NcclTransport` needs them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from orchestrator.transport.base import Handle, Transport

logger = logging.getLogger(__name__)

MASTER_ADDR_ENV = "KUNSERVE_NCCL_MASTER_ADDR"
"""Overrides the address rank 0 advertises (its host name by default), e.g. on multi-homed hosts."""


@dataclass
class NcclHandle(Handle):
    """One ``torch.distributed`` work object and the tensor it reads or writes."""

    work: dist.Work
    tensor: torch.Tensor | None
    """Kept alive until completion: the caching allocator must not reuse its memory."""
    done: bool = field(default=False, init=False)

    def test(self) -> bool:
        if not self.done and self.work.is_completed():
            self._finish()
        return self.done

    def wait(self) -> None:
        if self.done:
            return
        # Work.wait() only makes the current stream wait for NCCL's stream; the host is
        # blocked by polling the work's completion event, so CPU readers see the data and
        # unrelated kernels on the current stream are not waited for.
        self.work.wait()
        while not self.work.is_completed():
            time.sleep(20e-6)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        self.tensor = None


class NcclTransport(Transport):
    """Point-to-point transfers of contiguous CUDA tensors over NCCL.

    Construction is collective over ``comm``. ``device`` defaults to the GPU of this rank's
    index among the ranks on its host (``local_rank % device_count``). The default process
    group is created if none exists (and then destroyed by :meth:`close`); an existing one
    is used if its rank and size match ``comm``.
    """

    name = "nccl"

    def __init__(self, comm, device: torch.device | str | int | None = None, timeout_s: float = 300.0) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("the nccl transport needs CUDA, and no CUDA device is available")
        if not dist.is_available() or not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL support in torch.distributed")
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.device = _pick_device(comm, device)
        torch.cuda.set_device(self.device)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            init_method = comm.bcast(_free_tcp_address() if self.rank == 0 else None, root=0)
            logger.info("rank %d joins the NCCL group at %s on %s", self.rank, init_method, self.device)
            dist.init_process_group("nccl", init_method=init_method, rank=self.rank,
                                    world_size=self.size, timeout=timedelta(seconds=timeout_s),
                                    device_id=self.device)
        elif (dist.get_rank(), dist.get_world_size()) != (self.rank, self.size):
            raise RuntimeError(
                f"torch.distributed is already initialized as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the MPI communicator says rank {self.rank} of {self.size}")

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Handle:
        self._check(tensor, dst, "isend")
        return NcclHandle(dist.isend(tensor, dst), tensor)

    def irecv(self, out: torch.Tensor, src: int, tag: int) -> Handle:
        self._check(out, src, "irecv")
        return NcclHandle(dist.irecv(out, src), out)

    def close(self) -> None:
        """Destroy the process group if this transport created it (collective)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def _check(self, tensor: torch.Tensor, peer: int, op: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != self.device:
            raise ValueError(f"{op}: the nccl transport of this rank moves tensors on {self.device}, "
                             f"got one on {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{op}: the nccl transport needs a contiguous tensor; call .contiguous() first")
        if not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"{op}: peer {peer} must be another rank in [0, {self.size})")


def _pick_device(comm, device: torch.device | str | int | None) -> torch.device:
    if device is not None:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"the nccl transport needs a CUDA device, got {dev}")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        local_rank = local.Get_rank()
    finally:
        local.Free()
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _free_tcp_address() -> str:
    """``tcp://host:port`` with a port that was free a moment ago on this host.

    The port is released before torch's store binds it; another process could take it in
    between, which would fail the init loudly, not silently.
    """
    host = os.environ.get(MASTER_ADDR_ENV) or socket.gethostname()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{host}:{port}"
