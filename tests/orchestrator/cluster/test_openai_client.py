"""The official ``openai`` client against a served two-stage group: log-probabilities
(against transformers), echo, n and seeds, best_of, prompt lists, penalties (against the
single-process engine), min_tokens, and errors as the client's exception types."""

from __future__ import annotations

import pytest
import torch

from engines.sampling import SamplingParams
from engines.store import EngineStore
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from perf.cluster_client import ServingCluster
from tests.deps import require
from tests.mpi_util import requires_mpirun

openai = require("openai")
transformers = require("transformers")

pytestmark = requires_mpirun

TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def cluster(tiny_store):
    # One two-stage group: log-probabilities travel from the last stage to the leader.
    with ServingCluster(2, tiny_store, "--groups", "0-1", device_memory="256MiB") as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def engine(tiny_store):
    return LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu", page_size=4))


def test_echo_logprobs_match_transformers(client, model, engine, tiny_llama):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama[0]), dtype=torch.float32).eval()
    prompt = engine.tokenizer.encode(TEXT)
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=5)
    choice = resp.choices[0]
    ids = prompt + choice.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) and choice.text.startswith(TEXT)
    for pos in range(1, len(ids)):
        assert abs(lp.token_logprobs[pos] - float(ref[pos - 1, ids[pos]])) < 1e-4, pos
        want = {engine.tokenizer.decode([t], skip_special_tokens=False) for t in torch.topk(ref[pos - 1], 5).indices}
        assert want <= set(lp.top_logprobs[pos]), pos
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_streamed_and_not(client, model):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [c for chunk in stream for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)
    assert "".join(c.token for c in streamed) == "".join(c.token for c in content)


def test_n_choices_each_draw_their_own_seeded_stream(client, model):
    body = dict(model=model, prompt=TEXT, max_tokens=8, temperature=1.0, seed=11)
    many = client.completions.create(n=3, **body)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [client.completions.create(**{**body, "seed": 11 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == alone
    assert len(set(alone)) > 1
    assert many.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in many.choices)


def test_a_list_of_prompts_answers_each_in_order(client, model, engine):
    prompts = [TEXT, engine.tokenizer.encode("Another prompt entirely"), "A third"]
    resp = client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in resp.choices] == list(range(6))
    for i, p in enumerate(prompts):
        single = client.completions.create(model=model, prompt=p, max_tokens=4, temperature=0).choices[0].text
        assert resp.choices[2 * i].text == resp.choices[2 * i + 1].text == single


def test_best_of_returns_the_generation_with_the_best_mean_logprob(client, model):
    body = dict(model=model, prompt=TEXT, max_tokens=6, temperature=1.0, seed=3, logprobs=0)
    best = client.completions.create(best_of=3, **body).choices
    assert len(best) == 1
    each = [client.completions.create(**{**body, "seed": 3 + i}).choices[0] for i in range(3)]
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in each]
    assert best[0].text == each[means.index(max(means))].text


def test_penalties_give_the_single_process_engines_tokens(client, model, engine):
    params = dict(presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4)
    resp = client.completions.create(model=model, prompt=TEXT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True, "repetition_penalty": 1.4},
                                     presence_penalty=0.8, frequency_penalty=0.6)
    ref = engine.generate([TEXT], SamplingParams(max_tokens=12, ignore_eos=True, **params))[0]
    plain = engine.generate([TEXT], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert resp.choices[0].model_extra["token_ids"] == ref.token_ids
    assert ref.token_ids != plain.token_ids  # the penalties changed the answer


def test_min_tokens_holds_back_an_eos_that_logit_bias_forces(client, model, tiny_store):
    eos = EngineStore(tiny_store).config.eos_token_ids[0]
    body = dict(model=model, prompt=TEXT, max_tokens=12, temperature=0, logit_bias={str(eos): 100})
    forced = client.completions.create(**body)
    assert forced.usage.completion_tokens == 1 and forced.choices[0].finish_reason == "stop"
    held = client.completions.create(**body, extra_body={"min_tokens": 5})
    ids = held.choices[0].model_extra["token_ids"]
    assert len(ids) == 6 and ids[-1] == eos and eos not in ids[:5] and held.choices[0].finish_reason == "stop"


def test_errors_surface_as_the_clients_exception_types(client, model):
    with pytest.raises(openai.BadRequestError, match="beam_width"):
        client.completions.create(model=model, prompt="x", max_tokens=2, extra_body={"beam_width": 2})
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=model, prompt="x", max_tokens=2, suffix="y")
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    ok = client.completions.create(model=model, prompt="x", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_streamed_completions_with_n_carry_each_choices_logprobs(client, model):
    body = dict(model=model, prompt=TEXT, max_tokens=5, temperature=0, logprobs=2)
    whole = client.completions.create(**body).choices[0]
    stream = client.completions.create(n=2, stream=True, **body)
    text, lps = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in stream:
        for ch in chunk.choices:
            text[ch.index] += ch.text
            if ch.logprobs:
                lps[ch.index].extend(ch.logprobs.token_logprobs)
    assert text[0] == text[1] == whole.text  # greedy: both choices are the same answer
    assert lps[0] == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6) == lps[1]
