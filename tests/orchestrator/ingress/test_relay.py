"""The Triton relay end to end: a live ``IngressServer`` with its relay socket, driven by
the Triton model's ``RelayClient``, on the fake backend."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.ingress.server import IngressServer
from orchestrator.triton.relay_client import RelayClient, RelayUnavailable
from tests.orchestrator.ingress.http_client import call

WAIT_S = 10


class Frames:
    """Collects one request's frames; ``wait`` returns them once the last came."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.done = threading.Event()

    def __call__(self, frame: dict) -> None:
        self.frames.append(frame)
        if "error" in frame or frame.get("finish_reason") is not None:
            self.done.set()

    def wait(self) -> list[dict]:
        assert self.done.wait(WAIT_S), f"no last frame within {WAIT_S} s: {self.frames}"
        return self.frames

    def text(self) -> str:
        return "".join(f.get("text", "") for f in self.wait())


def until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "relay.sock"


@pytest.fixture
def relay_server(backend, sock_path) -> Iterator[IngressServer]:
    srv = IngressServer(backend, host="127.0.0.1", port=0, shutdown_timeout=0.5, relay_socket=sock_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(relay_server, sock_path) -> Iterator[RelayClient]:
    c = RelayClient(str(sock_path))
    try:
        yield c
    finally:
        c.close()


def test_frames_carry_the_same_answer_as_the_http_route(relay_server, client, backend):
    body = {"prompt": "abcd", "max_tokens": 3, "temperature": 0}
    frames = Frames()
    client.submit(body, frames)
    got = frames.wait()
    http = call(relay_server.url + "/v1/completions", "POST", body).body["choices"][0]
    assert "".join(f["text"] for f in got) == http["text"] == "dcb"
    assert [t for f in got for t in f["token_ids"]] == http["token_ids"]
    assert got[-1]["finish_reason"] == http["finish_reason"] == "length"
    assert got[-1]["num_preemptions"] == 0 and got[-1]["num_migrations"] == 0
    assert all(f["finish_reason"] is None for f in got[:-1])
    until(lambda: relay_server.stats.in_flight == 0, "in_flight back to 0")


@pytest.mark.parametrize("body,status,message", [
    ({"prompt": "abc", "max_tokens": 0}, 400, "max_tokens must be at least 1, got 0"),
    ({"prompt": "", "max_tokens": 2}, 400, "prompt"),
    ({"prompt": "a" * 200, "max_tokens": 2}, 400, "context"),
    ("not an object", 400, "must be a JSON object"),
    ({"prompt": "abc", "max_tokens": 2, "embedding_bias": [["a"]]}, 400, "embedding_bias must be a list"),
    ({"prompt": "abc", "max_tokens": 2, "n": 2}, 400, "one prompt and one choice per Triton request"),
])
def test_a_bad_body_gets_one_error_frame_and_the_connection_keeps_serving(client, body, status, message):
    frames = Frames()
    client.submit(body, frames)
    (err,) = frames.wait()
    assert err["status"] == status and message in err["error"]
    ok = Frames()
    client.submit({"prompt": "abc", "max_tokens": 8}, ok)
    assert ok.text() == "cba"


@pytest.mark.parametrize("knob,status", [("queue_full", 429), ("unavailable", 503)])
def test_a_cluster_that_refuses_gives_the_http_status(client, backend, knob, status):
    setattr(backend, knob, True)
    frames = Frames()
    client.submit({"prompt": "abc"}, frames)
    (err,) = frames.wait()
    assert err["status"] == status


def test_a_cluster_failure_mid_stream_ends_the_request_with_a_500(client, backend):
    backend.fail_after = 1
    frames = Frames()
    client.submit({"prompt": "abcd", "max_tokens": 4}, frames)
    got = frames.wait()
    assert got[0]["text"] == "d" and got[-1]["status"] == 500 and "fake failure" in got[-1]["error"]


def test_cancel_aborts_the_request_in_the_cluster(client, backend):
    backend.stall_after = 1
    frames = Frames()
    rid = client.submit({"prompt": "abcd", "max_tokens": 4}, frames)
    until(lambda: frames.frames, "the first frame")
    client.cancel(rid)
    until(lambda: backend.aborts, "the abort")
    assert backend.aborts == [backend.submitted[0].request_id]
    assert client.open_requests() == 0 and not frames.done.is_set()


def test_a_closed_connection_aborts_what_was_open_on_it(client, backend):
    backend.stall_after = 1
    frames = Frames()
    client.submit({"prompt": "abcd", "max_tokens": 4}, frames)
    until(lambda: frames.frames, "the first frame")
    client.close()
    until(lambda: backend.aborts, "the abort")
    assert frames.wait()[-1]["status"] == 503  # the client's own requests fail, named as lost


def test_many_requests_share_one_connection(client):
    prompts = ["abc", "hello", "xyz", "kunserve", "ab"] * 4
    collectors = [Frames() for _ in prompts]
    for p, frames in zip(prompts, collectors):
        client.submit({"prompt": p, "max_tokens": 16}, frames)
    assert [f.text() for f in collectors] == [p[::-1] for p in prompts]


def test_a_lost_ingress_fails_open_requests_and_a_new_one_is_reconnected_to(backend, sock_path):
    backend.stall_after = 1
    first = IngressServer(backend, port=0, shutdown_timeout=0.5, relay_socket=sock_path)
    first.start()
    client = RelayClient(str(sock_path))
    try:
        frames = Frames()
        client.submit({"prompt": "abcd", "max_tokens": 4}, frames)
        until(lambda: frames.frames, "the first frame")
        first.stop()
        err = frames.wait()[-1]
        assert err["status"] == 503 and "lost" in err["error"]
        with pytest.raises(RelayUnavailable, match="not reachable"):
            client.submit({"prompt": "abc"}, Frames())
        backend.stall_after = None
        second = IngressServer(backend, port=0, shutdown_timeout=0.5, relay_socket=sock_path)
        second.start()
        try:
            again = Frames()
            client.submit({"prompt": "abc", "max_tokens": 8}, again)
            assert again.text() == "cba"
        finally:
            second.stop()
    finally:
        client.close()


def test_the_socket_is_private_and_removed_on_stop(backend, sock_path):
    srv = IngressServer(backend, port=0, shutdown_timeout=0.5, relay_socket=sock_path)
    srv.start()
    assert sock_path.stat().st_mode & 0o777 == 0o600
    srv.stop()
    assert not sock_path.exists()


def test_a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_refused(backend, sock_path, tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))  # bound, never listening: what a killed ingress leaves
    stale.close()
    srv = IngressServer(backend, port=0, shutdown_timeout=0.5, relay_socket=sock_path)
    srv.start()
    try:
        with pytest.raises(OSError, match="another process listens"):
            IngressServer(backend, port=0, relay_socket=sock_path).start()
    finally:
        srv.stop()
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(OSError, match="is not a socket"):
        IngressServer(backend, port=0, relay_socket=plain).start()


def test_embedding_bias_becomes_a_logit_bias_on_each_of_the_words_tokens(client, backend):
    frames = Frames()
    client.submit({"prompt": "abc", "max_tokens": 8, "embedding_bias": [["ab", 2.5], ["b", 1.0]]}, frames)
    frames.wait()
    bias = dict(backend.submitted[-1].sampling.logit_bias)
    a, b = backend.tokenizer.encode("ab", add_special_tokens=False)
    assert bias == {a: 2.5, b: 3.5}
