"""One configuration of ``perf.bench_tp`` under mpirun (not run by hand):

    mpirun -n K python -m perf.tp_throughput_job STORE MODE REQUESTS PROMPT_TOKENS MAX_TOKENS OUT

MODE ``tp``: the K ranks are one tensor-parallel instance (one TP rank per process, the
all-reduce over the MPI transport) serving all REQUESTS. MODE ``replicas``: the K ranks
are K independent tp = 1 engines, each serving its share. One torch thread per rank. After
a warm-up request, rank 0 writes the output tokens and the seconds from the common start
(a barrier) to the last rank's last token.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from mpi4py import MPI

from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from orchestrator.transport import make_transport


def generate(engine: LLMEngine, n: int, prompt_tokens: int, max_tokens: int, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        ids = torch.randint(8, engine.model.vocab_size, (prompt_tokens,), generator=g).tolist()
        reqs.append(engine.make_request(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        engine.add_request(reqs[-1])
    while engine.scheduler.has_work():
        engine.step()
    return sum(len(r.output_token_ids) for r in reqs)


def main() -> int:
    store, mode, requests, prompt_tokens, max_tokens, out = sys.argv[1:7]
    requests, prompt_tokens, max_tokens = int(requests), int(prompt_tokens), int(max_tokens)
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    transport = all_reduce = None
    if mode == "tp":
        transport = make_transport("mpi", comm)
        all_reduce = transport.all_reduce_group(range(comm.size))
        tp, rank, share = comm.size, comm.rank, requests
    else:
        tp, rank, share = 1, None, requests // comm.size + (comm.rank < requests % comm.size)
    cfg = EngineConfig(engine_dir=store, device="cpu", tp_size=tp, enable_prefix_caching=False,
                       max_num_seqs=max(requests, 1), kv_cache_memory=512 << 20)
    engine = LLMEngine(cfg, tp_rank=rank if tp > 1 else None, all_reduce=all_reduce)
    generate(engine, 1, prompt_tokens, 4, seed=99)  # warm-up
    comm.Barrier()
    t0 = time.perf_counter()
    tokens = generate(engine, share, prompt_tokens, max_tokens, seed=comm.rank if mode != "tp" else 0)
    seconds = comm.reduce(time.perf_counter() - t0, op=MPI.MAX, root=0)
    total = comm.reduce(tokens if mode != "tp" or comm.rank == 0 else 0, op=MPI.SUM, root=0)
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump({"tokens": total, "seconds": seconds}, f)
    if transport is not None:
        transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
