"""The in-memory form of a request trace: what a benchmark replays, whatever file it came from."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path


class TraceFormatError(ValueError):
    """A trace file that cannot be read: the message names the file, the line and the reason."""

    def __init__(self, path: str | Path, reason: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.line = line
        where = f"{self.path}: line {line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace.

    ``arrival_s`` is seconds from the trace start; ``input_len`` and ``output_len`` are the
    prompt and completion lengths in tokens; ``source_row`` is the line of the file the
    request came from (``None`` for synthetic requests), kept so odd requests can be traced back.
    """

    arrival_s: float
    input_len: int
    output_len: int
    source_row: int | None = None
    block_hashes: tuple[int, ...] = ()
    """Mooncake's ``hash_ids``: each names one block of the prompt (``MOONCAKE_BLOCK_TOKENS``
    tokens in the trace; the last may be partial), equal ids meaning identical blocks."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be finite and >= 0, got {self.arrival_s}")
        if self.input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {self.input_len}")
        if self.output_len < 0:
            raise ValueError(f"output_len must be >= 0, got {self.output_len}")


@dataclass
class Trace:
    """A named list of requests, always sorted by arrival time.

    The constructor copies and (stably) sorts ``requests``, so every consumer can rely on
    arrival order without checking; code that mutates ``requests`` afterwards owns the result.
    """

    requests: list[TraceRequest]
    name: str = "trace"

    def __post_init__(self) -> None:
        # Stable sort: requests with equal arrival times keep their file order.
        self.requests = sorted(self.requests, key=attrgetter("arrival_s"))

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        """Seconds from the trace start (time 0) to the last arrival; 0 for an empty trace."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    def rate(self) -> float:
        """Mean arrival rate in requests per second over ``duration_s``."""
        if self.duration_s <= 0:
            raise ValueError(f"trace {self.name!r} spans no time; its rate is undefined")
        return len(self.requests) / self.duration_s
