"""One TP rank per MPI process: ``mpirun -n T python -m tests.engines.tp_mpi_job STORE
TRANSPORT PP OUT [cuda]`` (with ``cuda``, rank r runs on GPU r, in fp32). Every rank runs its shard of each of the PP stages over the same
requests (scheduled alike), summing through the transport's all-reduce; rank 0 saves the
greedy tokens and every step's logits to OUT (``torch.save``)."""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from orchestrator.transport import make_transport

PROMPTS = ["a short one", "a prompt of middling length, padded a bit more",
           "The quick brown fox jumps over the lazy dog, again and again.", "tiny"]


def run(engine: LLMEngine) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The prompts together under a small budget (chunked prefills mixed with decodes)."""
    logits, execute = [], engine.executor.execute

    def recording(step):
        out = execute(step)
        if out.logits is not None:
            logits.append(out.logits.clone())
        return out
    engine.executor.execute = recording
    reqs = [engine.make_request(p, SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    for r in reqs:
        engine.add_request(r)
    while engine.scheduler.has_work():
        engine.step()
    return [r.output_token_ids for r in reqs], logits


def config(store: str, tp: int, pp: int, device: str = "cpu") -> EngineConfig:
    return EngineConfig(engine_dir=store, device=device, dtype="float32", tp_size=tp, pp_size=pp, page_size=4,
                        max_num_batched_tokens=16, enable_prefix_caching=False)


def main() -> int:
    store, kind, pp, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    transport = make_transport(kind, comm)
    all_reduce = transport.all_reduce_group(range(comm.size))
    device = f"cuda:{comm.rank}" if sys.argv[5:] == ["cuda"] else "cpu"
    engine = LLMEngine(config(store, comm.size, pp, device), tp_rank=comm.rank, all_reduce=all_reduce)
    assert engine.executor.runners[0].cfg.num_attention_heads * comm.size == engine.model.num_attention_heads
    tokens, logits = run(engine)
    if comm.rank == 0:
        torch.save({"tokens": tokens, "logits": [x.cpu() for x in logits]}, out)
    transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
