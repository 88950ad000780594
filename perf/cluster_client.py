"""A serving cluster under ``mpirun`` (for benchmarks and tests), and a small asyncio HTTP client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from perf.mpi_launch import REPO_ROOT, mpirun_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServingCluster:
    """``mpirun -n N python -m orchestrator serve ...`` in its own process group."""

    started: list["ServingCluster"] = []
    """Every cluster started in this process, oldest first (the tests read their logs)."""

    def __init__(self, n: int, store: Path, *args: str, device_memory: str = "64MiB",
                 env: dict[str, str] | None = None) -> None:
        """``env``: variables added to the job's environment (the tests' fault hooks, say)."""
        self.n = n
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="kunserve-cluster-", suffix=".log")[1])
        self.cmd = mpirun_command(n) + [
            sys.executable, "-m", "orchestrator", "serve", "--engine-dir", str(store),
            "--http-port", str(self.port), "--device-memory", device_memory, *args]
        self.proc: subprocess.Popen | None = None
        self.killed = False
        """``stop`` had to SIGKILL the job: it did not end on SIGTERM within its timeout."""
        self.expected_log: list[re.Pattern] = []
        """Warning or error lines this kind of cluster logs by design (the tests accept them)."""
        self._log_read = 0

    def __enter__(self) -> "ServingCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        ServingCluster.started.append(self)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}:\n{self.output()}")
            if self.health() == 200:
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"cluster not healthy within {timeout} s:\n{self.output()}")

    def health(self) -> int | None:
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def state(self) -> dict:
        return self.get_json("/admin/state")

    def plan(self) -> dict:
        """``GET /admin/plan``: the running policy and what its reshape policy would do now."""
        return self.get_json("/admin/plan")

    def get_json(self, path: str) -> dict:
        import urllib.request
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.loads(r.read())

    def rank_pids(self) -> list[int]:
        """The rank processes (children of mpirun's launcher), in start order."""
        out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
        pids, parents = [], {self.proc.pid}
        for _ in range(3):  # mpirun -> prterun -> ranks, depending on the Open MPI build
            rows = [line.split(None, 2) for line in out.splitlines()[1:]]
            children = {int(p) for p, pp, a in rows if int(pp) in parents}
            pids = sorted(int(p) for p, pp, a in rows if int(pp) in parents and "orchestrator serve" in a
                          and "prterun" not in a and "mpirun" not in a)
            if pids:
                return pids
            parents |= children
        return pids

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def new_output(self) -> str:
        """What the job printed since the previous call (all of it on the first); nothing
        once its log is gone."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_read)
                data = f.read()
        except FileNotFoundError:
            return ""
        self._log_read += len(data)
        return data.decode(errors="replace")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            self.killed = sig == signal.SIGKILL
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.returncode

    def wait_all_free(self, timeout: float = 5.0) -> dict:
        """Poll /admin/state until no rank holds KV pages and nothing runs (stats lag ~0.25 s)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            busy = [r for r in state["ranks"] if r["kv_pages_used"]] + \
                   [i for i in state["instances"] if i["waiting"] or i["running"]]
            if not busy or time.monotonic() > deadline:
                return state
            time.sleep(0.1)


@dataclass
class StreamResult:
    status: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: dict | None = None
    body: dict | None = None
    num_preemptions: int = 0
    num_migrations: int = 0


async def sse_chunks(resp: aiohttp.ClientResponse):
    """The JSON payloads of a Server-Sent Events response's ``data:`` lines, up to ``[DONE]``."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def complete(session: aiohttp.ClientSession, url: str, body: dict) -> StreamResult:
    """POST a completion; for ``stream: true`` collect the SSE chunks."""
    async with session.post(url + "/v1/completions", json=body) as resp:
        if not body.get("stream"):
            data = await resp.json()
            if resp.status != 200:
                return StreamResult(resp.status, error=data.get("error"), body=data)
            choice = data["choices"][0]
            return StreamResult(200, choice["token_ids"], choice["text"], choice["finish_reason"], body=data,
                                num_preemptions=choice.get("num_preemptions", 0),
                                num_migrations=choice.get("num_migrations", 0))
        result = StreamResult(resp.status)
        if resp.status != 200:
            result.error = (await resp.json()).get("error")
            return result
        async for chunk in sse_chunks(resp):
            if "error" in chunk:
                result.error = chunk["error"]
                continue
            choice = chunk["choices"][0]
            result.token_ids += choice.get("token_ids", [])
            result.text += choice.get("text", "")
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
            result.num_preemptions = choice.get("num_preemptions", result.num_preemptions)
            result.num_migrations = choice.get("num_migrations", result.num_migrations)
        return result


def run(coro):
    return asyncio.run(coro)


def reference_completions(store: Path, prompts: list[str], max_tokens: list[int],
                          ignore_eos: bool = True) -> list[list[int]]:
    """Greedy token ids from ``python -m orchestrator generate`` (the single-process engine)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p, n in zip(prompts, max_tokens):
            f.write(json.dumps({"prompt": p, "max_tokens": n}) + "\n")
    res = subprocess.run([sys.executable, "-m", "orchestrator", "generate", "--engine-dir", str(store),
                          "--prompts-file", f.name, "--json", "--no-enable-prefix-caching",
                          *(["--ignore-eos"] if ignore_eos else [])],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    os.unlink(f.name)
    assert res.returncode == 0, res.stderr
    return [json.loads(line)["token_ids"] for line in res.stdout.strip().splitlines()]


class SupervisedCluster(ServingCluster):
    """``python -m orchestrator supervise --ranks N ... -- <serve options>``: the front door
    in its own process, the MPI job its child (``rank_pids`` finds the current job's ranks)."""

    def __init__(self, n: int, store: Path, *args: str, device_memory: str = "64MiB",
                 supervise_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        super().__init__(n, store, *args, device_memory=device_memory, env=env)
        self.cmd = supervised(self.cmd, n, supervise_args)

    def wait_health(self, status: int, timeout: float = 60.0) -> float:
        """Poll ``/health`` until it answers ``status``; the seconds it took."""
        t0 = time.monotonic()
        while self.health() != status:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"/health did not answer {status} within {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)  # polling another process's health endpoint
        return time.monotonic() - t0


def supervised(serve_cmd: list[str], n: int, supervise_args: tuple[str, ...] = ()) -> list[str]:
    """``mpirun ... orchestrator serve OPTIONS`` as ``orchestrator supervise --ranks N -- OPTIONS``."""
    serve = serve_cmd[serve_cmd.index("serve") + 1:]
    return [sys.executable, "-m", "orchestrator", "supervise", "--ranks", str(n), *supervise_args, "--", *serve]
