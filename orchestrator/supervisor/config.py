"""Options of ``supervise``: the one place their defaults are defined (``--help`` reads
the docstrings, as for ``serve``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.config_cli import cli


@dataclass(frozen=True)
class SuperviseConfig:
    ranks: int = field(metadata=cli(metavar="N"))
    """MPI ranks of the job (``mpirun -n N``): one per device."""
    heartbeat_timeout_s: float = 10.0
    """A job whose controller rank has sent nothing for this long, or in which a rank has
    not reported for this long, has stopped or hangs: it is ended and started again."""
    start_timeout_s: float = 300.0
    """Seconds a job may take from its start to serving (loading every rank's weights)."""
    max_start_failures: int = 3
    """Jobs in a row that end before serving before the supervisor gives up (exit 1): a
    configuration that cannot start is not retried for ever."""
    migration_limit: int = 3
    """How often one request may be moved to a new job after the one serving it died
    (Dynamo's --migration-limit); past it the request ends with an error."""
    retry_after_s: float = 5.0
    """``Retry-After`` on the 503 a request gets while the job restarts and the front
    door's queue (--max-queued-requests of the serve options) is full."""
    mpirun_arg: tuple[str, ...] = field(default=(), metadata=cli(repeat=True, metavar="FLAG"))
    """One more flag for mpirun, before the program (joined with '=': --mpirun-arg=--host=a,b);
    repeat for more."""

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"--ranks must be >= 1, got {self.ranks}")
        for name in ("heartbeat_timeout_s", "start_timeout_s", "retry_after_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_start_failures < 1:
            raise ValueError("--max-start-failures must be >= 1")
        if self.migration_limit < 0:
            raise ValueError("--migration-limit must be >= 0")
