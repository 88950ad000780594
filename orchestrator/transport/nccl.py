"""Tensors through ``torch.distributed`` point-to-point, one process group per traffic class.

:class:`NcclTransport` moves CUDA tensors over NCCL. :class:`GlooTransport` is the same
code over the gloo backend on CPU tensors, so CI exercises this module without a GPU;
the code never passes a tag to ``isend``/``irecv``, so gloo matches a pair's messages in
posting order, as NCCL does, and hides no ordering bug that NCCL would hit.

Setup from MPI: rank 0 picks a free TCP port on its host and broadcasts ``host:port``
over MPI, then every rank joins with ``init_method="tcp://host:port"``. No
MASTER_ADDR/MASTER_PORT to set, no torchrun.

Channels. NCCL has no tags: a receive matches the next transfer posted between the pair,
whatever it carries. Once a pipelined group forms, two kinds of traffic share a pair of
ranks: activations (stage i -> i+1, posted by the rank loop as micro-batches run) and the
KV exchange's pages or the restore's weight pulls (posted by the mover as turns come),
in an order each rank decides by its own timing. On one stream a receive can take the
other class's bytes: garbage, or a size mismatch that hangs until NCCL's watchdog. So
each tag the cluster uses gets its own channel, a process group of all ranks (its own
NCCL communicators and streams), created collectively at construction in tag order; a
tag without a channel raises instead of sharing one. Within a channel a pair's transfers
match in posting order, which callers already guarantee for one class. Two other designs
were rejected: a header per transfer naming its class needs a demultiplexer with buffers
of unknown size on the receiving side, and one global order over classes would couple
the rank loop's scheduling to the exchange's. The cost is memory: each channel holds its
own NCCL connections per peer (buffers of ``NCCL_BUFFSIZE``, 4 MiB by default, per p2p
channel).

Warm-up. torch creates a pair's NCCL communicator on the pair's first transfer, and the
creation blocks the host until the peer makes its first transfer on that channel too.
First contacts made in an order the traffic decides can form a cycle (rank 0 waits for
1 on one channel while 1 waits for 0 on another; or 0 -> 1 -> 2 -> 0) and deadlock. So
construction makes every first contact itself, in one global order: pairs ``(i, j)``,
``i < j``, lexicographically, and within a pair the channels in tag order; the lower
rank sends one element, the higher receives it. Each rank walks its own steps in that
order; no deadlock, since the smallest unfinished step always has both its ranks at it
(every earlier step of either rank is smaller, hence done). It costs pairs x channels =
``n (n-1) / 2 x len(tags)`` first contacts; pairs of disjoint ranks proceed at once, so
the critical path is ``(2n - 3) x len(tags)`` steps, not all of them. On NCCL each step
is a communicator creation (tens to hundreds of ms), which the first transfer would pay
anyway; on gloo a message (4 ranks on 2 CPU cores: 7-50 ms in all; see ``warm_up_s``). It
cannot be skipped: skipping is safe only where no cycle can form (one pair, one channel)
or where the backend connects every pair when the group is made (gloo, in
``new_group``), and there the warm-up costs next to nothing or only moves a cost forward.

Left to callers, as before: on one channel a rank's sends and receives with one peer run
in posting order (torch puts a pair's work on one NCCL stream), so two ranks that both
post a receive before their send to each other wait for each other: one side of a pair
sends first. And channels are independent only while NCCL kernels of different
communicators can run at once on a GPU (p2p kernels take few SMs; a device-wide
synchronization while a receive waits on its peer can still stall both).

The module imports without CUDA (and without NCCL in the torch build); only constructing
an :class:`NcclTransport` needs them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.transport.base import Handle, Transport

logger = logging.getLogger(__name__)

MASTER_ADDR_ENV = "KUNSERVE_NCCL_MASTER_ADDR"
"""Overrides the address rank 0 advertises (its host name by default), e.g. on multi-homed hosts."""


class WorkHandle(Handle):
    """One ``torch.distributed`` work object and the tensor it reads or writes.

    The tensor is kept until completion: the caching allocator must not reuse its memory
    while the backend still reads or writes it.
    """

    def __init__(self, work: dist.Work, tensor: torch.Tensor) -> None:
        self.work = work
        self.tensor: torch.Tensor | None = tensor
        self.done = False

    def _finish(self) -> None:
        self.done = True
        self.tensor = None


class PolledHandle(WorkHandle):
    """A work whose completion can be polled (NCCL: ``is_completed`` queries its CUDA event)."""

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


class WaitedHandle(WorkHandle):
    """A work that reports completion only from ``wait`` (gloo's send and receive works:
    the data moves in gloo's own threads, but ``is_completed`` stays false until waited).

    The first :meth:`test` hands the wait to a daemon thread (``Work.wait`` releases the
    GIL), so polling callers (the rank loop, the KV mover) never block; a thread per
    transfer, not a pool, since a pooled wait could sit behind one whose peer waits on it.
    """

    def __init__(self, work: dist.Work, tensor: torch.Tensor) -> None:
        super().__init__(work, tensor)
        self._waiter: threading.Thread | None = None
        self._error: BaseException | None = None

    def test(self) -> bool:
        if not self.done:
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_work, daemon=True, name="gloo-wait")
                self._waiter.start()
            if self._waiter.is_alive():
                return False
            self._finish()
        return self._raise_failure()

    def wait(self) -> None:
        if not self.done:
            if self._waiter is None:
                self._wait_work()
            else:
                self._waiter.join()
            self._finish()
        self._raise_failure()

    def _wait_work(self) -> None:
        try:
            self.work.wait()
        except BaseException as exc:  # re-raised by test/wait in the caller's thread
            self._error = exc

    def _raise_failure(self) -> bool:
        if self._error is not None:
            raise RuntimeError(f"a gloo transfer failed: {self._error}") from self._error
        return True


class DistTransport(Transport):
    """Point-to-point transfers of contiguous tensors over ``torch.distributed``, one
    channel (process group) per tag in ``tags``; backend-generic (see the module docstring).

    Construction is collective over ``comm``, with the same ``tags`` on every rank. The
    default process group is created if none exists (and destroyed by :meth:`close`); an
    existing one is used if its rank and size match ``comm``.
    """

    name = "dist"
    backend: str
    handle_type: type[WorkHandle]

    def __init__(self, comm: Any, tags: Iterable[int], device: torch.device, timeout_s: float = 300.0) -> None:
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.device = device
        timeout = timedelta(seconds=timeout_s)
        tags = _agreed_tags(comm, tags)
        self._owns_group = _join_default_group(comm, self.backend, device, timeout)
        self._channels = {tag: dist.new_group(backend=self.backend, timeout=timeout) for tag in tags}
        """One process group per tag, made in tag order on every rank (``new_group`` is collective)."""
        self._pending: dict[int, list[tuple[int, WorkHandle]]] = {}
        self.interleaved = 0
        """Transfers posted while another tag's transfers with the same peer were pending."""
        self._interleave_logged: set[tuple[int, int, int]] = set()
        t0 = time.perf_counter()
        self._warm_up()
        self.warm_up_s = time.perf_counter() - t0
        """Seconds the warm-up of every pair's channels took on this rank."""
        logger.info("%s transport: %d channels (tags %s), %d pairs warmed up in %.3f s", self.name, len(tags),
                    list(tags), self.size * (self.size - 1) // 2, self.warm_up_s)

    def all_reduce_group(self, ranks: Sequence[int]) -> Callable[[torch.Tensor], None]:
        """``dist.all_reduce`` over a process group of ``ranks`` (a ring on NCCL: every member
        ends with the same values). ``new_group`` is collective over every rank, members or
        not, in the same order."""
        members = sorted(ranks)
        group = dist.new_group(members, backend=self.backend)
        if self.rank not in members:
            raise ValueError(f"rank {self.rank} is not in the all-reduce group {members}")

        def all_reduce(t: torch.Tensor) -> None:
            if t.device != self.device or not t.is_contiguous():
                raise ValueError(f"all_reduce: the {self.name} transport needs a contiguous tensor on {self.device}, "
                                 f"got {'a strided' if not t.is_contiguous() else 'one'} on {t.device}")
            dist.all_reduce(t, group=group)
        return all_reduce

    @property
    def tags(self) -> tuple[int, ...]:
        """The tags that have a channel, in creation order."""
        return tuple(self._channels)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Handle:
        group = self._channel(tag)
        self._check(tensor, dst, "isend")
        # No tag: gloo would match by it and hide an ordering bug that NCCL, tagless, has.
        return self._track(dst, tag, self.handle_type(dist.isend(tensor, dst, group=group), tensor))

    def irecv(self, out: torch.Tensor, src: int, tag: int) -> Handle:
        group = self._channel(tag)
        self._check(out, src, "irecv")
        return self._track(src, tag, self.handle_type(dist.irecv(out, src, group=group), out))

    def _track(self, peer: int, tag: int, handle: WorkHandle) -> WorkHandle:
        """Note a transfer posted while another class's with the same peer is pending: the
        case channels exist for. Counted in ``interleaved``; logged once per peer and pair
        of classes, so a run shows that its classes did meet on a pair."""
        pending = [(t, h) for t, h in self._pending.get(peer, ()) if not h.done]
        others = sorted({t for t, _ in pending if t != tag})
        if others:
            self.interleaved += 1
            key = (peer, tag, others[0])
            if key not in self._interleave_logged:
                self._interleave_logged.add(key)
                logger.info("%s transport: a tag %d transfer with rank %d posted while tag %d ones with it are "
                            "in flight (each on its own channel)", self.name, tag, peer, others[0])
        self._pending[peer] = pending + [(tag, handle)]
        return handle

    def close(self) -> None:
        """Destroy the channels, and the default group if this transport created it (collective)."""
        for group in self._channels.values():
            dist.destroy_process_group(group)
        self._channels = {}
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def _channel(self, tag: int) -> dist.ProcessGroup:
        try:
            return self._channels[tag]
        except KeyError:
            raise ValueError(f"tag {tag} has no channel in the {self.name} transport (tags {list(self._channels)}): "
                             "a tagless backend cannot let two traffic classes share one") from None

    def _warm_up(self) -> None:
        """Make every pair's first contact on every channel, in the global order of
        :func:`warm_up_steps` (deadlock-free; see the module docstring)."""
        token = torch.empty(1, dtype=torch.int64, device=self.device)
        for lo, hi, tag in warm_up_steps(self.size, self.tags):
            if self.rank == lo:
                token.fill_(lo)
                self.isend(token, hi, tag).wait()
            elif self.rank == hi:
                self.irecv(token, lo, tag).wait()
                if int(token.item()) != lo:
                    raise RuntimeError(f"warm-up: rank {hi} got {int(token.item())} from rank {lo} on tag {tag}")

    def _check(self, tensor: torch.Tensor, peer: int, op: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != self.device:
            raise ValueError(f"{op}: the {self.name} transport of this rank moves tensors on {self.device}, "
                             f"got one on {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{op}: the {self.name} transport needs a contiguous tensor; call .contiguous() first")
        if not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"{op}: peer {peer} must be another rank in [0, {self.size})")


class NcclTransport(DistTransport):
    """CUDA tensors over NCCL. ``device`` defaults to this rank's GPU as the engine picks
    it (``engines.devices.rank_cuda_device``: local rank modulo the visible GPUs)."""

    name = "nccl"
    backend = "nccl"
    handle_type = PolledHandle

    def __init__(self, comm: Any, tags: Iterable[int], device: torch.device | str | int | None = None,
                 timeout_s: float = 300.0) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("the nccl transport needs CUDA, and no CUDA device is available")
        if not dist.is_available() or not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL support in torch.distributed")
        dev = _pick_device(comm, device)
        torch.cuda.set_device(dev)
        super().__init__(comm, tags, dev, timeout_s)


class GlooTransport(DistTransport):
    """CPU tensors over gloo: the nccl transport's code, for testing it without a GPU."""

    name = "gloo"
    backend = "gloo"
    handle_type = WaitedHandle

    def __init__(self, comm: Any, tags: Iterable[int], timeout_s: float = 300.0) -> None:
        if not dist.is_available() or not dist.is_gloo_available():
            raise RuntimeError("this torch build has no gloo support in torch.distributed")
        super().__init__(comm, tags, torch.device("cpu"), timeout_s)


def warm_up_steps(size: int, tags: Iterable[int]) -> Iterator[tuple[int, int, int]]:
    """``(lower rank, higher rank, tag)`` of every first contact, in the one global order:
    pairs lexicographically, then tags in the given order."""
    tags = tuple(tags)
    for lo in range(size):
        for hi in range(lo + 1, size):
            for tag in tags:
                yield lo, hi, tag


def _agreed_tags(comm: Any, tags: Iterable[int]) -> tuple[int, ...]:
    """``tags`` sorted and deduplicated, checked equal on every rank: channels are made
    collectively, so ranks with different tags would hang in ``new_group``."""
    mine = tuple(sorted({int(t) for t in tags}))
    if not mine:
        raise ValueError("a tagless transport needs at least one tag to make a channel for")
    everyone = comm.allgather(mine)
    if any(t != mine for t in everyone):
        raise ValueError(f"ranks disagree on the transport's tags: {everyone}")
    return mine


def _join_default_group(comm: Any, backend: str, device: torch.device, timeout: timedelta) -> bool:
    """Initialize torch.distributed's default group over ``comm`` unless it exists; True if made here."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, size):
            raise RuntimeError(
                f"torch.distributed is already initialized as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the MPI communicator says rank {rank} of {size}")
        return False
    init_method = comm.bcast(_free_tcp_address() if rank == 0 else None, root=0)
    logger.info("rank %d joins the %s group at %s on %s", rank, backend, init_method, device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return True


def _pick_device(comm: Any, device: torch.device | str | int | None) -> torch.device:
    if device is not None:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"the nccl transport needs a CUDA device, got {dev}")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    from engines.devices import rank_cuda_device

    return rank_cuda_device(comm)


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
