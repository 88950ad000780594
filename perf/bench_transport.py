"""Ping-pong latency and bandwidth of a tensor transport against raw mpi4py, on two ranks.

    mpirun -n 2 python -m perf.bench_transport [--sizes 4KiB,64KiB,1MiB,16MiB,64MiB] [--iters N]

For each message size, rank 0 sends to rank 1 and rank 1 sends it back, ``--iters`` times
in a row; half the round trip is one transfer. Raw mpi4py (``comm.Send``/``comm.Recv`` on a
numpy buffer) and the transport (``send``/``recv`` of a bfloat16 tensor sharing that buffer's
memory) alternate within each repetition, and rank 0 prints a Markdown table of medians
over ``--reps`` repetitions. ``--transport nccl`` (CUDA hosts) sends CUDA tensors through
NCCL instead, against raw mpi4py on host buffers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

from orchestrator.core.config import parse_bytes
from orchestrator.transport import Transport, make_transport

GiB = 1 << 30
TAG = 11


@dataclass(frozen=True)
class SizeResult:
    """Medians for one message size (latency = half a round trip)."""

    nbytes: int
    iters: int
    raw_us: float
    transport_us: float

    @property
    def raw_gib_s(self) -> float:
        return self.nbytes / (self.raw_us * 1e-6) / GiB

    @property
    def transport_gib_s(self) -> float:
        return self.nbytes / (self.transport_us * 1e-6) / GiB

    @property
    def ratio(self) -> float:
        """Transport latency over raw latency: 1.00 means no overhead."""
        return self.transport_us / self.raw_us


def auto_iters(nbytes: int) -> int:
    """Round trips per measurement: many for small messages, a few for large ones (~128 MiB each way)."""
    return max(3, min(1000, (128 << 20) // max(nbytes, 1)))


def pingpong(rank: int, send: Callable[[], None], recv: Callable[[], None], iters: int) -> float:
    """Seconds per half round trip, as rank 0 sees it (rank 1 echoes)."""
    t0 = time.perf_counter()
    for _ in range(iters):
        if rank == 0:
            send()
            recv()
        else:
            recv()
            send()
    return (time.perf_counter() - t0) / iters / 2


class Pair:
    """The two sides of one size: a host numpy buffer for raw MPI and a tensor for the transport."""

    def __init__(self, comm: MPI.Comm, transport: Transport, nbytes: int, device: torch.device) -> None:
        self.comm, self.transport, self.rank = comm, transport, comm.Get_rank()
        self.peer = 1 - self.rank
        self.buf = np.zeros(nbytes, dtype=np.uint8)
        if device.type == "cpu":  # the same memory, seen as a bfloat16 tensor (numpy has no bf16)
            self.tensor = torch.from_numpy(self.buf).view(torch.bfloat16)
        else:
            self.tensor = torch.zeros(nbytes, dtype=torch.uint8, device=device).view(torch.bfloat16)

    def raw_send(self) -> None:
        self.comm.Send([self.buf, MPI.BYTE], self.peer, TAG)

    def raw_recv(self) -> None:
        self.comm.Recv([self.buf, MPI.BYTE], self.peer, TAG)

    def t_send(self) -> None:
        self.transport.send(self.tensor, self.peer, TAG)

    def t_recv(self) -> None:
        self.transport.recv(self.tensor, self.peer, TAG)

    def check(self) -> None:
        """One round trip each way from zeroed buffers on rank 1: both paths deliver rank 0's bytes."""
        pattern = (np.arange(self.buf.size) % 251).astype(np.uint8)
        for send, recv, read in ((self.raw_send, self.raw_recv, lambda: self.buf),
                                 (self.t_send, self.t_recv, lambda: self.tensor.view(torch.uint8).cpu().numpy())):
            if self.rank == 0:
                self.buf[:] = pattern
                self.tensor.view(torch.uint8).copy_(torch.from_numpy(pattern))
            else:
                self.buf[:] = 0
                self.tensor.zero_()
            pingpong(self.rank, send, recv, 1)
            ok = self.comm.allreduce(bool(np.array_equal(read(), pattern)), op=MPI.LAND)
            if not ok:
                raise RuntimeError(f"{self.buf.size}-byte messages arrived corrupted")


def run_size(pair: Pair, iters: int, reps: int) -> SizeResult:
    raw, trans = [], []
    pair.check()  # also the warm-up
    for rep in range(reps):
        # Alternate which goes first, so neither always runs on a warmer cache.
        order = [("raw", pair.raw_send, pair.raw_recv), ("t", pair.t_send, pair.t_recv)]
        for name, send, recv in order if rep % 2 == 0 else order[::-1]:
            pair.comm.Barrier()
            (raw if name == "raw" else trans).append(pingpong(pair.rank, send, recv, iters))
    return SizeResult(pair.buf.size, iters, statistics.median(raw) * 1e6, statistics.median(trans) * 1e6)


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def table(results: list[SizeResult], name: str) -> str:
    lines = [f"| size | raw mpi4py µs | {name} µs | raw mpi4py GiB/s | {name} GiB/s | {name}/raw latency |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {format_size(r.nbytes)} | {r.raw_us:.1f} | {r.transport_us:.1f} | "
                     f"{r.raw_gib_s:.2f} | {r.transport_gib_s:.2f} | {r.ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mpirun -n 2 python -m perf.bench_transport",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB,64MiB", help="comma-separated message sizes")
    p.add_argument("--iters", type=int, default=None, help="round trips per measurement (default: by size)")
    p.add_argument("--reps", type=int, default=7, help="measurements per size and side; medians are shown")
    p.add_argument("--transport", choices=["mpi", "nccl"], default="mpi")
    p.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON (rank 0)")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        if comm.Get_rank() == 0:
            print("error: run on exactly two ranks (mpirun -n 2 ...)", file=sys.stderr)
        return 2
    if args.transport == "nccl" and not torch.cuda.is_available():
        if comm.Get_rank() == 0:
            print("error: --transport nccl needs CUDA devices", file=sys.stderr)
        return 2
    sizes = [parse_bytes(s) for s in args.sizes.split(",")]
    if any(s % 2 for s in sizes):
        p.error("sizes must be even (the transport side sends bfloat16 elements)")
    transport = make_transport(args.transport, comm, tags=(TAG,))
    device = getattr(transport, "device", torch.device("cpu"))
    results = []
    for nbytes in sizes:
        iters = args.iters or auto_iters(nbytes)
        results.append(run_size(Pair(comm, transport, nbytes, device), iters, args.reps))
    getattr(transport, "close", lambda: None)()  # not part of the Transport ABC
    if comm.Get_rank() == 0:
        host = MPI.Get_processor_name()
        print(f"{transport.name} transport ({device}) vs raw mpi4py, 2 ranks on {host}, "
              f"{MPI.Get_library_version().splitlines()[0].split(',')[0]}; "
              f"medians of {args.reps} x [{', '.join(str(r.iters) for r in results)}] round trips\n")
        print(table(results, transport.name))
        if args.json_out:
            rows = [{**asdict(r), "raw_gib_s": r.raw_gib_s, "transport_gib_s": r.transport_gib_s,
                     "ratio": r.ratio} for r in results]
            args.json_out.write_text(json.dumps({"transport": transport.name, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
