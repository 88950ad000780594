"""Rows between ranks on one host by cross-memory attach: one copy, pulled by the receiver.

MPI's own large contiguous messages between processes of one host already travel this way
(Open MPI's ``smsc/cma``: the receiver calls ``process_vm_readv`` on the sender's memory).
Scattered rows, such as a layer's KV pages, do not: an indexed datatype goes through MPI's
pack / copy / unpack pipeline, which needs both processes to keep calling into MPI, and a
rank loop that computes between its polls starves it. Here the receiver is handed the
sender's row addresses and copies them into its own rows with ``process_vm_readv`` (up to
``IOV_MAX`` runs per call), so a transfer costs the sender nothing but two small messages,
and the receiver one system call per thousand runs.

One transfer, both sides posted as for any message:

- sender: a header ``[seq, address, row_bytes, runs]`` on the data communicator with the
  caller's tag, then the runs ``[first rows..., lengths...]`` and, later, an ack from
  the receiver, both on a side communicator with tags ``2 seq`` and ``2 seq + 1`` (seq:
  the sender's count of transfers to that peer, so they pair with this transfer whatever
  else is in flight).
  The rows must not change until the ack has come: the handle completes then.
- receiver: the header (posted at once, so headers pair with transfers in posting order,
  as MPI messages do), then the runs; it reads the rows, then acks the bytes it read, or
  -1 when the sender's rows are not the size it expected (both sides raise then).

Whether the receiver may read the sender's memory (same host, ptrace rules, seccomp) is
probed once, collectively, when the transport is built; pairs that cannot fall back to
MPI datatypes. ``KUNSERVE_CMA=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket

import numpy as np
import torch
from mpi4py import MPI

from orchestrator.transport.base import Handle

logger = logging.getLogger(__name__)

IOV_MAX = 1024
"""Most iovecs one ``process_vm_readv`` call takes (Linux's UIO_MAXIOV)."""
CMA_ENV = "KUNSERVE_CMA"
_HEADER = 4


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _load_readv():
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_ssize_t
    return fn


_READV = _load_readv()


def runs_of(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` of the runs of consecutive values in ``index``, in order."""
    if not index.size:
        return index[:0], index[:0]
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    first = np.concatenate(([0], breaks))
    return index[first], np.diff(np.concatenate((first, [index.size])))


def _expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The rows that runs cover, in order (the inverse of :func:`runs_of`)."""
    if not lengths.size:
        return starts[:0]
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def _iovecs(address: int, row_bytes: int, rows: np.ndarray) -> np.ndarray:
    starts, lengths = runs_of(rows)
    iov = np.empty((starts.size, 2), dtype=np.uint64)
    iov[:, 0] = address + starts.astype(np.uint64) * row_bytes
    iov[:, 1] = lengths.astype(np.uint64) * row_bytes
    return iov


def read_rows(pid: int, local_address: int, local_rows: np.ndarray,
              remote_address: int, remote_rows: np.ndarray, row_bytes: int) -> int:
    """Copy rows ``remote_rows`` of process ``pid`` into our rows ``local_rows``; returns bytes.

    Works through the rows ``IOV_MAX`` at a time, so that neither side of one call has more
    runs than the kernel takes and both sides of it cover the same bytes.
    """
    total = 0
    for i in range(0, local_rows.size, IOV_MAX):
        local = _iovecs(local_address, row_bytes, local_rows[i:i + IOV_MAX])
        remote = _iovecs(remote_address, row_bytes, remote_rows[i:i + IOV_MAX])
        want = int(local[:, 1].sum())
        got = _READV(pid, local.ctypes.data_as(ctypes.POINTER(_Iovec)), len(local),
                     remote.ctypes.data_as(ctypes.POINTER(_Iovec)), len(remote), 0)
        if got != want:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv from pid {pid} copied {got} of {want} bytes: "
                               f"{os.strerror(err) if got < 0 else 'short read'}")
        total += got
    return total


class CmaRows:
    """The CMA rows protocol of one MPI transport: who can read whom, and the transfers."""

    def __init__(self, comm: MPI.Comm, enabled: bool = True) -> None:
        self.comm = comm
        self.side = comm.Dup()
        """Runs and acks, tagged by transfer number, apart from the caller's tags."""
        self.rank = comm.Get_rank()
        self._seq_ub = (MPI.COMM_WORLD.Get_attr(MPI.TAG_UB) + 1) // 2
        self._sent = [0] * comm.Get_size()
        self._receiving: list[CmaRecvHandle] = []
        """Receives not yet copied: a blocking wait on a send drives them (see :meth:`progress`)."""
        marker = np.array([os.getpid() * 7919 + self.rank], dtype=np.int64)
        enabled = enabled and _READV is not None and os.environ.get(CMA_ENV, "1") != "0"
        me = (socket.gethostname(), os.getpid(), marker.ctypes.data, int(marker[0]), enabled)
        everyone = comm.allgather(me)
        mine = [enabled and peer[4] and peer[0] == me[0] and self._can_read(peer) for peer in everyone]
        self.can_read = comm.allgather(mine)
        """``can_read[i][j]``: rank i reads rows from rank j by CMA (both know it)."""
        del marker  # every rank has probed by the time the second allgather returns
        self.pids = [peer[1] for peer in everyone]
        pairs = sum(map(sum, self.can_read))
        logger.debug("rank %d: cross-memory attach with ranks %s (%d pairs in all)",
                     self.rank, [j for j, ok in enumerate(self.can_read[self.rank]) if ok], pairs)
        away = [j for j, peer in enumerate(everyone) if peer[0] != me[0]]
        if away:
            logger.info("rank %d (host %s): ranks %s are on other hosts: rows to and from them go as MPI "
                        "indexed datatypes", self.rank, me[0], away)

    @staticmethod
    def _can_read(peer: tuple) -> bool:
        _host, pid, address, value, _ = peer
        out = np.zeros(1, dtype=np.int64)
        try:
            read_rows(pid, out.ctypes.data, np.zeros(1, np.int64), address, np.zeros(1, np.int64), 8)
        except OSError as exc:
            logger.info("cross-memory attach to pid %d refused (%s): scattered rows from it go "
                        "through MPI datatypes", pid, exc)
            return False
        return int(out[0]) == value

    def close(self) -> None:
        if self.side != MPI.COMM_NULL:
            self.side.Free()

    def isend_rows(self, tensor: torch.Tensor, index: np.ndarray, dst: int, tag: int) -> Handle:
        seq = self._sent[dst] % self._seq_ub
        self._sent[dst] += 1
        starts, lengths = runs_of(index)
        header = np.array([seq, tensor.data_ptr(), _row_bytes(tensor), starts.size], dtype=np.int64)
        runs = np.concatenate((starts, lengths)).astype(np.int64)
        ack = np.zeros(1, dtype=np.int64)
        requests = [self.comm.Isend(header, dst, tag), self.side.Isend(runs, dst, _runs_tag(seq)),
                    self.side.Irecv(ack, dst, _ack_tag(seq))]
        return CmaSendHandle(self, requests, (header, runs), ack, tensor, dst, index.size * _row_bytes(tensor))

    def irecv_rows(self, tensor: torch.Tensor, index: np.ndarray, src: int, tag: int) -> Handle:
        handle = CmaRecvHandle(self, tensor, index, src, tag)
        self._receiving = [h for h in self._receiving if h.pending()]
        self._receiving.append(handle)
        return handle

    def progress(self) -> None:
        """Drive this rank's pending receives. A send completes only once its receiver has
        copied, so a rank blocked on its own send while its peer is blocked on theirs would
        wait forever if neither copied what the other sent; MPI's progress engine does the
        same for its own rendezvous messages."""
        self._receiving = [h for h in self._receiving if h.pending()]
        for h in self._receiving:
            try:
                h.test()
            except Exception:  # noqa: BLE001 - kept in the handle; its owner's test/wait raises it
                pass


def _runs_tag(seq: int) -> int:
    # Runs go to the receiver and acks come back on one communicator; with even and odd
    # tags the runs of A's transfer k to B never meet the ack of B's transfer k to A.
    return 2 * seq


def _ack_tag(seq: int) -> int:
    return 2 * seq + 1


def _row_bytes(tensor: torch.Tensor) -> int:
    return tensor[0].nbytes if tensor.shape[0] else 0


class CmaSendHandle(Handle):
    """The sender's side: done when the receiver acks; the rows stay untouched till then."""

    def __init__(self, cma: CmaRows, requests: list[MPI.Request], keep: tuple, ack: np.ndarray,
                 tensor: torch.Tensor, dst: int, nbytes: int) -> None:
        self.cma = cma
        self.requests = requests
        self.keep: tuple | None = keep  # the header and runs buffers MPI reads from
        self.ack = ack
        self.tensor: torch.Tensor | None = tensor
        self.dst, self.nbytes = dst, nbytes
        self.done = False
        self.error: Exception | None = None

    def wait(self) -> None:
        while not self.test():
            self.cma.progress()

    def _finish(self) -> None:
        self.done, self.keep, self.tensor = True, None, None
        if int(self.ack[0]) != self.nbytes:
            self.error = RuntimeError(f"rank {self.dst} expected rows of another size than the {self.nbytes} "
                                      "bytes sent to it, and read none of them")

    def test(self) -> bool:
        if not self.done and MPI.Request.Testall(self.requests):
            self._finish()
        if self.error is not None:
            raise self.error
        return self.done


class CmaRecvHandle(Handle):
    """The receiver's side: header, then runs, then the copy and the ack."""

    def __init__(self, cma: CmaRows, tensor: torch.Tensor, index: np.ndarray, src: int, tag: int) -> None:
        self.cma, self.tensor, self.index, self.src = cma, tensor, index, src
        self.header = np.zeros(_HEADER, dtype=np.int64)
        self.request: MPI.Request | None = cma.comm.Irecv(self.header, src, tag)
        self.runs: np.ndarray | None = None
        self.ack = np.zeros(1, dtype=np.int64)
        self.ack_request: MPI.Request | None = None
        self.copied = False
        self.error: Exception | None = None

    def pending(self) -> bool:
        """Not yet copied (nor failed): the sender still waits on this rank."""
        return not self.copied and self.error is None

    def test(self) -> bool:
        while self.request is not None and self.request.Test():
            self._advance()
        return self._result(self.ack_request is not None and self.ack_request.Test())

    def wait(self) -> None:
        while self.request is not None:
            self.request.Wait()
            self._advance()
        self.ack_request.Wait()
        self._result(True)

    def _result(self, done: bool) -> bool:
        if self.error is not None:
            raise self.error
        return done

    def _advance(self) -> None:
        """The header has come: ask for the runs; the runs have come: copy, then ack."""
        seq, _address, _row, nruns = (int(x) for x in self.header)
        if self.runs is None:
            self.runs = np.zeros(2 * nruns, dtype=np.int64)
            self.request = self.cma.side.Irecv(self.runs, self.src, _runs_tag(seq))
            return
        self.request = None
        self.ack[0] = self._copy()
        self.copied = True
        self.ack_request = self.cma.side.Isend(self.ack, self.src, _ack_tag(seq))
        self.tensor = None

    def _copy(self) -> int:
        _seq, address, row_bytes, nruns = (int(x) for x in self.header)
        rows = _expand(self.runs[:nruns], self.runs[nruns:])
        mine = _row_bytes(self.tensor)
        if (rows.size, row_bytes) != (self.index.size, mine):
            self.error = RuntimeError(
                f"received {rows.size * row_bytes} bytes from rank {self.src} ({rows.size} rows of {row_bytes}) "
                f"into a buffer of {self.index.size * mine} ({self.index.size} rows of {mine}): the sender's "
                "rows have another size")
            return -1
        if not rows.size:
            return 0
        return read_rows(self.cma.pids[self.src], self.tensor.data_ptr(), self.index, address, rows, row_bytes)
