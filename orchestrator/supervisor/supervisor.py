"""``python -m orchestrator supervise --ranks N -- <serve options>``: a front door that
outlives the MPI job.

The supervisor runs the OpenAI ingress and Triton itself (``RemoteBackend`` behind them),
starts the job as its child and serves it over a Unix socket (``backend_wire.py``). Its
state machine, one job at a time::

    STARTING --(the job connects and beats healthy)--> SERVING
    STARTING --(the job exits, or start_timeout_s)--> RESTARTING  (a failed start)
    SERVING  --(the job exits, its channel closes, heartbeat_timeout_s)--> RESTARTING
    RESTARTING --(what is left of the job killed; its requests pending)--> STARTING
    max_start_failures failed starts in a row --> FAILED (requests end with an error, exit 1)
    a job that exits 2 while starting (a bad option) --> FAILED at once (exit 2)
    SIGTERM / SIGINT, in any state --> STOPPING (the ingress ends open requests, the job stops)

While no job serves, ``/health`` and Triton's readiness say not ready and new requests
wait in the front door's bounded queue (beyond it: 503 with ``Retry-After``).
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.ingress import backend_wire as bw
from orchestrator.ingress import relay_wire as wire
from orchestrator.supervisor.config import SuperviseConfig
from orchestrator.supervisor.job import Job, job_command
from orchestrator.supervisor.remote_backend import RemoteBackend

logger = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the supervisor looks at its job (exit, channel, heartbeat)."""

STARTUP_REFUSED = 2
"""The exit status of a job whose ranks agreed that an option is bad (``launch.py``)."""


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass(frozen=True)
class JobEnd:
    """How a job ended, as the supervisor saw it."""

    reason: str
    served: bool
    """It had reached SERVING (else it is a failed start)."""
    refused: bool = False
    """It exited with status 2 before serving: its ranks agreed that an option is bad, and
    starting it again would only say so again."""


class JobChannel:
    """One job's connection: a reader thread that hands frames to the backend and keeps
    the heartbeat; ``send`` from any thread."""

    def __init__(self, sock: socket.socket, backend: RemoteBackend) -> None:
        self.sock = sock
        self.backend = backend
        self._write = threading.Lock()
        self.last_frame = time.monotonic()
        self.silence: dict[int, float] = {}
        self.healthy = False
        self.closed: str | None = None
        """Why the channel ended (None while it is open)."""
        threading.Thread(target=self._read, name="job-channel", daemon=True).start()

    def send(self, frame: dict[str, Any]) -> None:
        data = wire.encode(frame)
        with self._write:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.closed = self.closed or f"the job's channel failed ({exc})"

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _read(self) -> None:
        stream = self.sock.makefile("rb")
        try:
            for line in stream:
                self.last_frame = time.monotonic()
                self._on_frame(wire.decode(line))
        except (OSError, ValueError) as exc:
            self.closed = f"the job's channel failed ({exc})"
        self.closed = self.closed or "the job closed its channel"

    def _on_frame(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "event":
            self.backend.on_event(self, bw.event_from_wire(frame["event"]))
        elif op == "beat":
            self.silence = {int(r): float(s) for r, s in frame.get("silence", {}).items()}
            self.healthy = bool(frame.get("healthy"))
            self.backend.on_beat(self, self.healthy)
        elif op == "reply":
            self.backend.on_reply(self, frame)
        elif op == "rejected":
            self.backend.on_rejected(self, str(frame.get("id")), str(frame.get("error")))
        elif op == "hello":
            logger.info("the job's controller rank (pid %s) connected: %s ranks", frame.get("pid"),
                        frame.get("world_size"))
        else:
            logger.error("job channel: unknown op %r", op)


class Supervisor:
    """Owns the front door's backend and one job at a time."""

    def __init__(self, cfg: SuperviseConfig, serve_argv: list[str], backend: RemoteBackend) -> None:
        self.cfg = cfg
        self.serve_argv = serve_argv
        self.backend = backend
        self.state = State.STARTING
        self.restarts = 0
        self.path = Path(tempfile.gettempdir()) / f"kunserve-supervisor-{os.getpid()}.sock"
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self.job: Job | None = None
        self.channel: JobChannel | None = None

    def _enter(self, state: State) -> None:
        """One transition of the state machine, logged (the log is how an operator follows it)."""
        if state is not self.state:
            logger.info("supervisor: %s -> %s", self.state.value, state.value)
            self.state = state

    def stop(self, reason: str = "stopping") -> None:
        """Ask the run loop to stop (a signal handler, or a test)."""
        logger.info("supervisor: %s", reason)
        self._stop.set()

    def run(self) -> int:
        """Start jobs until stopped (0), until starts keep failing (1), or until a job
        refuses its options (2)."""
        self._listen()
        failures = 0
        attempt = 0
        try:
            while not self._stop.is_set():
                attempt += 1
                end = self._run_job(attempt)
                if self._stop.is_set():
                    break
                self._enter(State.RESTARTING)
                self.backend.detach(end.reason)
                if end.refused:
                    self._enter(State.FAILED)
                    self.backend.fail(f"the cluster cannot start: {end.reason}")
                    logger.error("job %d refused its options (its error is above); not restarting it", attempt)
                    return 2
                failures = 0 if end.served else failures + 1
                logger.error("job %d ended: %s; %s", attempt, end.reason,
                             "restarting it" if failures < self.cfg.max_start_failures else "giving up")
                if failures >= self.cfg.max_start_failures:
                    self._enter(State.FAILED)
                    self.backend.fail(f"the cluster could not be started ({failures} failed starts in a row; "
                                      f"the last: {end.reason})")
                    return 1
                self.restarts += 1
                self._stop.wait(min(2.0 ** failures - 1, 30.0))  # back off after failed starts
            return 0
        finally:
            if self.state is not State.FAILED:
                self._enter(State.STOPPING)
            self._listener.close()
            self.path.unlink(missing_ok=True)

    def stop_job(self) -> None:
        """After ``run``, once the front ends have ended their requests: stop the job."""
        if self.job is not None:
            self.job.stop()
            self.job = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _listen(self) -> None:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)  # only this user's processes may serve as the job
        sock.listen(4)
        sock.settimeout(POLL_S)
        self._listener = sock

    def _run_job(self, attempt: int) -> JobEnd:
        self._enter(State.STARTING)
        cmd = job_command(self.cfg.ranks, self.serve_argv, self.path, self.cfg.mpirun_arg)
        self.job = job = Job(cmd, attempt)
        try:
            channel = self._connect(job)
            if isinstance(channel, JobEnd):
                return channel
            self.channel = channel
            return self._watch(job, channel)
        finally:
            if not self._stop.is_set():  # else stop_job stops it in order
                job.kill()  # what is left of it
                self.job = None
                if self.channel is not None:
                    self.channel.close()
                    self.channel = None

    def _connect(self, job: Job) -> JobChannel | JobEnd:
        """Wait for the job's controller rank to connect."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while not self._stop.is_set():
            if job.returncode() is not None:
                return JobEnd(f"the job exited with status {job.returncode()} while starting", served=False,
                              refused=job.returncode() == STARTUP_REFUSED)
            if time.monotonic() > deadline:
                return JobEnd(f"the job did not connect within {self.cfg.start_timeout_s:.0f} s", served=False)
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            channel = JobChannel(sock, self.backend)
            self.backend.attach(channel)
            return channel
        return JobEnd("stopping", served=False)

    def _watch(self, job: Job, channel: JobChannel) -> JobEnd:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        served = False
        timeout = self.cfg.heartbeat_timeout_s
        while not self._stop.wait(POLL_S):
            if job.returncode() is not None:
                return JobEnd(f"the job exited with status {job.returncode()}", served)
            if channel.closed:
                try:  # a dying job closes its channel first: name its exit status when it comes
                    code = job.proc.wait(2.0)
                    return JobEnd(f"the job exited with status {code} ({channel.closed})", served)
                except subprocess.TimeoutExpired:
                    return JobEnd(channel.closed, served)
            quiet = time.monotonic() - channel.last_frame
            if quiet > timeout:
                return JobEnd(f"the job's controller rank sent nothing for {quiet:.1f} s "
                              f"(--heartbeat-timeout-s {timeout:g}): stopped or hung", served)
            silent = {r: s for r, s in channel.silence.items() if s > timeout}
            if silent and served:
                ranks = ", ".join(f"rank {r} ({s:.1f} s)" for r, s in sorted(silent.items()))
                return JobEnd(f"{ranks} stopped reporting (--heartbeat-timeout-s {timeout:g}): "
                              "stopped or hung", served)
            if channel.healthy and not served:
                served = True
                self._enter(State.SERVING)
                logger.info("job %d serves (%d restarts so far)", job.attempt, self.restarts)
            if not served and time.monotonic() > deadline:
                return JobEnd(f"the job did not serve within {self.cfg.start_timeout_s:.0f} s", served)
        return JobEnd("stopping", served)


def install_signal_handlers(supervisor: Supervisor) -> None:
    def handler(signum, _frame):
        supervisor.stop(f"received {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
