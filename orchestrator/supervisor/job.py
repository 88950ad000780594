"""One MPI job, the supervisor's child: ``mpirun -n N python -m orchestrator serve ...``.

It runs in a session of its own, so ending it reaches every process ``mpirun`` started
on this host (its daemon and the ranks), and it dies with the supervisor
(``PR_SET_PDEATHSIG``); its ranks also stop when the supervisor's channel closes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.supervisor.mpirun import mpirun_command
from orchestrator.triton.server import die_with_parent

logger = logging.getLogger(__name__)


def job_command(ranks: int, serve_argv: list[str], channel: Path, mpirun_args: tuple[str, ...] = ()) -> list[str]:
    """The job's command line: ``serve`` with the user's options and the channel's socket."""
    mpirun = mpirun_command(ranks)
    return [*mpirun[:-2], *mpirun_args, *mpirun[-2:], sys.executable, "-m", "orchestrator", "serve", *serve_argv,
            "--supervisor-socket", str(channel)]


class Job:
    """A started job: its exit status, and ending it."""

    def __init__(self, cmd: list[str], attempt: int) -> None:
        self.attempt = attempt
        logger.info("starting job %d: %s", attempt, " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def returncode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        """End what is left of a job that died or hangs: SIGKILL to its whole session."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        """An orderly stop: SIGTERM (mpirun forwards it; the ranks fail what is in flight and
        exit), then SIGKILL for whatever has not ended within ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("job %d did not stop within %.0f s of SIGTERM; killing it", self.attempt, timeout_s)
        self.kill()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the session's group: mpirun, its daemon, the ranks
        except (ProcessLookupError, PermissionError):
            pass
