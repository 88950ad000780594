"""CPU tensors over MPI point-to-point, as raw bytes, without copies.

A tensor of any dtype (bfloat16 included, which numpy lacks) goes over the wire as the
bytes of its storage, ``MPI.BYTE``: an MPI buffer made from the tensor's address and size
shares its memory, so MPI reads from and writes into the tensor itself. (This is what
``tensor.view(torch.uint8).numpy()`` would give, about 2 us cheaper per call.)

Messages larger than ``max_chunk_bytes`` (1 GiB by default) are split into several MPI
messages with the same tag. MPI counts are 32-bit ints in many builds, so one message
cannot exceed 2 GiB; MPI's non-overtaking rule (messages between one pair with one tag
match in the order they were posted) puts the chunks back in order, as long as both
sides post their transfers for a tag in the same order, which a single message needs
anyway.
"""

from __future__ import annotations

import logging

import torch
from mpi4py import MPI

from orchestrator.transport.base import Handle, Transport

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_BYTES = 1 << 30
"""Largest single MPI message: a power of two safely under the int32 count limit."""


class MpiHandle(Handle):
    """The MPI requests of one transfer (one per chunk), and the tensor they read or write.

    The handle keeps the tensor alive until the transfer completes, so a caller that drops
    its own reference cannot free memory that MPI still reads or writes. A receive also
    checks that each chunk arrived whole (see :meth:`wait`).
    """

    __slots__ = ("requests", "tensor", "expected_bytes", "statuses", "done", "error")

    def __init__(self, requests: list[MPI.Request], tensor: torch.Tensor,
                 expected_bytes: list[int] | None = None) -> None:
        self.requests = requests
        self.tensor: torch.Tensor | None = tensor
        self.expected_bytes = expected_bytes
        """Receives only: each chunk's size, checked against what actually arrived."""
        self.statuses = None if expected_bytes is None else [MPI.Status() for _ in requests]
        self.done = False
        self.error: Exception | None = None
        """Set when a completed receive had the wrong size; raised by every later test/wait."""

    def test(self) -> bool:
        if not self.done:
            # One request is the common case; Request.Test is ~0.3 us cheaper than Testall.
            if len(self.requests) == 1:
                if not self.requests[0].Test(self.statuses[0] if self.statuses else None):
                    return False
            elif not MPI.Request.Testall(self.requests, self.statuses):
                return False
            self._finish()
        if self.error is not None:
            raise self.error
        return True

    def wait(self) -> None:
        """Block until done; a receive whose message was shorter than ``out`` raises RuntimeError."""
        if not self.done:
            if len(self.requests) == 1:
                self.requests[0].Wait(self.statuses[0] if self.statuses else None)
            else:
                MPI.Request.Waitall(self.requests, self.statuses)
            self._finish()
        if self.error is not None:
            raise self.error

    def _finish(self) -> None:
        self.done = True
        self.tensor = None
        if self.statuses is None:
            return
        # A longer message fails inside MPI (truncation); a shorter one would silently
        # leave the tail of the buffer stale, so it is caught here.
        for i, status in enumerate(self.statuses):
            got = status.Get_count(MPI.BYTE)
            if got != self.expected_bytes[i]:
                self.error = RuntimeError(
                    f"received {got} bytes from rank {status.Get_source()} (tag {status.Get_tag()}, "
                    f"chunk {i}) into a buffer of {self.expected_bytes[i]}: the sender's tensor has "
                    "another size")
                return


class MpiTransport(Transport):
    """Point-to-point transfers of contiguous CPU tensors over an MPI communicator.

    Construction is collective: it duplicates ``comm`` so that tensor messages never match
    the control messages that callers exchange on ``comm`` itself, whatever the tags.
    Call :meth:`close` (collective too) to free the duplicate.
    """

    name = "mpi"

    def __init__(self, comm: MPI.Comm, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> None:
        if not 0 < max_chunk_bytes < 1 << 31:
            raise ValueError(f"max_chunk_bytes must be in [1, 2**31), got {max_chunk_bytes}")
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.max_chunk_bytes = max_chunk_bytes
        # TAG_UB is only guaranteed on COMM_WORLD.
        self._tag_ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Handle:
        self._check_peer(dst, tag)
        chunks = self._chunks(tensor, "isend", readonly=True)
        requests = [self.comm.Isend([chunk, MPI.BYTE], dst, tag) for chunk in chunks]
        return MpiHandle(requests, tensor)

    def irecv(self, out: torch.Tensor, src: int, tag: int) -> Handle:
        self._check_peer(src, tag)
        chunks = self._chunks(out, "irecv", readonly=False)
        requests = [self.comm.Irecv([chunk, MPI.BYTE], src, tag) for chunk in chunks]
        return MpiHandle(requests, out, expected_bytes=[len(c) for c in chunks])

    def close(self) -> None:
        """Free the duplicated communicator (collective; no transfer may be pending)."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()

    def _chunks(self, tensor: torch.Tensor, op: str, readonly: bool) -> list[MPI.buffer]:
        """The tensor's bytes as MPI buffers of at most ``max_chunk_bytes`` (shared memory, no copy).

        An empty tensor still gives one (empty) chunk, so both sides post one message.
        """
        _check_tensor(tensor, op)
        nbytes = tensor.nbytes
        # The buffer is a raw address: the handle keeps the tensor alive until completion.
        data = MPI.buffer.fromaddress(tensor.data_ptr(), nbytes, readonly=readonly)
        step = self.max_chunk_bytes
        if nbytes <= step:
            return [data]
        logger.debug("splitting a %d-byte message into %d chunks", nbytes, -(-nbytes // step))
        return [data[i:i + step] for i in range(0, nbytes, step)]

    def _check_peer(self, peer: int, tag: int) -> None:
        if not 0 <= peer < self.size:
            raise ValueError(f"rank {peer} is not in this communicator of size {self.size}")
        if not 0 <= tag <= self._tag_ub:
            raise ValueError(f"tag {tag} is outside MPI's range [0, {self._tag_ub}]")


def _check_tensor(tensor: torch.Tensor, op: str) -> None:
    """Refuse what cannot go over the wire as one flat run of bytes in host memory."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu:
        raise ValueError(f"{op}: the mpi transport moves CPU tensors only, got one on {tensor.device} "
                         "(use the nccl transport for CUDA tensors)")
    if tensor.layout != torch.strided or not tensor.is_contiguous():
        raise ValueError(f"{op}: the mpi transport needs a contiguous tensor (shape {tuple(tensor.shape)}, "
                         f"stride {tensor.stride() if tensor.layout == torch.strided else tensor.layout}); "
                         "call .contiguous() first")
    if tensor.is_conj() or tensor.is_neg():
        # Their memory holds the unconjugated / unnegated values.
        raise ValueError(f"{op}: resolve the lazy conjugate/negation first (tensor.resolve_conj())")
