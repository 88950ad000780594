"""``serve --request-log``: a line per admitted request, on both routes, however it ended."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.ingress.request_log import read_request_log
from orchestrator.ingress.server import IngressServer
from orchestrator.triton.relay_client import RelayClient
from tests.orchestrator.ingress.http_client import call, sse
from tests.orchestrator.ingress.test_relay import Frames, until


@pytest.fixture
def logged(backend, tmp_path: Path):
    log = tmp_path / "requests.jsonl"
    srv = IngressServer(backend, host="127.0.0.1", port=0, shutdown_timeout=0.5,
                        relay_socket=tmp_path / "relay.sock", request_log=log)
    srv.start()
    try:
        yield srv, log
    finally:
        srv.stop()


def test_http_and_relay_requests_are_logged_with_their_timeline(logged, tmp_path):
    srv, log = logged
    before = time.monotonic()
    status, _ = sse(srv.url + "/v1/completions", {"prompt": "hello", "max_tokens": 3, "stream": True})
    assert status == 200
    client = RelayClient(str(tmp_path / "relay.sock"))
    frames = Frames()
    client.submit({"prompt": "hey", "max_tokens": 2, "stream": True}, frames)
    frames.wait()
    client.close()
    until(lambda: len(read_request_log(log)) == 2, "two records")

    http, relay = read_request_log(log)
    assert http["route"] == "http" and http["id"].startswith("cmpl-")
    assert relay["route"] == "triton" and relay["id"].startswith("trt-")
    for rec, tokens in ((http, 3), (relay, 2)):
        assert before <= rec["arrival"] <= rec["first_token"] <= rec["end"] <= time.monotonic()
        assert rec["ttft_ms"] == pytest.approx((rec["first_token"] - rec["arrival"]) * 1e3, abs=1e-3)
        assert rec["output_tokens"] == tokens and rec["finish_reason"] == "length"
        assert rec["prompt_tokens"] > 0


def test_an_abandoned_request_is_logged_as_aborted(logged, backend, tmp_path):
    srv, log = logged
    backend.stall_after = 1
    client = RelayClient(str(tmp_path / "relay.sock"))
    frames = Frames()
    rid = client.submit({"prompt": "hello", "max_tokens": 5, "stream": True}, frames)
    until(lambda: frames.frames, "the first token")
    client.cancel(rid)
    until(lambda: read_request_log(log), "the record")
    (rec,) = read_request_log(log)
    assert rec["finish_reason"] == "abort" and rec["output_tokens"] == 1
    client.close()


def test_a_refused_request_is_not_logged_and_a_bad_path_is_named(logged, tmp_path):
    srv, log = logged
    assert call(srv.url + "/v1/completions", "POST", {"prompt": "hello", "max_tokens": 0}).status == 400
    assert call(srv.url + "/v1/completions", "POST", {"prompt": "hello", "max_tokens": 1}).status == 200
    until(lambda: read_request_log(log), "the record")
    assert len(read_request_log(log)) == 1
    with pytest.raises(OSError, match="--request-log .*/missing/requests.jsonl: cannot open it"):
        IngressServer(None, request_log=tmp_path / "missing" / "requests.jsonl")
