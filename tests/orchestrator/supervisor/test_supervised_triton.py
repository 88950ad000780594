"""Triton in the supervisor: its readiness follows the job's, and its requests wait out a restart.

Server readiness implies the served model is ready at start; when a rank dies, the server
says not ready while the job restarts but the model stays loaded, and a gRPC stream sent
then is answered, with the single-process engine's greedy tokens, once the new job serves.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from perf.cluster_client import reference_completions, run
from tests.deps import require
from tests.mpi_util import requires_mpirun

require("tritonclient.grpc")
require("pytriton")

from perf.triton_client import GenerateRequest, SupervisedTritonCluster, stream_generate  # noqa: E402

pytestmark = [requires_mpirun,
              pytest.mark.expect_log(r"\[supervisor\] ERROR .*job \d+ ended", r"prterun|PRTE|exited on signal",
                                     r"rank \d+ failed|shutting down", r"not healthy: Triton says not ready")]

PROMPT = "Question: what does the supervisor do?"


def _until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling another process's endpoints
    return True


def test_triton_is_unready_during_a_restart_and_its_requests_wait(tiny_store):
    expected = reference_completions(tiny_store, [PROMPT], [12], ignore_eos=False)[0]
    with SupervisedTritonCluster(2, tiny_store, model_names="kunserve",
                                 supervise_args=("--heartbeat-timeout-s", "3")) as c:
        assert (True, False) not in c.readiness_seen and c.readiness_seen[-1] == (True, True)
        os.kill(c.rank_pids()[1], signal.SIGKILL)
        assert _until(lambda: not c.server_ready(), 10), "Triton still said ready after the job died"
        assert c.model_ready("kunserve")  # loaded all along: requests reach the front door's queue
        down = c.health() == 503
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(run(stream_generate(
            c.grpc_target, "kunserve", [GenerateRequest("w", PROMPT, 12)], timeout_s=120))))
        t.start()
        assert down, "the job was back before the request was sent: nothing waited"
        assert _until(c.server_ready, 90)
        t.join(120)
        assert result["w"].error is None and result["w"].token_ids == expected
