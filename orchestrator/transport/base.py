"""Tensor transport: how activations, KV pages and weights move between ranks.

Control messages go over MPI (mpi4py, pickled dataclasses). Tensor payloads go through a
``Transport``: point-to-point, non-blocking, into preallocated receive buffers, so that the
receiver knows shape and dtype from the control message that announced the payload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch


class Handle(ABC):
    """A pending non-blocking transfer."""

    @abstractmethod
    def test(self) -> bool:
        """True once the transfer has completed (never blocks)."""

    @abstractmethod
    def wait(self) -> None:
        """Block until the transfer has completed."""


class Transport(ABC):
    """Point-to-point tensor transfers between the ranks of one MPI job."""

    name: str

    @abstractmethod
    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Handle:
        """Start sending a contiguous tensor; it must not be modified until the handle completes."""

    @abstractmethod
    def irecv(self, out: torch.Tensor, src: int, tag: int) -> Handle:
        """Start receiving into a preallocated contiguous tensor of the sender's shape and dtype."""

    def isend_rows(self, tensor: torch.Tensor, rows: Sequence[int], dst: int, tag: int) -> Handle:
        """Send rows ``rows`` (along dim 0, in that order) of ``tensor`` as one message.

        The receiver posts :meth:`irecv_rows` with as many rows of the same shape. This
        default gathers the rows into one buffer first (one extra copy); transports that
        can describe scattered memory to the wire (MPI's derived datatypes) override it and
        send straight from ``tensor``. Those rows must not change until the handle completes.
        """
        return self.isend(tensor.index_select(0, _index(rows, tensor)), dst, tag)

    def irecv_rows(self, tensor: torch.Tensor, rows: Sequence[int], src: int, tag: int) -> Handle:
        """Receive one :meth:`isend_rows` message into rows ``rows`` (dim 0) of ``tensor``.

        This default receives into a scratch buffer and scatters it into the rows once the
        transfer completes (in the handle's ``test``/``wait``).
        """
        index = _index(rows, tensor)
        scratch = torch.empty((len(index), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        return OnArrival(self.irecv(scratch, src, tag), lambda: tensor.index_copy_(0, index, scratch))

    def all_reduce_group(self, ranks: Sequence[int]) -> Callable[[torch.Tensor], None]:
        """An in-place sum over ``ranks`` (this rank among them): a tensor-parallel set's
        all-reduce. Blocking; every member ends with the same values. Making one is
        collective: the MPI transport needs the members, the torch.distributed ones every
        rank, each making the groups in the same order."""
        raise NotImplementedError(f"the {self.name} transport has no all-reduce")

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self.isend(tensor, dst, tag).wait()

    def recv(self, out: torch.Tensor, src: int, tag: int) -> torch.Tensor:
        self.irecv(out, src, tag).wait()
        return out


def _index(rows: Sequence[int], tensor: torch.Tensor) -> torch.Tensor:
    index = torch.as_tensor(rows, dtype=torch.int64, device=tensor.device)
    if index.ndim != 1:
        raise ValueError(f"rows must be a flat list of row indices, got shape {tuple(index.shape)}")
    return index


class OnArrival(Handle):
    """A receive that finishes with a local step once it completes (a scatter into rows, a
    copy from a staging buffer to the device), run once, from ``test`` or ``wait``."""

    def __init__(self, inner: Handle, finish: Callable[[], None]) -> None:
        self.inner = inner
        self.finish: Callable[[], None] | None = finish

    def test(self) -> bool:
        if not self.inner.test():
            return False
        self._finish()
        return True

    def wait(self) -> None:
        self.inner.wait()
        self._finish()

    def _finish(self) -> None:
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
