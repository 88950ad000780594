"""Dropping layers' weights really frees memory; loading them back restores identical outputs."""

from __future__ import annotations

import gc

import pytest
import torch

from build_scripts.sources.tiny import TinySpec
from engines.sampling import SamplingParams
from engines.weights import release_freed_memory
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from tests.conftest import build_tiny_store


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    # About 12.6 MB per layer: large enough that the resident-size change stands out.
    spec = TinySpec(num_layers=8, hidden_size=512, intermediate_size=1536, num_heads=8,
                    num_kv_heads=4, seed=5)
    return build_tiny_store(tmp_path_factory.mktemp("wide"), spec, splits=(1,))[1]


def generate(engine: LLMEngine) -> list[list[int]]:
    prompts = ["first prompt", "a second, longer prompt for the batch"]
    return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))]


def test_drop_half_the_layers_frees_their_memory_and_reload_restores_outputs(wide_store):
    engine = LLMEngine(EngineConfig(engine_dir=wide_store, device="cpu", kv_cache_memory=16 << 20))
    before_tokens = generate(engine)
    weights = engine.executor.runners[0].weights
    dropped = [1, 3, 5, 7]
    saved = {i: {k: v.clone() for k, v in weights.layers[i].views.items()} for i in dropped}
    expected = sum(weights.layers[i].nbytes for i in dropped)
    resident = weights.resident_bytes()

    gc.collect()
    release_freed_memory(torch.device("cpu"))  # so that only the drop moves the needle
    rss0 = rss_bytes()
    freed = weights.drop_layers(dropped)
    rss1 = rss_bytes()
    assert freed == expected
    assert weights.resident_bytes() == resident - expected
    # The process really gives the memory back: within 10% of the dropped bytes.
    assert abs((rss0 - rss1) - expected) < 0.1 * expected, (rss0 - rss1, expected)

    with pytest.raises(RuntimeError, match="layer 1 is not resident"):
        generate(engine)
    engine.scheduler.running.clear()  # the failed step's requests are abandoned

    weights.load_layers(saved)
    rss2 = rss_bytes()
    assert abs((rss2 - rss1) - expected) < 0.1 * expected, (rss2 - rss1, expected)
    assert generate(engine) == before_tokens


def test_drop_unknown_layer_is_an_error(tiny_store):
    engine = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu"))
    weights = engine.executor.runners[0].weights
    weights.drop_layers([0])
    with pytest.raises(KeyError, match="layer 0 is not resident"):
        weights.drop_layers([0])
    with pytest.raises(KeyError, match="does not exist"):
        weights.load_layers({99: weights.layers[1]})


def test_layer_buffer_is_one_allocation(tiny_store):
    engine = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu"))
    layer = engine.executor.runners[0].weights.layers[2]
    base = layer.flat.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == base for v in layer.views.values())
    assert layer.nbytes == layer.flat.numel() * layer.flat.element_size()
    assert torch.equal(layer.views["attention.dense.weight"], layer.o_w)
