"""The front door's backend on one process, with a fake job channel: what it sends to a job,
what it holds while none serves, and what a client sees across a job's death."""

from __future__ import annotations

import asyncio

import pytest

from engines.sampling import SamplingParams, TokenLogprob
from orchestrator.contracts import (BackendUnavailable, ClusterState, GenerateRequest, InstanceState,
                                    QueueFullError, RankState, Refused, TokenEvent)
from orchestrator.ingress import backend_wire as bw
from orchestrator.supervisor.remote_backend import RemoteBackend


class FakeChannel:
    def __init__(self) -> None:
        self.frames: list[dict] = []

    def send(self, frame: dict) -> None:
        self.frames.append(frame)

    def submitted(self) -> list[GenerateRequest]:
        return [bw.request_from_wire(f["req"]) for f in self.frames if f["op"] == "submit"]


def _backend(max_queued: int = 8, limit: int = 2) -> RemoteBackend:
    return RemoteBackend("m", tokenizer=None, max_model_len=2048, max_queued=max_queued, migration_limit=limit,
                         retry_after_s=7.0)


def _req(rid: str, t: float = 0.0, **sampling) -> GenerateRequest:
    return GenerateRequest(rid, [1, 2, 3], SamplingParams(max_tokens=8, **sampling), arrival_time=t)


def _serve(backend: RemoteBackend) -> FakeChannel:
    ch = FakeChannel()
    backend.attach(ch)
    backend.on_beat(ch, True)
    return ch


async def _drain(q: asyncio.Queue) -> list[TokenEvent]:
    await asyncio.sleep(0)  # events come through call_soon_threadsafe
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_requests_wait_while_no_job_serves_and_go_out_oldest_first():
    async def go():
        b = _backend()
        q2 = b.submit(_req("b", t=2.0))
        q1 = b.submit(_req("a", t=1.0))
        assert not b.healthy()
        ch = FakeChannel()
        b.attach(ch)
        assert ch.frames == [] and not b.healthy()  # connected, not yet serving
        b.on_beat(ch, True)
        assert b.healthy() and [r.request_id for r in ch.submitted()] == ["a", "b"]
        b.on_event(ch, TokenEvent("a", [5], True, "length"))
        assert [e.token_ids for e in await _drain(q1)] == [[5]] and await _drain(q2) == []
        assert b.in_flight() == 1
    asyncio.run(go())


def test_a_streamed_request_continues_on_the_next_job_after_its_tokens():
    async def go():
        b = _backend()
        ch1 = _serve(b)
        q = b.submit(_req("a", temperature=0.8, seed=11))
        b.on_event(ch1, TokenEvent("a", [7, 8]))
        b.on_event(ch1, TokenEvent("a", [], True, "abort", "the server is shutting down", cluster_failed=True))
        b.detach("the job exited with status 137")
        b.on_event(ch1, TokenEvent("a", [99]))  # a dead job's late frame is ignored
        ch2 = _serve(b)
        resent = ch2.submitted()
        assert len(resent) == 1 and resent[0].output_token_ids == [7, 8]
        assert resent[0].prompt_token_ids == [1, 2, 3] and resent[0].sampling.seed == 11
        b.on_event(ch2, TokenEvent("a", [9], True, "length"))
        events = await _drain(q)
        assert [e.token_ids for e in events] == [[7, 8], [9]]  # one stream, no error, nothing twice
        assert events[-1].num_migrations == 1 and b.moved == 1
    asyncio.run(go())


def test_a_request_moved_past_the_limit_ends_with_an_error():
    async def go():
        b = _backend(limit=1)
        ch = _serve(b)
        q = b.submit(_req("a"))
        b.detach("job 1 died")
        ch = _serve(b)
        assert len(ch.submitted()) == 1
        b.detach("job 2 died")
        events = await _drain(q)
        assert len(events) == 1 and "--migration-limit" in events[0].error and events[0].finished
        assert b.in_flight() == 0
    asyncio.run(go())


def test_the_queue_is_bounded_429_while_serving_503_with_retry_after_while_down():
    async def go():
        b = _backend(max_queued=2)
        b.submit(_req("a"))
        b.submit(_req("b"))
        with pytest.raises(BackendUnavailable) as down:
            b.submit(_req("c"))
        assert down.value.retry_after_s == 7.0 and "--max-queued-requests 2" in str(down.value)
        ch = _serve(b)
        with pytest.raises(QueueFullError):
            b.submit(_req("c"))
        b.on_event(ch, TokenEvent("a", [1]))  # a has its first token: it no longer waits
        b.submit(_req("c"))
    asyncio.run(go())


def test_abort_reaches_the_job_only_for_a_request_it_has():
    async def go():
        b = _backend()
        b.submit(_req("pending"))
        b.abort("pending")
        ch = _serve(b)
        assert ch.submitted() == []
        b.submit(_req("sent"))
        b.abort("sent")
        assert ch.frames[-1] == {"op": "abort", "id": "sent"}
    asyncio.run(go())


def test_a_rejected_request_waits_for_the_job_to_serve_again():
    async def go():
        b = _backend()
        ch = _serve(b)
        b.submit(_req("a"))
        b.on_rejected(ch, "a", "the cluster is regrouping")
        assert not b.healthy()
        b.on_beat(ch, True)
        assert [r.request_id for r in ch.submitted()] == ["a", "a"]
    asyncio.run(go())


def test_prompt_logprobs_already_sent_are_not_sent_again():
    async def go():
        b = _backend()
        ch = _serve(b)
        q = b.submit(_req("a", prompt_logprobs=0))
        lp = [TokenLogprob(2, -1.0), TokenLogprob(3, -2.0)]
        b.on_event(ch, TokenEvent("a", [], prompt_logprobs=lp[:1]))  # a chunked prefill's first part
        b.detach("died mid-prefill")
        ch = _serve(b)
        b.on_event(ch, TokenEvent("a", [4], True, "length", prompt_logprobs=lp))
        events = await _drain(q)
        assert [e.prompt_logprobs for e in events] == [lp[:1], lp[1:]]
    asyncio.run(go())


def test_calls_go_to_the_job_and_raise_its_errors_by_kind():
    import threading

    b = _backend()
    ch = _serve(b)

    def answer():
        while not any(f["op"] == "call" for f in ch.frames):
            threading.Event().wait(0.001)  # waiting for the other thread's frame
        call = next(f for f in ch.frames if f["op"] == "call")
        b.on_reply(ch, {"op": "reply", "call": call["call"], "error": "ranks 0 and 1 are in a group", "kind": "Refused"})

    t = threading.Thread(target=answer)
    t.start()
    with pytest.raises(Refused, match="in a group"):
        b.drop([0, 1])
    t.join()
    b.detach("gone")
    with pytest.raises(BackendUnavailable):
        b.state()


def test_wire_round_trips():
    sp = SamplingParams(max_tokens=5, temperature=0.7, seed=3, stop_token_ids=(2, 9), logit_bias=((4, 1.5),),
                        bad_words=((5, 6),), logprobs=2)
    req = GenerateRequest("r", [1, 2], sp, arrival_time=12.5, output_token_ids=[8])
    assert bw.request_from_wire(bw.request_to_wire(req)) == req
    ev = TokenEvent("r", [3], True, "stop", logprobs=[TokenLogprob(3, -0.5, ((3, -0.5), (4, -1.0)))],
                    num_cached_tokens=16, instance=2, instance_shape="tp1xpp2")
    import json
    assert bw.event_from_wire(json.loads(json.dumps(bw.event_to_wire(ev)))) == ev
    state = ClusterState([RankState(0, "replica", 0, 0, 1, (0, 6), 10, 100, 5, 1000, 900)],
                         [InstanceState(0, [0], 1, 2)], queued=3, counters={"drops": 1.0})
    back = bw.result_from_wire("state", json.loads(json.dumps(bw.result_to_wire("state", state))))
    assert back == state
    with pytest.raises(ValueError, match="unknown sampling fields"):
        bw.sampling_from_wire({"max_tokens": 3, "beams": 2})


def test_a_job_that_stopped_beating_is_not_asked():
    """/metrics calls state() from the ingress's loop: a hung job must not stall it."""
    import time

    b = _backend()
    ch = _serve(b)
    b._beat_at = time.monotonic() - 10  # ten seconds without a beat
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="has not beaten"):
        b.state()
    assert time.monotonic() - t0 < 0.1 and not any(f["op"] == "call" for f in ch.frames)
