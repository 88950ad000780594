"""The step cost model: its formula, the least-squares fit, and its JSON file."""

from __future__ import annotations

import json
import random

import pytest

from orchestrator.kunserve.cost_model import CostModel, CostModelError, attention_work, fit

TRUE = dict(fixed_s=0.05, per_token_s=1.1e-3, per_attention_s=2.2e-6, per_seq_s=4e-3)


def grid() -> list[list[tuple[int, int]]]:
    """Steps shaped like the profiler's grid: prefills, decode batches, mixed steps."""
    steps = [[(n, s)] for n in (16, 64, 128, 256, 512) for s in (0, 256, 1024, 2048)]
    steps += [[(1, c - 1)] * b for b in (1, 8, 32) for c in (128, 1024)]
    steps += [[(128, 0)] + [(1, 127)] * 8, [(256, 1024)] + [(1, 1023)] * 8, [(32, 0)] * 4 + [(1, 255)] * 16]
    return steps


def noisy_samples(model: CostModel, noise: float, seed: int = 0):
    rng = random.Random(seed)
    return [(step, model.step_cost(step) * (1 + rng.gauss(0, noise))) for step in grid()]


def test_costs_follow_the_formula():
    m = CostModel(**TRUE, layers=30)
    assert attention_work(4, 10) == 4 * 10 + 10
    assert m.chunk_cost(4, 10) == pytest.approx(4e-3 + 4 * 1.1e-3 + 50 * 2.2e-6)
    step = [(4, 10), (1, 99)]
    expected = 0.05 + m.chunk_cost(4, 10) + m.chunk_cost(1, 99)
    assert m.step_cost(step) == pytest.approx(expected)
    assert m.step_cost(step, layers=15) == pytest.approx(expected / 2)
    assert m.step_cost([]) == 0.0


def test_splitting_a_prefill_keeps_its_attention_work():
    # The lookahead planner relies on this: only per_seq_s is added per extra chunk.
    assert attention_work(300, 20) == attention_work(100, 20) + attention_work(200, 120)


def test_fit_recovers_known_coefficients_under_noise():
    truth = CostModel(**TRUE, layers=30)
    model = fit(noisy_samples(truth, noise=0.02), layers=30, host="h", threads=1)
    for name, value in TRUE.items():
        assert getattr(model, name) == pytest.approx(value, rel=0.15), name
    assert model.r2 > 0.99
    assert model.samples == len(grid()) and model.layers == 30 and model.host == "h"


def test_fit_is_exact_without_noise():
    truth = CostModel(**TRUE, layers=4)
    model = fit(noisy_samples(truth, noise=0.0), layers=4)
    for name, value in TRUE.items():
        assert getattr(model, name) == pytest.approx(value, rel=1e-6), name
    assert model.r2 == pytest.approx(1.0)


def test_fit_clips_negative_coefficients_and_refits_the_rest():
    truth = CostModel(**{**TRUE, "per_seq_s": 0.0}, layers=30)
    samples = [(step, t - 1e-3 * len(step)) for step, t in noisy_samples(truth, 0.0)]
    model = fit(samples, layers=30)  # the data say per_seq_s < 0: it is pinned at 0
    assert model.per_seq_s == 0.0
    assert all(getattr(model, k) >= 0 for k in TRUE)
    assert model.per_token_s > 0 and model.per_attention_s > 0


def test_fit_rejects_unusable_samples():
    with pytest.raises(CostModelError, match="at least 4"):
        fit([([(1, 1)], 0.1)] * 3, layers=1)
    with pytest.raises(CostModelError, match="positive"):
        fit([([(n, 0)], 0.0) for n in range(1, 6)], layers=1)


def test_save_load_round_trip(tmp_path):
    model = fit(noisy_samples(CostModel(**TRUE, layers=30), 0.01), layers=30, host="vm: cpu",
                dtype="float32", threads=1, model="smollm2")
    path = tmp_path / "cm.json"
    model.save(path)
    assert CostModel.load(path) == model
    assert json.loads(path.read_text())["format_version"] == 1


@pytest.mark.parametrize("content, words", [
    ("{not json", "is corrupt"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format_version": 1, "fixed_s": 0.1}', "missing field 'per_token_s'"),
    ('{"format_version": 9, "fixed_s": 0.1}', "format_version"),
    ('{"format_version": 1, "fixed_s": -1, "per_token_s": 0, "per_attention_s": 0, '
     '"per_seq_s": 0, "layers": 2}', "fixed_s must be"),
    ('{"format_version": 1, "fixed_s": 1, "per_token_s": 0, "per_attention_s": 0, '
     '"per_seq_s": 0, "layers": 0}', "layers must be"),
])
def test_corrupt_file_is_named_in_the_error(tmp_path, content, words):
    path = tmp_path / "cm.json"
    path.write_text(content)
    with pytest.raises(CostModelError) as err:
        CostModel.load(path)
    assert f"cost model file {path} is corrupt" in str(err.value)
    assert words in str(err.value)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(CostModelError, match="missing.*perf.profile_cost"):
        CostModel.load(tmp_path / "none.json")
