"""Typed records of a serving benchmark run and their CSV I/O.

A replay writes three kinds of rows, each tagged with the scheduling policy it ran under:

* :class:`RequestRecord` - one per request: when it was due, sent, got its first token and
  each later token, when it finished, and what happened to it (preemptions, migrations, error).
* :class:`SecondSample` - a periodic per-rank snapshot of GPU memory (weights, KV cache,
  free) and of the scheduler's queue.
* :class:`ClusterEvent` - a cluster-level action such as a weight ``drop`` or ``restore``.

All times are seconds from the start of the run. CSV files have one column per field, in
field order, with a header row. Floats are written with ``repr`` so they read back exactly;
``None`` is written as an empty cell (so an empty ``error`` string reads back as ``None``);
lists of floats are joined with ``;``.
"""

from __future__ import annotations

import csv
import functools
import operator
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

_NONE = type(None)


@dataclass
class RequestRecord:
    """What happened to one request under one policy."""

    policy: str
    request_id: str
    arrival_s: float                 # scheduled arrival
    sent_s: float                    # when the client actually sent it
    first_token_s: float | None      # first output token/chunk arrived
    token_times_s: list[float]       # arrival time of each output token/chunk
    finish_s: float | None           # last byte of the response
    input_len: int
    output_len: int                  # tokens actually generated
    requested_output_len: int
    preemptions: int = 0
    migrations: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the request finished without error and produced a first token."""
        return self.error is None and self.first_token_s is not None and self.finish_s is not None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token from the *scheduled* arrival, so client queueing counts."""
        if self.first_token_s is None:
            return None
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than 2 tokens."""
        if self.output_len < 2 or self.first_token_s is None or self.finish_s is None:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_len - 1)

    @property
    def e2e_s(self) -> float | None:
        """End-to-end latency from the scheduled arrival to the finish."""
        if self.finish_s is None:
            return None
        return self.finish_s - self.arrival_s


@dataclass
class SecondSample:
    """A snapshot of one rank's memory and scheduler queue at time ``t_s``."""

    policy: str
    t_s: float
    rank: int
    kv_used_blocks: int
    kv_total_blocks: int
    weight_bytes: int      # bytes held by model weights on this rank
    kv_bytes: int          # bytes of the whole KV pool (used and free blocks)
    free_bytes: int        # device memory neither weights nor KV pool
    queued: int
    running: int

    @property
    def kv_used_bytes(self) -> float:
        """Bytes of the KV pool in used blocks (pool bytes pro rata to used blocks)."""
        if self.kv_total_blocks <= 0:
            return 0.0
        return self.kv_bytes * self.kv_used_blocks / self.kv_total_blocks


@dataclass
class ClusterEvent:
    """A cluster action at time ``t_s``: ``kind`` is e.g. 'drop', 'restore', 'exchange'."""

    policy: str
    t_s: float
    kind: str
    detail: str = ""


def _enc_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}: {value!r}")
    return value


_SCALARS: dict[Any, tuple[Callable[[Any], str], Callable[[str], Any]]] = {
    float: (lambda v: repr(float(v)), float),
    int: (lambda v: str(operator.index(v)), int),
    str: (_enc_str, str),
}


def _codec(hint: Any) -> tuple[Callable[[Any], str], Callable[[str], Any]]:
    """(encode, decode) between a value of type ``hint`` and a CSV cell."""
    args = typing.get_args(hint)
    if _NONE in args:
        enc, dec = _codec(next(a for a in args if a is not _NONE))
        return (lambda v: "" if v is None else enc(v)), (lambda s: None if s == "" else dec(s))
    if typing.get_origin(hint) is list:
        enc, dec = _codec(args[0])
        return (lambda v: ";".join(enc(x) for x in v)), (lambda s: [dec(p) for p in s.split(";")] if s else [])
    if hint in _SCALARS:
        return _SCALARS[hint]
    raise TypeError(f"no CSV codec for {hint!r}")


@functools.cache
def _codecs(cls: type) -> dict[str, tuple[Callable[[Any], str], Callable[[str], Any]]]:
    hints = typing.get_type_hints(cls)
    return {f.name: _codec(hints[f.name]) for f in fields(cls)}


def write_csv(path: str | Path, items: Iterable[T], cls: type[T]) -> None:
    """Write dataclass ``items`` of type ``cls`` to ``path`` with a header row."""
    codecs = _codecs(cls)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(codecs)
        for item in items:
            writer.writerow(enc(getattr(item, name)) for name, (enc, _) in codecs.items())


def read_csv(path: str | Path, cls: type[T]) -> list[T]:
    """Read rows written by :func:`write_csv` back into ``cls`` instances.

    Raises ValueError when the header does not name exactly ``cls``'s fields in order.
    """
    codecs = _codecs(cls)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != list(codecs):
            raise ValueError(f"{path}: header {header} does not match {cls.__name__} fields {list(codecs)}")
        return [_row_to_item(cls, codecs, row, path, n) for n, row in enumerate(reader, start=2)]


def _row_to_item(cls: type[T], codecs: dict, row: list[str], path: str | Path, line: int) -> T:
    if len(row) != len(codecs):
        raise ValueError(f"{path}:{line}: expected {len(codecs)} cells, got {len(row)}")
    try:
        return cls(**{name: dec(cell) for (name, (_, dec)), cell in zip(codecs.items(), row)})
    except ValueError as exc:
        raise ValueError(f"{path}:{line}: {exc}") from exc


def write_requests_csv(path: str | Path, records: Iterable[RequestRecord]) -> None:
    """Write request records to ``path`` (token times as one ``;``-joined column)."""
    write_csv(path, records, RequestRecord)


def read_requests_csv(path: str | Path) -> list[RequestRecord]:
    """Read request records written by :func:`write_requests_csv`."""
    return read_csv(path, RequestRecord)


def write_samples_csv(path: str | Path, samples: Iterable[SecondSample]) -> None:
    """Write memory/queue samples to ``path``."""
    write_csv(path, samples, SecondSample)


def read_samples_csv(path: str | Path) -> list[SecondSample]:
    """Read samples written by :func:`write_samples_csv`."""
    return read_csv(path, SecondSample)


def write_events_csv(path: str | Path, events: Iterable[ClusterEvent]) -> None:
    """Write cluster events to ``path``."""
    write_csv(path, events, ClusterEvent)


def read_events_csv(path: str | Path) -> list[ClusterEvent]:
    """Read cluster events written by :func:`write_events_csv`."""
    return read_csv(path, ClusterEvent)


def by_policy(items: Iterable[T]) -> dict[str, list[T]]:
    """Group records, samples or events by their ``policy``, in order of first appearance."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(item.policy, []).append(item)
    return groups
