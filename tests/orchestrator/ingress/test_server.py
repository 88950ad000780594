"""The ingress over real HTTP: a live ``IngressServer`` on a fake backend."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest

from orchestrator.ingress.server import IngressServer
from tests.orchestrator.ingress.http_client import TIMEOUT, call, sse

GOOD = {"model": "tiny", "prompt": "abc", "max_tokens": 8}


def _url(server: IngressServer, path: str) -> str:
    return server.url + path


def _assert_serving(server: IngressServer) -> None:
    r = call(_url(server, "/v1/completions"), "POST", GOOD)
    assert r.status == 200, r.body
    assert r.body["choices"][0]["text"] == "cba"


# ----------------------------------------------------------------------------- completions

def test_completion(server, backend):
    r = call(_url(server, "/v1/completions"), "POST", {"prompt": "abc", "temperature": 0})
    assert r.status == 200
    b = r.body
    assert b["id"].startswith("cmpl-") and len(b["id"]) == len("cmpl-") + 32
    assert b["object"] == "text_completion" and b["model"] == "tiny" and isinstance(b["created"], int)
    choice = b["choices"][0]
    assert choice["text"] == "cba" and choice["finish_reason"] == "stop"
    assert choice["token_ids"] == backend.tokenizer.encode("cba", add_special_tokens=False)
    assert b["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    req = backend.submitted[0]
    assert req.request_id == b["id"] and req.sampling.temperature == 0.0 and req.sampling.max_tokens == 16


def test_completion_length_and_prompt_forms(server, backend):
    ids = backend.tokenizer.encode("xyz", add_special_tokens=False)
    for prompt in ("xyz", ["xyz"], ids):
        r = call(_url(server, "/v1/completions"), "POST", {"prompt": prompt, "max_tokens": 2})
        assert r.status == 200, r.body
        assert r.body["choices"][0]["text"] == "zy"
        assert r.body["choices"][0]["finish_reason"] == "length"
    assert backend.submitted[2].prompt_token_ids == ids  # token ids are taken as they are


def test_chat_completion(server, backend):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = call(_url(server, "/v1/chat/completions"), "POST", {"model": "tiny", "messages": messages})
    assert r.status == 200, r.body
    b = r.body
    assert b["id"].startswith("chatcmpl-") and b["object"] == "chat.completion"
    tok = backend.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert backend.submitted[0].prompt_token_ids == prompt_ids
    expected = backend.output_for(prompt_ids, 16)
    choice = b["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": tok.decode(expected)}
    assert choice["token_ids"] == expected and choice["finish_reason"] == "length"
    assert b["usage"]["prompt_tokens"] == len(prompt_ids) and b["usage"]["completion_tokens"] == 16


# ----------------------------------------------------------------------------- streaming

def test_stream_completion_matches_non_streaming(server):
    body = {"prompt": "hello world", "max_tokens": 20}
    status, events = sse(_url(server, "/v1/completions"), {**body, "stream": True})
    assert status == 200
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    token_chunks, final = chunks[:-1], chunks[-1]
    assert all(len(c["choices"][0]["token_ids"]) == 1 and c["choices"][0]["finish_reason"] is None
               for c in token_chunks)
    assert final["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    whole = call(_url(server, "/v1/completions"), "POST", body).body["choices"][0]["text"]
    assert streamed == whole == "dlrow olleh"


def test_stream_chat_with_usage(server):
    body = {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    status, events = sse(_url(server, "/v1/chat/completions"), body)
    assert status == 200 and events[-1] == "[DONE]"
    first, *rest = events[:-1]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = rest[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert rest[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["token_ids"]) for c in rest[:-1]) == 5


def test_stream_holds_back_split_utf8(server, backend):
    tok = backend.tokenizer
    # The fake answers with the prompt reversed, so send the bytes of the answer backwards.
    answer = "aé€b"
    answer_ids = tok.encode(answer, add_special_tokens=False)
    assert len(answer_ids) == 1 + 2 + 3 + 1  # byte-level: é is 2 tokens, € is 3
    status, events = sse(_url(server, "/v1/completions"),
                         {"prompt": answer_ids[::-1], "max_tokens": 16, "stream": True})
    assert status == 200
    texts = [c["choices"][0]["text"] for c in events[:-1]]
    assert all("\ufffd" not in t for t in texts)
    assert texts[:7] == ["a", "", "é", "", "", "€", "b"]
    assert "".join(texts) == answer


def test_concurrent_streams(server):
    async def one(session: aiohttp.ClientSession, prompt: str) -> str:
        async with session.post(_url(server, "/v1/completions"),
                                json={"prompt": prompt, "max_tokens": 30, "stream": True}) as r:
            raw = (await r.read()).decode()
        chunks = [json.loads(b[6:]) for b in raw.split("\n\n") if b and b != "data: [DONE]"]
        return "".join(c["choices"][0]["text"] for c in chunks)

    async def main() -> list[str]:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            return await asyncio.gather(*(one(s, f"prompt number {i}") for i in range(8)))

    assert asyncio.run(main()) == [f"prompt number {i}"[::-1] for i in range(8)]


# ----------------------------------------------------------------------------- cluster errors

def test_cluster_error_non_streaming(server, backend):
    backend.fail_after = 2
    r = call(_url(server, "/v1/completions"), "POST", GOOD)
    assert r.status == 500
    assert r.body["error"]["code"] == 500 and "fake failure" in r.body["error"]["message"]
    assert backend.aborts == []
    backend.fail_after = None
    _assert_serving(server)


def test_cluster_error_streaming(server, backend):
    backend.fail_after = 2
    status, events = sse(_url(server, "/v1/completions"), {**GOOD, "stream": True})
    assert status == 200
    assert [c["choices"][0]["text"] for c in events[:2]] == ["c", "b"]
    assert events[2]["error"]["code"] == 500 and "fake failure" in events[2]["error"]["message"]
    assert len(events) == 3 and backend.aborts == []
    backend.fail_after = None
    _assert_serving(server)


@pytest.mark.parametrize("flag, status", [("queue_full", 429), ("unavailable", 503)])
def test_submit_refused(server, backend, flag, status):
    setattr(backend, flag, True)
    for stream in (False, True):
        r = call(_url(server, "/v1/completions"), "POST", {**GOOD, "stream": stream})
        assert r.status == status
        assert r.body["error"]["code"] == status
    setattr(backend, flag, False)
    _assert_serving(server)


def test_unavailable_with_a_retry_time_answers_503_with_retry_after(server, backend):
    backend.unavailable, backend.retry_after_s = True, 4.6
    r = call(_url(server, "/v1/completions"), "POST", GOOD)
    assert r.status == 503 and r.headers.get("Retry-After") == "5", r.headers
    backend.retry_after_s = None
    r = call(_url(server, "/v1/completions"), "POST", GOOD)
    assert r.status == 503 and "Retry-After" not in r.headers
    backend.unavailable = False
    _assert_serving(server)


# ----------------------------------------------------------------------------- disconnects

def _wait_for(cond, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_disconnect_mid_stream_aborts_once(server, backend):
    backend.stall_after = 2

    async def main() -> str:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            r = await s.post(_url(server, "/v1/completions"), json={**GOOD, "stream": True})
            chunks = []
            while len(chunks) < 2:
                line = (await r.content.readline()).decode()
                if line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
            r.close()  # drops the connection while the server waits for the next token
            return chunks[0]["id"]

    request_id = asyncio.run(main())
    _wait_for(lambda: len(backend.aborts) >= 1)
    time.sleep(0.1)
    assert backend.aborts == [request_id]
    backend.stall_after = None
    _assert_serving(server)


def test_disconnect_non_streaming_aborts(server, backend):
    backend.stall_after = 1

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(asyncio.TimeoutError):
                await s.post(_url(server, "/v1/completions"), json=GOOD,
                             timeout=aiohttp.ClientTimeout(total=0.3))

    asyncio.run(main())
    _wait_for(lambda: len(backend.aborts) >= 1)
    time.sleep(0.1)
    assert backend.aborts == [backend.submitted[0].request_id]


# ----------------------------------------------------------------------------- other routes

def test_models_and_health(server, backend):
    r = call(_url(server, "/v1/models"))
    assert r.status == 200 and r.body["object"] == "list"
    assert [m["id"] for m in r.body["data"]] == ["tiny"]
    assert call(_url(server, "/health")).body == {"status": "ok"}
    backend.unavailable = True
    assert call(_url(server, "/health")).status == 503
    assert call(_url(server, "/admin/state")).status == 503


def test_admin_state_and_regroup(server, backend):
    r = call(_url(server, "/admin/state"))
    assert r.status == 200
    assert r.body["queued"] == 3 and [x["rank"] for x in r.body["ranks"]] == [0, 1]
    assert r.body["ranks"][1]["kv_pages_used"] == 50 and r.body["instances"][0]["ranks"] == [0]
    assert call(_url(server, "/admin/regroup"), "POST", {"groups": "0-1"}).status == 200
    assert backend.regroups == ["0-1"]
    r = call(_url(server, "/admin/regroup"), "POST", {"groups": "0,1"})
    assert r.status == 409 and "ranks are busy" in r.body["error"]["message"]
    r = call(_url(server, "/admin/regroup"), "POST", {"groups": "x-y"})
    assert r.status == 400 and "cannot parse" in r.body["error"]["message"]
    assert call(_url(server, "/admin/regroup"), "POST", {"groups": "slow"}).status == 504
    assert call(_url(server, "/admin/regroup"), "POST", {"groups": 3}).status == 400
    assert call(_url(server, "/admin/regroup"), "POST", data=b"{").status == 400
    assert backend.regroups == ["0-1"]


def test_metrics(server):
    _assert_serving(server)  # length 3 < 8: stop
    call(_url(server, "/v1/completions"), "POST", {"prompt": "abcdef", "max_tokens": 2})  # length
    call(_url(server, "/v1/completions"), "POST", {"prompt": ""})  # 400
    r = call(_url(server, "/metrics"))
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.body
    for line in ("# TYPE kunserve_time_to_first_token_seconds histogram",
                 "# TYPE kunserve_time_per_output_token_seconds histogram",
                 'kunserve_time_to_first_token_seconds_bucket{le="+Inf"} 2',
                 "kunserve_time_to_first_token_seconds_count 2",
                 "kunserve_time_per_output_token_seconds_count 2",
                 'kunserve_request_success_total{finish_reason="stop"} 1',
                 'kunserve_request_success_total{finish_reason="length"} 1',
                 'kunserve_request_errors_total{type="BadRequestError"} 1',
                 "kunserve_generation_tokens_total 5",
                 "kunserve_num_requests_queued 3",
                 'kunserve_kv_pages_used{rank="0"} 25',
                 'kunserve_kv_pages_total{rank="1"} 100',
                 'kunserve_kv_cache_usage_ratio{rank="1"} 0.5',
                 'kunserve_num_requests_waiting{instance="1"} 1',
                 'kunserve_num_requests_running{instance="0"} 2'):
        assert line in text.splitlines(), line


def test_metrics_without_cluster_state(server, backend):
    backend.unavailable = True
    r = call(_url(server, "/metrics"))
    assert r.status == 200 and "kunserve_time_to_first_token_seconds_count 0" in r.body
    assert "kunserve_kv_pages_used" not in r.body


# ----------------------------------------------------------------------------- the server

def test_port_zero_and_stop():
    from tests.orchestrator.ingress.fake_backend import FakeBackend

    srv = IngressServer(FakeBackend(tokenizer=None), port=0)  # type: ignore[arg-type]
    srv.start()
    port = srv.port
    assert port > 0 and call(srv.url + "/health").status == 200
    srv.stop()
    srv.stop()  # idempotent
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_port_in_use_raises(server, backend):
    other = IngressServer(backend, port=server.port)
    with pytest.raises(OSError):
        other.start()
    _assert_serving(server)


def test_disconnect_detected_by_a_failed_write(backend):
    """Without handler cancellation (a plain runner of ``build_app``), the next write notices."""
    from aiohttp import web

    from orchestrator.ingress.server import build_app

    backend.token_delay = 0.01

    async def main() -> str:
        runner = web.AppRunner(build_app(backend), handler_cancellation=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/completions"
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                r = await s.post(url, json={"prompt": "a" * 40, "max_tokens": 20, "stream": True})
                line = ""
                while not line.startswith("data: "):
                    line = (await r.content.readline()).decode()
                r.close()
                deadline = time.monotonic() + 3
                while not backend.aborts and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
                return json.loads(line[6:])["id"]
        finally:
            await runner.cleanup()

    request_id = asyncio.run(main())
    assert backend.aborts == [request_id]


def test_internal_errors_do_not_stop_the_server(server, backend, monkeypatch):
    def broken_submit(req):
        raise RuntimeError("bug in the backend")

    monkeypatch.setattr(backend, "submit", broken_submit)
    r = call(_url(server, "/v1/completions"), "POST", GOOD)
    assert r.status == 500 and r.body["error"]["message"] == "internal server error"
    monkeypatch.undo()

    def broken_decode(ids, skip_special_tokens=True):
        raise RuntimeError("bug in decoding")

    monkeypatch.setattr(backend.tokenizer, "decode", broken_decode)
    status, events = sse(_url(server, "/v1/completions"), {**GOOD, "stream": True})
    assert status == 200 and events == [{"error": {"message": "internal server error",
                                                   "type": "InternalServerError", "code": 500}}]
    _wait_for(lambda: len(backend.aborts) == 1)  # the cluster must not keep generating for it
    monkeypatch.undo()
    _assert_serving(server)


# ----------------------------------------------------------------------------- stop strings

def test_stop_string_ends_answer_and_aborts_in_cluster(server, backend):
    body = {"prompt": "hello world", "max_tokens": 20, "stop": ["xx", "ow"]}
    r = call(_url(server, "/v1/completions"), "POST", body)
    assert r.status == 200, r.body
    choice = r.body["choices"][0]
    assert choice["text"] == "dlr" and choice["finish_reason"] == "stop"
    assert backend.aborts == [r.body["id"]]  # the cluster stops generating for it


def test_stop_string_streamed_never_shows_part_of_it(server, backend):
    body = {"prompt": "hello world", "max_tokens": 20, "stop": "ow", "stream": True}
    status, events = sse(_url(server, "/v1/completions"), body)
    assert status == 200 and events[-1] == "[DONE]"
    texts = [c["choices"][0]["text"] for c in events[:-1]]
    assert "".join(texts) == "dlr" and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("o" not in t for t in texts)  # the held-back 'o' was part of the stop string


def test_stop_string_not_matched_keeps_whole_text(server):
    body = {"prompt": "hello world", "max_tokens": 20, "stop": ["oz"]}
    r = call(_url(server, "/v1/completions"), "POST", body)
    assert r.body["choices"][0]["text"] == "dlrow olleh"
