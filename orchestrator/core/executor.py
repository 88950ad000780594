"""In-process executors: one stage runner, or the stages of a split chained in one process."""

from __future__ import annotations

from dataclasses import replace

import torch

from engines.kv_cache import KVPool
from engines.runner import StageRunner
from engines.step import StepInput, StepOutput
from engines.store import EngineStore


class PipelineExecutor:
    """Runs a step through the stages of a split, passing activations along.

    With one stage this is a plain replica. With several, each stage gets its own weights
    (loaded from its rank file, as a separate rank would) and the block-table rows of its
    layers; the stages share one KV pool because they share one process.
    """

    def __init__(self, store: EngineStore, pp_size: int, kv: KVPool,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.runners: list[StageRunner] = []
        for rank in range(pp_size):
            weights, layers = store.load_rank(pp_size, rank, device=device, dtype=dtype)
            self.runners.append(StageRunner(store.config, weights, layers, kv))

    def execute(self, step: StepInput) -> StepOutput:
        out = StepOutput()
        hidden = None
        for runner in self.runners:
            lr = runner.layer_range
            chunks = [replace(c, block_table=c.block_table[lr.start:lr.end]) for c in step.chunks]
            out = runner.execute(StepInput(chunks=chunks, hidden=hidden))
            hidden = out.hidden
        return out
