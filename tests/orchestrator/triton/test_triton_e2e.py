"""The cluster under ``mpirun -n 2`` behind the bundled tritonserver, through Triton's clients.

Every way in (tritonclient.grpc streaming with stream true and false, tritonclient.grpc
and tritonclient.http unary calls, HTTP ``generate_stream``) gives the single-process
engine's greedy tokens for many concurrent requests; bad input gets a Triton error naming
the problem and the next requests are served; a cancelled stream frees its KV; a dead
cluster takes Triton down with it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from perf.cluster_client import reference_completions, run
from tests.deps import require
from tests.mpi_util import requires_mpirun

require("tritonclient.grpc")
require("pytriton")  # the bundled tritonserver

from perf.triton_client import GenerateRequest, TritonCluster, generate_inputs, sse_generate, stream_generate  # noqa: E402

pytestmark = requires_mpirun

PROMPTS = [f"Question {i}: " + "tell me more about the weather " * (i % 3) for i in range(10)]
MAX_TOKENS = [3 + (5 * i) % 17 for i in range(10)]


@pytest.fixture(scope="module")
def expected(tiny_store):
    return reference_completions(tiny_store, PROMPTS, MAX_TOKENS, ignore_eos=False)


@pytest.fixture(scope="module")
def cluster(tiny_store):
    with TritonCluster(2, tiny_store) as c:
        yield c


def _requests(stream: bool) -> list[GenerateRequest]:
    return [GenerateRequest(f"r{i}", p, n, stream=stream) for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))]


def _assert_served(cluster) -> None:
    """One good request through Triton still works."""
    res = run(stream_generate(cluster.grpc_target, "kunserve", [GenerateRequest("ok", "hello", 4)], timeout_s=60))
    assert res["ok"].error is None and res["ok"].finished_s is not None and res["ok"].token_ids


def test_server_readiness_implies_every_served_model_is_ready(cluster):
    """Polled from the cluster's first healthy answer: Triton's /v2/health/ready never said
    ready while a served model was still loading (before the readiness gate it said ready
    about 2 s early, so a load balancer routed requests that failed with "unknown model")."""
    seen = cluster.readiness_seen
    assert seen[-1] == (True, True)
    assert (True, False) not in seen, seen
    assert (False, False) in seen or (False, True) in seen, "the polls never saw the server start"


@pytest.mark.parametrize("stream", [True, False])
def test_grpc_stream_matches_single_process_engine(cluster, expected, stream):
    results = run(stream_generate(cluster.grpc_target, "kunserve", _requests(stream), timeout_s=120))
    for i, want in enumerate(expected):
        r = results[f"r{i}"]
        assert r.error is None, r
        assert r.token_ids == want, (i, r)
        if stream:  # one response per generated chunk
            assert sum(r.token_counts) == len(want) and len(r.response_times_s) >= min(2, len(want))
        else:
            assert len(r.response_times_s) == 1
    assert cluster.wait_all_free()["queued"] == 0


def test_grpc_and_http_unary_clients_match(cluster, expected):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    def grpc_call(i):
        c = grpcclient.InferenceServerClient(cluster.grpc_target)
        r = c.infer("kunserve_unary", generate_inputs(grpcclient, PROMPTS[i], MAX_TOKENS[i], stream=False))
        return r.as_numpy("output_ids").reshape(-1).tolist()

    http = httpclient.InferenceServerClient(cluster.triton_url.removeprefix("http://"), concurrency=len(PROMPTS))
    pending = [http.async_infer("kunserve_unary", generate_inputs(httpclient, p, n, stream=False))
               for p, n in zip(PROMPTS, MAX_TOKENS)]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        grpc_ids = list(pool.map(grpc_call, range(len(PROMPTS))))
    http_ids = [p.get_result().as_numpy("output_ids").reshape(-1).tolist() for p in pending]
    assert grpc_ids == expected
    assert http_ids == expected


def test_http_generate_stream_matches(cluster, expected):
    async def all_requests():
        bodies = [{"text_input": p, "max_tokens": n, "stream": True} for p, n in zip(PROMPTS, MAX_TOKENS)]
        return await asyncio.gather(*(sse_generate(cluster.triton_url, "kunserve", b) for b in bodies))

    for (status, events), want in zip(run(all_requests()), expected):
        assert status == 200, events
        ids = [t for e in events for t in (e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]])]
        assert ids == want


def test_unary_generate_includes_the_prompt_unless_excluded(cluster, expected, tiny_store):
    from engines.store import EngineStore
    from engines.tokenizer import Tokenizer

    tok = Tokenizer(EngineStore(tiny_store).tokenizer_dir)
    body = {"text_input": PROMPTS[1], "max_tokens": MAX_TOKENS[1]}
    import json
    import urllib.request

    def generate(extra):
        req = urllib.request.Request(f"{cluster.triton_url}/v2/models/kunserve_unary/generate",
                                     data=json.dumps({**body, **extra}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    completion = tok.decode(expected[1])
    assert generate({"exclude_input_in_output": True})["text_output"] == completion
    assert generate({})["text_output"] == PROMPTS[1] + completion


def _generate_json(cluster, model: str, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{cluster.triton_url}/v2/models/{model}/generate",
                                 data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_return_log_probs_match_the_openai_routes_and_min_length_holds(cluster):
    body = {"text_input": PROMPTS[2], "max_tokens": 6, "return_log_probs": True, "exclude_input_in_output": True}
    status, out = _generate_json(cluster, "kunserve_unary", body)
    assert status == 200, out
    lps = out["output_log_probs"]
    assert len(lps) == len(out["output_ids"]) == 6 and all(v <= 0 for v in lps)
    assert out["cum_log_probs"] == pytest.approx(sum(lps), abs=1e-4)
    import json
    import urllib.request
    ref = urllib.request.Request(f"{cluster.url}/v1/completions", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({"prompt": PROMPTS[2], "max_tokens": 6,
                                                               "temperature": 0, "logprobs": 0}).encode())
    with urllib.request.urlopen(ref, timeout=60) as r:
        openai_lps = json.loads(r.read())["choices"][0]["logprobs"]["token_logprobs"]
    assert lps == pytest.approx(openai_lps, abs=1e-5)



def test_min_length_holds_back_an_end_token_that_embedding_bias_forces(cluster, tiny_store):
    from engines.store import EngineStore
    from engines.tokenizer import Tokenizer

    word = "e"  # one token of the tiny model's byte-level vocabulary
    (end,) = Tokenizer(EngineStore(tiny_store).tokenizer_dir).encode(word, add_special_tokens=False)
    body = {"text_input": "x", "max_tokens": 12, "end_id": end, "embedding_bias_words": [word],
            "embedding_bias_weights": [100.0], "exclude_input_in_output": True}
    status, forced = _generate_json(cluster, "kunserve_unary", body)
    assert status == 200 and forced["output_ids"] in (end, [end]), forced  # the bias makes it the first token
    # (Triton's generate endpoint writes a one-element tensor as a scalar)
    status, held = _generate_json(cluster, "kunserve_unary", {**body, "min_length": 5})
    assert status == 200, held
    assert len(held["output_ids"]) == 6 and held["output_ids"][-1] == end and end not in held["output_ids"][:5]


@pytest.mark.parametrize("extra,message", [
    ({"beam_width": 2}, "beam_width 2: beam search is not supported"),
    ({"return_generation_logits": True}, "return_generation_logits"),
    ({"len_penalty": 1.0}, "len_penalty"),
])
def test_tensorrt_llm_inputs_that_cannot_be_honoured_are_refused_by_name(cluster, extra, message):
    status, out = _generate_json(cluster, "kunserve_unary", {"text_input": "x", "max_tokens": 4, **extra})
    assert status == 400 and message in out["error"], out
    _assert_served(cluster)


@pytest.mark.parametrize("case,message", [
    ("missing_text_input", "text_input"),
    ("wrong_dtype", "data-type is 'FP32', but model 'kunserve' expects 'INT32'"),
    ("wrong_shape", "unexpected shape for input 'max_tokens'"),
    ("zero_max_tokens", "max_tokens must be at least 1, got 0"),
    ("huge_max_tokens", "maximum context length"),
    ("prompt_over_context", "maximum context length"),
    ("bad_utf8", "text_input is not valid UTF-8"),
    ("one_megabyte_prompt", "maximum context length"),
    ("stream_to_unary", "stream=true needs a decoupled model"),
])
def test_bad_input_gets_a_triton_error_and_serving_goes_on(cluster, case, message):
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    model, inputs = "kunserve", None
    if case == "missing_text_input":
        inputs = generate_inputs(grpcclient, "x", 4, False)[1:]
    elif case == "wrong_dtype":
        inputs = generate_inputs(grpcclient, "x", 4, False)
        inputs[1] = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
        inputs[1].set_data_from_numpy(np.array([[4]], np.float32))
    elif case == "wrong_shape":
        inputs = generate_inputs(grpcclient, "x", 4, False)
        inputs[1] = grpcclient.InferInput("max_tokens", [1, 2], "INT32")
        inputs[1].set_data_from_numpy(np.array([[4, 5]], np.int32))
    else:
        prompt, n = {"zero_max_tokens": ("x", 0), "huge_max_tokens": ("x", 10 ** 6),
                     "prompt_over_context": ("word " * 5000, 4), "bad_utf8": (b"ok \xff\xfe", 4),
                     "one_megabyte_prompt": ("a" * (1 << 20), 4), "stream_to_unary": ("x", 4)}[case]
        inputs = generate_inputs(grpcclient, prompt, n, case == "stream_to_unary")
        model = "kunserve_unary" if case == "stream_to_unary" else model
    client = grpcclient.InferenceServerClient(cluster.grpc_target)
    if model == "kunserve_unary":
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, inputs)
        assert message in str(err.value)
    else:
        error = _stream_once(client, model, inputs, expect_error=True)
        assert message in error
    _assert_served(cluster)


def _stream_once(client, model, inputs, expect_error=False):
    """One request over a gRPC stream; the error message (expect_error) or raise it."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(model, inputs)
        result, error = answers.get(timeout=60)
    finally:
        client.stop_stream()
    if error is not None and not expect_error:
        raise error
    assert error is not None, "expected an error response"
    return str(error)


def test_cancelled_stream_frees_its_kv_in_the_cluster(cluster):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(cluster.grpc_target)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("kunserve", generate_inputs(grpcclient, "a long story: " * 4, 400, True))
    result, error = answers.get(timeout=60)
    assert error is None  # tokens are flowing
    assert sum(r["kv_pages_used"] for r in cluster.state()["ranks"]) > 0
    client.stop_stream(cancel_requests=True)
    state = cluster.wait_all_free(timeout=15)
    assert all(r["kv_pages_used"] == 0 for r in state["ranks"]), state
    assert all(i["running"] == 0 for i in state["instances"]), state
    _assert_served(cluster)


def test_triton_metrics_carry_the_clusters(cluster):
    _assert_served(cluster)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = cluster.triton_metrics_text()
        if "kunserve_time_to_first_token_seconds_count" in text and "kunserve_kv_pages_total" in text:
            break
        time.sleep(0.5)  # the model mirrors the ingress's metrics once a second
    assert 'kunserve_kv_pages_total{rank="1"}' in text
    assert "nv_inference_request_success" in text  # Triton's own, same endpoint
    count = [ln for ln in text.splitlines() if ln.startswith("kunserve_time_to_first_token_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1


def _tritonserver_pids(port: int) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:]
            if "tritonserver" in line and f"--http-port {port}" in line and "stub" not in line]


def test_dead_cluster_makes_triton_unready_and_leaves_no_process(tiny_store):
    with TritonCluster(2, tiny_store, model_names="kunserve") as c:
        assert c.model_ready("kunserve") and _tritonserver_pids(c.triton_http)
        os.kill(c.rank_pids()[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while c.model_ready("kunserve") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not c.model_ready("kunserve")
        c.proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while _tritonserver_pids(c.triton_http) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _tritonserver_pids(c.triton_http) == []


def test_stopping_the_job_stops_tritonserver(tiny_store):
    c = TritonCluster(2, tiny_store, model_names="kunserve")
    with c:
        assert _tritonserver_pids(c.triton_http)
    deadline = time.monotonic() + 10
    while _tritonserver_pids(c.triton_http) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _tritonserver_pids(c.triton_http) == []
