"""In-process executors: one stage runner, or the stages of a split chained in one process,
each stage optionally a set of tensor-parallel ranks run by threads."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from engines.kv_cache import KVPool
from engines.runner import StageRunner
from engines.step import StepInput, StepOutput
from engines.store import EngineStore
from engines.tensor_parallel import ThreadGroup


class PipelineExecutor:
    """Runs a step through the stages of a split, passing activations along.

    With one stage this is a plain replica. With several, each stage gets its own weights
    (loaded from its rank file, as a separate rank would) and the block-table rows of its
    layers; the stages share one KV pool because they share one process. With tensor
    parallelism, a stage is ``tp_size`` runners over their shards, each with its own KV
    pool (``kv[tp_rank]``, its KV heads) and the same pages, run at once by threads that
    meet in an all-reduce (``ThreadGroup``); every rank ends with the same activations.
    """

    def __init__(self, store: EngineStore, pp_size: int, kv: KVPool | list[KVPool],
                 device: torch.device, dtype: torch.dtype, tp_size: int = 1, tp_rank: int | None = None,
                 all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """``tp_rank``: run only that TP rank of each stage, summing with ``all_reduce`` (a
        transport's, ``Transport.all_reduce_group``): one process of an SPMD job whose other
        processes run the other TP ranks on the same requests, scheduled alike."""
        pools = kv if isinstance(kv, list) else [kv]
        tp_ranks = range(tp_size) if tp_rank is None else [tp_rank]
        if len(pools) != len(tp_ranks):
            raise ValueError(f"{len(pools)} KV pools for {len(tp_ranks)} tensor-parallel ranks")
        if tp_rank is not None and tp_size > 1 and all_reduce is None:
            raise ValueError("one TP rank of several needs the all-reduce that joins it to the others")
        self.stages: list[list[StageRunner]] = []
        self.groups: list[ThreadGroup] = []
        for pp_rank in range(pp_size):
            group = ThreadGroup(tp_size) if tp_size > 1 and tp_rank is None else None
            stage = []
            for pool, r in zip(pools, tp_ranks):
                weights, layers = store.load_rank(pp_size, pp_rank * tp_size + r, device=device, dtype=dtype,
                                                  tp_size=tp_size)
                reducer = group.member(r) if group else (all_reduce if tp_size > 1 else None)
                stage.append(StageRunner(weights.cfg, weights, layers, pool, reducer))
            self.stages.append(stage)
            if group is not None:
                self.groups.append(group)
        self._threads = ThreadPoolExecutor(tp_size, thread_name_prefix="tp") if self.groups else None

    @property
    def runners(self) -> list[StageRunner]:
        """Each stage's first (tp rank 0) runner."""
        return [stage[0] for stage in self.stages]

    def execute(self, step: StepInput) -> StepOutput:
        out = StepOutput()
        hidden = None
        for stage, runner in zip(self.stages, self.runners):
            lr = runner.layer_range
            chunks = [replace(c, block_table=c.block_table[lr.start:lr.end]) for c in step.chunks]
            stage_input = StepInput(chunks=chunks, hidden=hidden)
            out = runner.execute(stage_input) if len(stage) == 1 else self._tensor_parallel(stage, stage_input)
            hidden = out.hidden
        return out

    def _tensor_parallel(self, stage: list[StageRunner], step: StepInput) -> StepOutput:
        """Every TP rank of ``stage`` on the step at once; rank 0's output (all are equal)."""
        futures = [self._threads.submit(self._run_rank, r, step) for r in stage]
        outs = [f.result() for f in futures]
        return outs[0]

    def _run_rank(self, runner: StageRunner, step: StepInput) -> StepOutput:
        try:
            return runner.execute(step)
        except BaseException:
            for group in self.groups:  # the other ranks wait in an all-reduce: release them
                group.abort()
            raise
