"""Several generations per HTTP request (prompt lists, n) and echo, over a live server on
the fake backend (which answers a prompt with its tokens reversed)."""

from __future__ import annotations

from tests.orchestrator.ingress.http_client import call, sse


def test_prompt_list_times_n_answers_every_choice_in_order(server, backend):
    r = call(server.url + "/v1/completions", "POST", {"prompt": ["abc", "xy"], "n": 2, "max_tokens": 8})
    assert r.status == 200, r.body
    assert [(c["index"], c["text"]) for c in r.body["choices"]] == [(0, "cba"), (1, "cba"), (2, "yx"), (3, "yx")]
    assert len(backend.submitted) == 4 and len({s.request_id for s in backend.submitted}) == 4
    prompt_tokens = sum(len(s.prompt_token_ids) for s in backend.submitted[::2])
    assert r.body["usage"]["prompt_tokens"] == prompt_tokens
    assert r.body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in r.body["choices"])


def test_seeded_choices_get_their_own_seeds(server, backend):
    call(server.url + "/v1/completions", "POST", {"prompt": "abc", "n": 3, "seed": 40, "max_tokens": 2})
    assert [s.sampling.seed for s in backend.submitted] == [40, 41, 42]


def test_streamed_choices_are_told_apart_by_index(server):
    status, events = sse(server.url + "/v1/completions", {"prompt": ["abc", "xy"], "max_tokens": 8, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert texts == {0: "cba", 1: "yx"}
    finals = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finals) == [0, 1]
    assert events[-2]["usage"]["completion_tokens"] == 5


def test_echo_puts_the_prompt_first(server):
    r = call(server.url + "/v1/completions", "POST", {"prompt": "abc", "echo": True, "max_tokens": 8})
    assert r.body["choices"][0]["text"] == "abccba"
    status, events = sse(server.url + "/v1/completions", {"prompt": "abc", "echo": True, "max_tokens": 8,
                                                          "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "abccba"


def test_a_refused_choice_aborts_the_ones_already_submitted(server, backend):
    from orchestrator.contracts import QueueFullError

    submit, seen = backend.submit, []

    def full_on_the_second(req):
        seen.append(req.request_id)
        if len(seen) == 2:
            raise QueueFullError("fake queue is full")
        return submit(req)

    backend.submit = full_on_the_second
    r = call(server.url + "/v1/completions", "POST", {"prompt": "abc", "n": 3, "max_tokens": 8})
    assert r.status == 429, r.body
    assert backend.aborts == [seen[0]]  # the first choice was submitted: it is aborted, not left running
    backend.submit = submit
    assert call(server.url + "/v1/completions", "POST", {"prompt": "abc", "max_tokens": 8}).status == 200
