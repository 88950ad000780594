"""The ingress with no cluster behind it: for measuring the Triton hop alone.

    python -m perf.fake_ingress --port P --relay-socket PATH --gap-ms 80 --stamps FILE

Serves the real ``IngressServer`` (HTTP and the Triton relay) over the tests' fake backend
(``tests/orchestrator/ingress/fake_backend.py``), which answers each prompt with its own
tokens reversed. No model runs and nothing is computed: the first token comes after
``--gap-ms`` of idle time, so that the hop around it can be measured with and without an
idle spell before the answer (it is reported as a gap, never as model time). Each request's
admission and first token are appended to ``--stamps`` as ``admit_ns first_ns`` lines
(CLOCK_MONOTONIC, the clock of Triton's trace timestamps), for
``perf.triton_hop_breakdown``. Prints ``ready`` once serving; runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

from engines.store import EngineStore
from engines.tokenizer import Tokenizer
from orchestrator.contracts import GenerateRequest, TokenEvent
from orchestrator.ingress.server import IngressServer
from perf.mpi_launch import REPO_ROOT
from tests.orchestrator.ingress.fake_backend import FakeBackend


class StampingBackend(FakeBackend):
    """The fake backend, writing each request's admission and first-token times."""

    def __init__(self, *args, stamps: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fd = os.open(stamps, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._admitted: dict[str, int] = {}

    def submit(self, req: GenerateRequest) -> asyncio.Queue[TokenEvent]:
        self._admitted[req.request_id] = time.monotonic_ns()
        return super().submit(req)

    async def _emit(self, req: GenerateRequest, queue: asyncio.Queue[TokenEvent]) -> None:
        """One token per gap, the first a gap after admission. Each comes from a worker
        thread, as the cluster's come from the rank loop's: the event loop's own timers
        round their waits up to whole milliseconds (epoll), which would skew the gap by where
        the loop last went idle."""
        admitted = self._admitted.pop(req.request_id)
        loop = asyncio.get_running_loop()
        due = admitted / 1e9
        out = self.output_for(req.prompt_token_ids, req.sampling.max_tokens)
        for i, tok in enumerate(out):
            due += self.token_delay
            await loop.run_in_executor(None, _idle_until, due)
            if i == 0:
                os.write(self._fd, f"{admitted} {time.monotonic_ns()}\n".encode())
            queue.put_nowait(TokenEvent(req.request_id, [tok]))
        reason = "length" if len(out) == req.sampling.max_tokens else "stop"
        queue.put_nowait(TokenEvent(req.request_id, [], finished=True, finish_reason=reason))


def _idle_until(due: float) -> None:
    """The gap itself: nothing runs (what is measured is everything around it)."""
    time.sleep(max(0.0, due - time.monotonic()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.fake_ingress", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="HTTP port (127.0.0.1)")
    p.add_argument("--relay-socket", type=Path, required=True, help="the Triton relay's Unix socket")
    p.add_argument("--gap-ms", type=float, default=80.0, help="idle time before each token (default: 80)")
    p.add_argument("--stamps", type=Path, required=True, help="file the admit/first-token times are appended to")
    p.add_argument("--engine-dir", type=Path, default=REPO_ROOT / "stores" / "smollm2",
                   help="store whose tokenizer the fake uses")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tokenizer = Tokenizer(EngineStore(args.engine_dir).tokenizer_dir)
    backend = StampingBackend(tokenizer=tokenizer, max_model_len=2048, token_delay=args.gap_ms / 1e3,
                              stamps=args.stamps)
    IngressServer(backend, host="127.0.0.1", port=args.port, relay_socket=args.relay_socket).start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
