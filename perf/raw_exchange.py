"""Raw reference for the KV exchange: two ranks swap the same bytes at the same time.

    mpirun -n 2 python -m perf.raw_exchange --bytes 64MiB --messages 30

Each rank sends ``--bytes`` to the other while receiving as much, split into
``--messages`` messages (one per layer, as the exchange sends them), from and into
distinct buffers touched beforehand (KV pages are resident), with raw mpi4py
``Isend``/``Irecv``. Rank 0 prints the median aggregate GiB/s (bytes both ways / time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from mpi4py import MPI

from orchestrator.core.config import parse_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.raw_exchange", description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=parse_bytes, default=64 << 20, help="bytes each rank sends")
    p.add_argument("--messages", type=int, default=30)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    per = args.bytes // args.messages
    send = [np.ones(per, dtype=np.uint8) for _ in range(args.messages)]
    recv = [np.zeros(per, dtype=np.uint8) for _ in range(args.messages)]
    rates = []
    for _ in range(args.reps):
        comm.Barrier()
        t0 = time.perf_counter()
        reqs = []
        for s, r in zip(send, recv):
            reqs += [comm.Irecv(r, source=peer, tag=7), comm.Isend(s, dest=peer, tag=7)]
        MPI.Request.Waitall(reqs)
        comm.Barrier()
        rates.append(2 * per * args.messages / (time.perf_counter() - t0) / 2**30)
    if rank == 0:
        print(f"raw exchange: {2 * per * args.messages / 2**20:.1f} MiB both ways in {args.messages} messages "
              f"each way: {statistics.median(rates):.2f} GiB/s (median of {args.reps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
