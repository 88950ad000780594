"""Raw reference for the KV exchange: pairs of ranks swap the same bytes at the same time.

    mpirun -n 2 python -m perf.raw_exchange --bytes 64MiB --messages 30

Each rank sends ``--bytes`` to its peer (rank ^ 1: with 4 ranks, 0-1 and 2-3 swap at
once, as a TP2 pair's leaders and followers do in an exchange) while receiving as much,
split into ``--messages`` messages (one per layer, as the exchange sends them), from and
into distinct buffers touched beforehand (KV pages are resident), with raw mpi4py
``Isend``/``Irecv``. Rank 0 prints the median aggregate GiB/s (bytes sent by all ranks /
the time until the last one is done).
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
    if comm.Get_size() % 2:
        raise SystemExit("perf.raw_exchange pairs ranks: run it on an even number of ranks")
    rank, peer = comm.Get_rank(), comm.Get_rank() ^ 1
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
        total = comm.Get_size() * per * args.messages
        rates.append(total / (time.perf_counter() - t0) / 2**30)
    if rank == 0:
        print(f"raw exchange: {total / 2**20:.1f} MiB in all ({comm.Get_size() // 2} pairs, both ways), "
              f"{args.messages} messages each way: {statistics.median(rates):.2f} GiB/s (median of {args.reps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
