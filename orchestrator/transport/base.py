"""Tensor transport: how activations, KV pages and weights move between ranks.

Control messages go over MPI (mpi4py, pickled dataclasses). Tensor payloads go through a
``Transport``: point-to-point, non-blocking, into preallocated receive buffers, so that the
receiver knows shape and dtype from the control message that announced the payload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self.isend(tensor, dst, tag).wait()

    def recv(self, out: torch.Tensor, src: int, tag: int) -> torch.Tensor:
        self.irecv(out, src, tag).wait()
        return out
