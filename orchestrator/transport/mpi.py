"""CPU tensors over MPI point-to-point, as raw bytes, without copies.

A tensor of any dtype (bfloat16 included, which numpy lacks) goes over the wire as the
bytes of its storage, ``MPI.BYTE``: an MPI buffer made from the tensor's address and size
shares its memory, so MPI reads from and writes into the tensor itself. (This is what
``tensor.view(torch.uint8).numpy()`` would give, about 2 us cheaper per call.)

Rows of a tensor (KV pages in a pool) travel without a gather or scatter copy: between
ranks of one host the receiver copies them out of the sender's memory itself
(``transport/cma.py``); otherwise an MPI indexed datatype describes where they lie,
coalesced into runs of consecutive rows, and MPI reads them from and writes them into the
tensor's memory.

Messages larger than ``max_chunk_bytes`` (1 GiB by default) are split into several MPI
messages with the same tag. MPI counts are 32-bit ints in many builds, so one message
cannot exceed 2 GiB; MPI's non-overtaking rule (messages between one pair with one tag
match in the order they were posted) puts the chunks back in order, as long as both
sides post their transfers for a tag in the same order, which a single message needs
anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from mpi4py import MPI

from orchestrator.transport.base import Handle, OnArrival, Transport
from orchestrator.transport.cma import CmaRows, runs_of

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_BYTES = 1 << 30
"""Largest single MPI message: a power of two safely under the int32 count limit."""


class MpiHandle(Handle):
    """The MPI requests of one transfer (one per chunk), and the tensor they read or write.

    The handle keeps the tensor alive until the transfer completes, so a caller that drops
    its own reference cannot free memory that MPI still reads or writes. A receive also
    checks that each chunk arrived whole (see :meth:`wait`).
    """

    __slots__ = ("requests", "tensor", "expected_bytes", "statuses", "done", "error", "datatypes")

    def __init__(self, requests: list[MPI.Request], tensor: torch.Tensor,
                 expected_bytes: list[int] | None = None,
                 datatypes: list[MPI.Datatype] | None = None) -> None:
        self.requests = requests
        self.tensor: torch.Tensor | None = tensor
        self.datatypes = datatypes or []
        """Derived datatypes of a rows transfer, freed on completion."""
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
        for dt in self.datatypes:
            dt.Free()
        self.datatypes = []
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
    """Point-to-point transfers of contiguous tensors over an MPI communicator.

    CUDA tensors are staged through pinned host memory (copied out before a send, copied in when
    a receive completes): slower than NCCL, but it works where NCCL refuses, e.g. two
    ranks sharing one GPU.

    Construction is collective: it duplicates ``comm`` so that tensor messages never match
    the control messages that callers exchange on ``comm`` itself, whatever the tags.
    Call :meth:`close` (collective too) to free the duplicate.
    """

    name = "mpi"

    def __init__(self, comm: MPI.Comm, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, cma: bool = True) -> None:
        if not 0 < max_chunk_bytes < 1 << 31:
            raise ValueError(f"max_chunk_bytes must be in [1, 2**31), got {max_chunk_bytes}")
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.max_chunk_bytes = max_chunk_bytes
        # TAG_UB is only guaranteed on COMM_WORLD.
        self._tag_ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
        self._groups: list[MPI.Comm] = []
        """Sub-communicators of the all-reduce groups (``all_reduce_group``), freed by ``close``."""
        self.cma = CmaRows(self.comm, enabled=cma)
        """Rows between ranks of one host: pulled by the receiver (see ``transport/cma.py``)."""

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Handle:
        if _on_device(tensor, "isend"):
            return self.isend(_staged(tensor), dst, tag)  # the host copy travels; the handle keeps it
        self._check_peer(dst, tag)
        chunks = self._chunks(tensor, "isend", readonly=True)
        requests = [self.comm.Isend([chunk, MPI.BYTE], dst, tag) for chunk in chunks]
        return MpiHandle(requests, tensor)

    def irecv(self, out: torch.Tensor, src: int, tag: int) -> Handle:
        if _on_device(out, "irecv"):
            host = _staging_buffer(out)
            return OnArrival(self.irecv(host, src, tag), lambda: out.copy_(host))
        self._check_peer(src, tag)
        chunks = self._chunks(out, "irecv", readonly=False)
        requests = [self.comm.Irecv([chunk, MPI.BYTE], src, tag) for chunk in chunks]
        return MpiHandle(requests, out, expected_bytes=[len(c) for c in chunks])

    def isend_rows(self, tensor: torch.Tensor, rows: Sequence[int], dst: int, tag: int) -> Handle:
        """Send rows of ``tensor`` straight from its memory: read by the receiver itself on
        this host (cross-memory attach), else an MPI indexed datatype (no gather either way).
        Rows of a CUDA tensor are gathered on the device and staged."""
        return self._rows(tensor, rows, dst, tag, send=True)

    def irecv_rows(self, tensor: torch.Tensor, rows: Sequence[int], src: int, tag: int) -> Handle:
        """Receive rows straight into ``tensor``'s memory (copied out of the sender's on this
        host, else an MPI indexed datatype: no scatter either way). Rows of a CUDA tensor
        are staged and scattered on the device."""
        return self._rows(tensor, rows, src, tag, send=False)

    def _rows(self, tensor: torch.Tensor, rows: Sequence[int], peer: int, tag: int, send: bool) -> Handle:
        """How rows travel: the base class's way (CUDA staging, or rows no datatype
        describes), copied by the receiver on this host (cross-memory attach), or as MPI
        indexed datatypes; the peer and tag are checked first."""
        op = "isend_rows" if send else "irecv_rows"
        generic = super().isend_rows if send else super().irecv_rows
        if _on_device(tensor, op):
            return generic(tensor, rows, peer, tag)
        self._check_peer(peer, tag)
        index = _rows_index(tensor, rows, op)
        reader, owner = (peer, self.rank) if send else (self.rank, peer)
        if self.cma.can_read[reader][owner]:
            return (self.cma.isend_rows if send else self.cma.irecv_rows)(tensor, index, peer, tag)
        parts = self._row_types(tensor, index)
        if parts is None:
            return generic(tensor, rows, peer, tag)
        data = MPI.buffer.fromaddress(tensor.data_ptr(), tensor.nbytes, readonly=send)
        post = self.comm.Isend if send else self.comm.Irecv
        requests = [post([data, count, dt], peer, tag) for dt, count, _ in parts]
        datatypes = [dt for dt, _, _ in parts]
        if send:
            return MpiHandle(requests, tensor, datatypes=datatypes)
        return MpiHandle(requests, tensor, expected_bytes=[n for _, _, n in parts], datatypes=datatypes)

    def _row_types(self, tensor: torch.Tensor, index: np.ndarray) -> list[tuple[MPI.Datatype, int, int]] | None:
        """One ``(datatype, count, bytes)`` per message of at most ``max_chunk_bytes``, or
        None when a single row exceeds that (then the rows are gathered and chunked)."""
        row_bytes = tensor[0].nbytes if tensor.shape[0] else 0
        if row_bytes > self.max_chunk_bytes:
            return None
        if not index.size or not row_bytes:
            # Nothing to move: still one (empty) message, so both sides post one.
            return [(MPI.BYTE.Dup(), 0, 0)]  # a duplicate, so the handle may free it
        per_message = self.max_chunk_bytes // row_bytes
        return [_indexed_rows(index[i:i + per_message], row_bytes) for i in range(0, index.size, per_message)]

    def all_reduce_group(self, ranks: Sequence[int]) -> Callable[[torch.Tensor], None]:
        """Reduce to the group's first rank, then broadcast (not ``Allreduce``, whose
        algorithms may add in a different order on each rank): every member ends with the
        same bits. Summed in float32 on the host (MPI has no bfloat16); CUDA tensors are
        staged through host memory."""
        members = sorted(ranks)
        if self.rank not in members:
            raise ValueError(f"rank {self.rank} is not in the all-reduce group {members}")
        sub = self.comm.Create_group(self.comm.group.Incl(members))  # collective over the members only
        self._groups.append(sub)
        return all_reduce_over(sub)

    def close(self) -> None:
        """Free the duplicated communicators (collective; no transfer may be pending)."""
        for sub in self._groups:
            sub.Free()
        self._groups = []
        self.cma.close()
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


def all_reduce_over(comm: MPI.Comm) -> Callable[[torch.Tensor], None]:
    """An in-place sum over every rank of ``comm``: a reduce to its rank 0, then a broadcast,
    so every rank holds the same bits; in float32 on the host (MPI has no bfloat16)."""
    root = comm.Get_rank() == 0

    def all_reduce(t: torch.Tensor) -> None:
        host = t.detach().to("cpu", torch.float32, copy=True).contiguous()
        buf = host.numpy()
        comm.Reduce(MPI.IN_PLACE if root else buf, buf if root else None, op=MPI.SUM, root=0)
        comm.Bcast(buf, root=0)
        t.copy_(host)
    return all_reduce


def _rows_index(tensor: torch.Tensor, rows: Sequence[int], op: str) -> np.ndarray:
    """``rows`` as an int64 array, checked against ``tensor``."""
    _check_tensor(tensor, op)
    if tensor.ndim == 0:
        raise ValueError(f"{op}: a 0-d tensor has no rows")
    index = np.asarray(rows, dtype=np.int64)
    if index.ndim != 1:
        raise ValueError(f"{op}: rows must be a flat list of row indices, got shape {index.shape}")
    if index.size and (index.min() < 0 or index.max() >= tensor.shape[0]):
        raise IndexError(f"{op}: row {int(index.min() if index.min() < 0 else index.max())} is outside "
                         f"the tensor's {tensor.shape[0]} rows")
    return index


def _indexed_rows(index: np.ndarray, row_bytes: int) -> tuple[MPI.Datatype, int, int]:
    """A committed datatype covering rows ``index`` (in order), with runs of consecutive rows
    as single blocks; returns ``(datatype, 1, bytes)``."""
    starts, lengths = runs_of(index)
    row = MPI.BYTE.Create_contiguous(row_bytes)
    dt = row.Create_indexed(lengths.tolist(), starts.tolist()).Commit()
    row.Free()
    return dt, 1, int(index.size) * row_bytes


def _staging_buffer(like: torch.Tensor) -> torch.Tensor:
    """A pinned host tensor of ``like``'s shape and dtype, to stage a CUDA tensor through.

    Pinned, so the device copy runs at full speed instead of through the driver's pageable
    bounce buffer; and reused, since pinned tensors come from torch's caching host allocator,
    which hands a freed block out again (a fresh ``cudaHostAlloc`` costs ms). A block is
    freed when the handle releases its tensor, after MPI is done with it; the copies are
    blocking, so no device work still uses it then. The cache keeps the largest staging
    buffers pinned until ``torch.accelerator.empty_host_cache()``.
    """
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)


def _staged(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor's host copy in a pinned staging buffer (complete on return)."""
    return _staging_buffer(tensor).copy_(tensor)


def _on_device(tensor: torch.Tensor, op: str) -> bool:
    """Whether ``tensor`` is a CUDA tensor to stage through host memory (checked like any)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
        return False
    _check_layout(tensor, op)
    return True


def _check_tensor(tensor: torch.Tensor, op: str) -> None:
    """Refuse what cannot go over the wire as one flat run of bytes in host memory."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu:
        raise ValueError(f"{op}: the mpi transport moves CPU and CUDA tensors, got one on {tensor.device}")
    _check_layout(tensor, op)


def _check_layout(tensor: torch.Tensor, op: str) -> None:
    if tensor.layout != torch.strided or not tensor.is_contiguous():
        raise ValueError(f"{op}: the mpi transport needs a contiguous tensor (shape {tuple(tensor.shape)}, "
                         f"stride {tensor.stride() if tensor.layout == torch.strided else tensor.layout}); "
                         "call .contiguous() first")
    if tensor.is_conj() or tensor.is_neg():
        # Their memory holds the unconjugated / unnegated values.
        raise ValueError(f"{op}: resolve the lazy conjugate/negation first (tensor.resolve_conj())")
