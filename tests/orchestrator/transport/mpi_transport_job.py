"""Multi-rank job for test_transport.py: a transport moves tensors bit-exactly both ways.

    mpirun -n 2 python -m tests.orchestrator.transport.mpi_transport_job [--kind nccl]

The default checks MpiTransport (CPU); ``--kind nccl`` checks NcclTransport on two GPUs;
``--kind gloo`` runs the same checks on its code over gloo (CPU tensors): FIFO per
channel, rows, two traffic classes posted in opposite orders on one pair, an unknown tag;
``--kind gloo-pairs`` (any number of ranks) moves a tensor both ways between every pair
on every channel and prints the warm-up's cost; ``--kind mpi-cuda`` checks MpiTransport
with CUDA tensors of two ranks sharing GPU 0.

Each rank regenerates the other's tensors from a seed, so the receiver checks every byte
without a second transfer. Exits 0 when all checks pass; on any failure it prints the
traceback and aborts the whole job (so the peer cannot hang in a receive).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch
from mpi4py import MPI

from orchestrator.transport import TENSOR_TAGS, Handle, Transport, make_transport
from orchestrator.transport.mpi import MpiHandle, MpiTransport

SEED = 20251121
CASES: list[tuple[torch.dtype, tuple[int, ...]]] = [
    (torch.float32, (3, 5)),
    (torch.float32, ()),
    (torch.float32, (256, 1024)),  # 1 MiB
    (torch.bfloat16, (7, 13)),
    (torch.bfloat16, (2, 3, 64)),
    (torch.int64, (17,)),
    (torch.int64, (0, 4)),
    (torch.int64, (4, 33, 3)),
]


def payload(sender: int, case: int) -> torch.Tensor:
    """The tensor ``sender`` sends for ``case``: deterministic, with NaN/inf bit patterns in floats."""
    dtype, shape = CASES[case]
    gen = torch.Generator().manual_seed(SEED + 1000 * sender + case)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen).to(dtype)
        flat = t.view(-1)
        specials = [float("nan"), float("inf"), float("-inf"), -0.0]
        flat[: min(len(specials), flat.numel())] = torch.tensor(specials[: flat.numel()], dtype=dtype)
        return t
    return torch.randint(-(2**62), 2**62, shape, generator=gen, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def exchange(transport: MpiTransport, label: str) -> None:
    """Every case both ways at once, all outstanding together, distinct tags, receives posted reversed."""
    peer = 1 - transport.rank
    outs = {i: torch.full(shape, 7, dtype=dtype) for i, (dtype, shape) in enumerate(CASES)}
    recvs = {i: transport.irecv(outs[i], peer, tag=100 + i) for i in reversed(range(len(CASES)))}
    sends = [transport.isend(payload(transport.rank, i), peer, tag=100 + i) for i in range(len(CASES))]
    pending: list[MpiHandle] = [*recvs.values(), *sends]
    deadline = time.monotonic() + 60
    while pending:  # test() must make progress on its own, without wait()
        pending = [h for h in pending if not h.test()]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: {len(pending)} transfers never completed")
    for i, out in outs.items():
        expected = payload(peer, i)
        if not same_bits(out, expected):
            raise AssertionError(f"{label}: case {i} {CASES[i]} differs from what rank {peer} sent")
        if recvs[i].tensor is not None:
            raise AssertionError(f"{label}: a completed handle still holds its tensor")


def exchange_fifo(transport: Transport, device: torch.device, tag: int = TENSOR_TAGS[0]) -> None:
    """Every case both ways on one tag, for a tagless transport: the pair posts in matching
    FIFO order, and a channel delivers in that order.

    Rank 0 sends everything, then receives; rank 1 receives, then sends. (If both received
    first, each rank's in-order stream would wait for the other: a deadlock, not a bug.)
    """
    rank = transport.rank
    peer = 1 - rank
    outs = [torch.full(shape, 7, dtype=dtype, device=device) for dtype, shape in CASES]

    def sends() -> list[Handle]:
        return [transport.isend(payload(rank, i).to(device), peer, tag) for i in range(len(CASES))]

    def recvs() -> list[Handle]:
        return [transport.irecv(out, peer, tag) for out in outs]

    handles = sends() + recvs() if rank == 0 else recvs() + sends()
    for h in handles:
        h.wait()
    for i, out in enumerate(outs):
        if not same_bits(out.cpu(), payload(peer, i)):
            raise AssertionError(f"{transport.name}: case {i} {CASES[i]} differs from what rank {peer} sent")


def rows_exchange(transport: MpiTransport) -> None:
    """Scattered rows of a pool both ways at once, as the KV exchange moves pages: each rank's
    rows land in the peer's named rows, bit-exact, and no other row changes."""
    rank, peer = transport.rank, 1 - transport.rank
    pools = [payload(r, 2).view(64, 4, 1024).clone() for r in (0, 1)]  # 1 MiB: 64 rows of 16 KiB
    sent_rows = [[3, 4, 5, 40, 2, 63, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7]]
    landing_rows = [[8, 9, 30, 31, 32, 33, 0, 1], [63, 20, 21, 22, 50, 51, 52, 12]]  # where the peer's go
    mine = pools[rank].clone()
    recv = transport.irecv_rows(mine, landing_rows[peer], peer, tag=30)
    send = transport.isend_rows(pools[rank], sent_rows[rank], peer, tag=30)
    send.wait()
    recv.wait()
    expected = pools[rank].clone()
    expected[landing_rows[peer]] = pools[peer][sent_rows[peer]]
    if not same_bits(mine, expected):
        raise AssertionError("rows: the pool after the exchange differs from the expected one")


def rows_fifo(transport: Transport, device: torch.device, tag: int = TENSOR_TAGS[1]) -> None:
    """Scattered rows both ways, as the KV exchange moves pages, over a tagless transport
    (the base class's gather and scatter); rank 0 sends first, rank 1 receives first."""
    rank, peer = transport.rank, 1 - transport.rank
    pools = [payload(r, 2).view(64, 4, 1024).clone().to(device) for r in (0, 1)]
    sent_rows = [[3, 4, 5, 40, 2, 63, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7]]
    landing_rows = [[8, 9, 30, 31, 32, 33, 0, 1], [63, 20, 21, 22, 50, 51, 52, 12]]
    mine = pools[rank].clone()

    def send() -> Handle:
        return transport.isend_rows(pools[rank], sent_rows[rank], peer, tag)

    def recv() -> Handle:
        return transport.irecv_rows(mine, landing_rows[peer], peer, tag)

    handles = [send(), recv()] if rank == 0 else [recv(), send()]
    for h in handles:
        h.wait()
    expected = pools[rank].clone()
    expected[landing_rows[peer]] = pools[peer][sent_rows[peer]]
    if not same_bits(mine.cpu(), expected.cpu()):
        raise AssertionError(f"{transport.name} rows: the pool after the exchange differs from the expected one")


def classes_interleaved(transport: Transport, device: torch.device) -> None:
    """Two traffic classes on one pair, posted in opposite orders on the two sides.

    Rank 0 sends activations and KV alternately (A0 B0 A1 B1 A2 B2, A on ``tags[0]``, B on
    ``tags[1]``); rank 1 posts every B receive first, then the A ones, and waits for the Bs
    first, as a rank whose exchange turn comes before its next micro-batch would. Each
    receive must hold its own message. Were both classes one tagless stream, B0's receive
    would take A0's bytes (or, on NCCL, hang).
    """
    a_tag, b_tag = transport.tags[:2]
    shape = (3, 257)  # the same shape for both, so a mix-up shows as wrong bytes, not a size error

    def message(cls: int, i: int) -> torch.Tensor:
        return torch.full(shape, 1000 * cls + i, dtype=torch.float32, device=device)

    if transport.rank == 0:
        handles = [transport.isend(message(c, i), 1, (a_tag, b_tag)[c]) for i in range(3) for c in (0, 1)]
        for h in handles:
            h.wait()
    elif transport.rank == 1:
        outs = {(c, i): torch.zeros(shape, device=device) for c in (1, 0) for i in range(3)}
        handles = {key: transport.irecv(out, 0, (a_tag, b_tag)[key[0]]) for key, out in outs.items()}
        for h in handles.values():  # Bs first
            h.wait()
        for (c, i), out in outs.items():
            if not torch.equal(out, message(c, i)):
                raise AssertionError(f"{transport.name}: the receive for class {'AB'[c]} message {i} holds "
                                     f"{out.view(-1)[0].item():g}, not {1000 * c + i}: the classes got mixed up")


def unknown_tag_raises(transport: Transport, device: torch.device) -> None:
    """A tag without a channel raises at once, on either side, instead of sharing one."""
    peer = 1 - transport.rank
    for post in (transport.isend, transport.irecv):
        try:
            post(torch.zeros(2, device=device), peer, 12345)
        except ValueError as e:
            if "tag 12345 has no channel" not in str(e):
                raise AssertionError(f"unexpected message: {e}") from e
        else:
            raise AssertionError("a tag without a channel was accepted")


def check_tagless(transport: Transport, device: torch.device) -> None:
    """The nccl transport's checks (also run over gloo, on CPU tensors)."""
    if transport.tags != tuple(sorted(TENSOR_TAGS)):
        raise AssertionError(f"channels for {transport.tags}, expected the cluster's tags {TENSOR_TAGS}")
    exchange_fifo(transport, device)
    rows_fifo(transport, device)
    classes_interleaved(transport, device)
    unknown_tag_raises(transport, device)


def every_pair_every_channel(transport: Transport) -> None:
    """Each rank sends a distinct tensor to every other rank on every channel and receives
    theirs; partners post their channels in opposite orders (even ranks forward, odd ones
    backward); on each channel the lower rank of a pair sends first, as NCCL needs."""
    rank, size, tags = transport.rank, transport.size, transport.tags

    def message(src: int, dst: int, tag: int) -> torch.Tensor:
        return torch.full((5, 7), src * 10000 + dst * 100 + tag, dtype=torch.int64)

    outs, handles = {}, []
    for tag in tags if rank % 2 == 0 else tuple(reversed(tags)):
        for peer in (p for p in range(size) if p != rank):
            out = outs[peer, tag] = torch.zeros((5, 7), dtype=torch.int64)
            for sends in (rank < peer, rank > peer):
                handles.append(transport.isend(message(rank, peer, tag), peer, tag) if sends
                               else transport.irecv(out, peer, tag))
    deadline = time.monotonic() + 60
    while handles:  # by test() alone: gloo's handles must report completion without wait()
        handles = [h for h in handles if not h.test()]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(handles)} transfers never completed")
    for (peer, tag), out in outs.items():
        if not torch.equal(out, message(peer, rank, tag)):
            raise AssertionError(f"rank {rank}: from rank {peer} on tag {tag} got {out[0, 0].item()}")


def check_gloo_pairs(comm: MPI.Comm) -> None:
    """Every pair on every channel over gloo, and the warm-up's cost (printed by rank 0)."""
    transport = make_transport("gloo", comm)
    every_pair_every_channel(transport)
    slowest = comm.reduce(transport.warm_up_s, op=MPI.MAX, root=0)
    if transport.rank == 0:
        pairs = transport.size * (transport.size - 1) // 2
        print(f"warm-up: {transport.size} ranks, {pairs} pairs x {len(transport.tags)} channels "
              f"in {slowest * 1e3:.1f} ms (slowest rank)", flush=True)
    transport.close()


def comm_isolation(transport: MpiTransport, comm: MPI.Comm) -> None:
    """A tensor and a control message with the same tag do not match each other's receives."""
    if transport.rank == 0:
        comm.send({"kind": "control"}, dest=1, tag=5)
        transport.send(torch.arange(4, dtype=torch.int64), dst=1, tag=5)
    else:
        out = transport.recv(torch.zeros(4, dtype=torch.int64), src=0, tag=5)
        if comm.recv(source=0, tag=5) != {"kind": "control"} or out.tolist() != [0, 1, 2, 3]:
            raise AssertionError("control and tensor messages got mixed up")


def size_mismatch(transport: MpiTransport) -> None:
    """A message shorter than the receive buffer is reported, not silently half-filled."""
    if transport.rank == 0:
        transport.send(torch.ones(10), dst=1, tag=9)
        return
    handle = transport.irecv(torch.zeros(16), src=0, tag=9)
    try:
        handle.wait()
    except RuntimeError as e:
        if "received 40 bytes" not in str(e) or "buffer of 64" not in str(e):
            raise AssertionError(f"unexpected message: {e}") from e
    else:
        raise AssertionError("a short message went unnoticed")


def check_mpi(comm: MPI.Comm) -> None:
    """The CPU transport: outstanding transfers, chunking, isolation from ``comm``, size checks."""
    transport = make_transport("mpi", comm)
    exchange(transport, "default")
    rows_exchange(transport)  # by cross-memory attach where this host allows it
    if transport.rank == 0:
        print(f"rows by cross-memory attach: {transport.cma.can_read}", flush=True)
    comm_isolation(transport, comm)
    size_mismatch(transport)
    transport.close()
    # Tiny chunks: 1 MiB becomes 1024 messages, odd sizes end in a partial chunk.
    chunked = MpiTransport(comm, max_chunk_bytes=1024)
    exchange(chunked, "chunked")
    chunked.close()
    # The rows again through MPI datatypes, three rows per message.
    rows_chunked = MpiTransport(comm, max_chunk_bytes=3 * 16 << 10, cma=False)
    rows_exchange(rows_chunked)
    rows_chunked.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mpi_transport_job")
    p.add_argument("--kind", choices=["mpi", "nccl", "gloo", "gloo-pairs", "mpi-cuda"], default="mpi")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2 and args.kind != "gloo-pairs":
        print("run with mpirun -n 2", file=sys.stderr)
        return 2
    try:
        if args.kind in ("nccl", "gloo"):
            tagless = make_transport(args.kind, comm)
            check_tagless(tagless, tagless.device)
            tagless.close()
        elif args.kind == "gloo-pairs":
            check_gloo_pairs(comm)
        elif args.kind == "mpi-cuda":  # two ranks sharing one GPU: staged through host memory
            staged = make_transport("mpi", comm)
            exchange_fifo(staged, torch.device("cuda", 0))
            staged.close()
        else:
            check_mpi(comm)
        comm.Barrier()
    except BaseException:
        print(f"rank {comm.Get_rank()} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        comm.Abort(1)
    if comm.Get_rank() == 0:
        print(f"{args.kind} transport job: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
