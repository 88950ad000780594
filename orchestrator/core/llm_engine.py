"""The single-instance engine loop: schedule -> execute -> update.

Used by offline generation and as the reference the distributed runs are checked against.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass

from engines.errors import RequestError
from engines.kv_cache import KVPool
from engines.sampling import SamplingParams
from engines.store import EngineStore
from engines.tensor_parallel import shard_config
from engines.tokenizer import Tokenizer
from orchestrator.core.block_manager import BlockManager
from orchestrator.core.config import EngineConfig
from orchestrator.core.executor import PipelineExecutor
from orchestrator.core.request import Request
from orchestrator.core.scheduler import Scheduler, SchedulerConfig
from orchestrator.core.swap import DEFAULT_SWAP_SPACE, HostSwapSpace

PREEMPTION_MODES = ("recompute", "swap")

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None = None


class LLMEngine:
    """Loads a store's split, sizes the KV pool, and runs requests to completion."""

    def __init__(self, config: EngineConfig, preemption_mode: str = "recompute",
                 swap_space_bytes: int = DEFAULT_SWAP_SPACE, tp_rank: int | None = None,
                 all_reduce=None) -> None:
        """``preemption_mode``: ``recompute`` drops a preempted request's KV; ``swap`` keeps
        it in ``swap_space_bytes`` of host memory (``self.swap_space``) until it returns.
        ``tp_rank``/``all_reduce``: this process runs only that TP rank of ``config.tp_size``
        (an SPMD job: every process adds the same requests and schedules them alike)."""
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"unknown preemption_mode {preemption_mode!r}; "
                             f"expected one of {', '.join(PREEMPTION_MODES)}")
        self.config = config
        self.store = EngineStore(config.engine_dir)
        self.model = self.store.config
        self.tokenizer = Tokenizer(self.store.tokenizer_dir)
        device = config.torch_device()
        dtype = config.torch_dtype(self.model.torch_dtype)
        if config.tp_size > 1 and preemption_mode == "swap":
            raise ValueError("swap preemption needs the KV on one rank; it cannot run with tp_size > 1")
        shard = shard_config(self.model, config.tp_size)  # what each TP rank holds of the KV
        page_bytes = KVPool.page_nbytes(shard, config.page_size, dtype)
        num_pages = config.kv_cache_memory // page_bytes
        if num_pages < self.model.num_hidden_layers:
            raise ValueError(f"kv_cache_memory of {config.kv_cache_memory} bytes holds {num_pages} "
                             f"pages, fewer than one per layer ({self.model.num_hidden_layers})")
        local = 1 if tp_rank is not None else config.tp_size
        pools = [KVPool(shard, num_pages, config.page_size, dtype, device) for _ in range(local)]
        self.kv = pools[0]
        self.executor = PipelineExecutor(self.store, config.pp_size, pools, device, dtype, config.tp_size,
                                         tp_rank=tp_rank, all_reduce=all_reduce)
        self.swap_space = HostSwapSpace(self.kv, swap_space_bytes) if preemption_mode == "swap" else None
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs),
            BlockManager.single(num_pages, config.page_size, self.model.num_hidden_layers,
                                config.enable_prefix_caching),
            eos_token_ids=self.model.eos_token_ids, swapper=self.swap_space)
        self._ids = itertools.count()
        logger.info("engine ready: %s, tp=%d pp=%d, %s %s, %d KV pages of %d tokens",
                    self.store.path, config.tp_size, config.pp_size, device, dtype, num_pages, config.page_size)

    @property
    def max_model_len(self) -> int:
        return self.model.max_position_embeddings

    def make_request(self, prompt: str | list[int], sampling: SamplingParams,
                     request_id: str | None = None, add_special_tokens: bool = True) -> Request:
        """Tokenize and validate a prompt into a request (not yet queued).

        ``add_special_tokens=False`` for prompts that already carry them (chat templates).
        """
        if isinstance(prompt, str) and not prompt:
            raise RequestError("prompt is empty")
        ids = (self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
               if isinstance(prompt, str) else list(prompt))
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is "
                               f"{self.max_model_len} tokens, leaving no room to generate")
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                               f"(size {self.model.vocab_size})")
        if sampling.seed is None and not sampling.greedy:
            sampling = SamplingParams(**{**sampling.__dict__, "seed": random.getrandbits(31)})
        return Request(request_id or f"req-{next(self._ids)}", ids, sampling, self.max_model_len)

    def add_request(self, req: Request) -> None:
        self.scheduler.add(req)

    def step(self) -> list[Request]:
        """Run one scheduling step; return the requests that finished in it."""
        sched = self.scheduler.schedule()
        aborted = [r for r in sched.preempted if r.status.finished]
        if not sched.chunks:
            return aborted
        result = self.executor.execute(sched.to_step())
        return aborted + self.scheduler.update(sched, result)

    def generate(self, prompts: list[str | list[int]],
                 sampling: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run all prompts to completion with continuous batching; results in input order."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        reqs = [self.make_request(p, s) for p, s in zip(prompts, params)]
        for r in reqs:
            self.add_request(r)
        while self.scheduler.has_work():
            self.step()
        return [self.completion(r) for r in reqs]

    def completion(self, req: Request) -> Completion:
        return Completion(req.request_id, req.prompt_token_ids, list(req.output_token_ids),
                          self.tokenizer.decode(req.output_token_ids),
                          req.status.finish_reason, req.error)
