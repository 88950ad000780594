"""The controller's rank does not poll for new requests: the ingress wakes its idle wait."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from engines.sampling import SamplingParams
from orchestrator.cluster.controller import Controller
from orchestrator.cluster.rank_loop import RankLoop
from orchestrator.contracts import Topology
from orchestrator.policy.dispatch import make_dispatch_policy
from orchestrator.contracts import GenerateRequest


def test_a_submitted_request_ends_the_loops_idle_wait_at_once():
    sent = []
    c = Controller(Topology.parse(None, 2), "model", None, 128, 8, make_dispatch_policy("least_loaded"),
                   lambda *msg: sent.append(msg), lambda topology: None)
    c.set_ready(True)
    woke = []

    def idle_loop():  # the controller rank's idle turn, with a long sleep
        start = time.monotonic()
        RankLoop._idle_wait(SimpleNamespace(controller=c), 30)
        woke.append(time.monotonic() - start)
        c.poll()

    loop_thread = threading.Thread(target=idle_loop)
    loop_thread.start()
    time.sleep(0.05)  # let it block in its wait (the post would also end it had it not)

    async def submit():
        c.submit(GenerateRequest("r1", [1, 2, 3], SamplingParams(max_tokens=2)))

    asyncio.run(submit())
    loop_thread.join(5)
    assert woke and woke[0] < 5  # woken by the post, not by the 30 s timeout
    assert [type(m[1]).__name__ for m in sent] == ["AddRequest"] and not c.wake.is_set()
