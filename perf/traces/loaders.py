"""Readers for public request-trace formats (Azure LLM inference, BurstGPT, Mooncake).

Every loader validates strictly: a file that is not the format it claims, or a row that
cannot be a request, is a :class:`TraceFormatError` naming the file, the line and the reason,
rather than a trace that silently replays something else. Loaded traces are re-based so
that the first request arrives at 0 s.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from perf.traces.model import Trace, TraceFormatError, TraceRequest

PathLike = str | os.PathLike[str]

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# Total tokens and Log Type are part of the format but unused, so a file without them still loads.
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens")
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")

# (arrival in the file's own clock, input_len, output_len, line number)
_Row = tuple  # (seconds, input tokens, output tokens, line[, block hashes])
MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per ``hash_ids`` block in the Mooncake traces."""


def load_azure(path: PathLike) -> Trace:
    """Load an Azure LLM inference trace (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    rows: list[_Row] = []
    origin: datetime | None = None
    for line, (stamp, ctx, gen) in _csv_records(path, AZURE_COLUMNS):
        when = _wallclock(path, line, stamp)
        # Offsets from the first row, not epoch seconds: a float holding ~1.7e9 s loses sub-µs digits.
        origin = origin or when
        rows.append(((when - origin).total_seconds(), _prompt_len(path, line, "ContextTokens", ctx),
                     _count(path, line, "GeneratedTokens", gen), line))
    return _build_trace(path, Path(path).stem, rows)


def load_burstgpt(path: PathLike, model: str | None = None, drop_failed: bool = True) -> Trace:
    """Load a BurstGPT trace, optionally only the requests to ``model``.

    Failed requests (``Response tokens`` = 0) are dropped unless ``drop_failed`` is False, in
    which case they replay as requests with no output.
    """
    rows: list[_Row] = []
    for line, (stamp, row_model, req, resp) in _csv_records(path, BURSTGPT_COLUMNS):
        # Validate the whole row before filtering, so a corrupt file is never half-accepted.
        arrival = _seconds(path, line, "Timestamp", stamp)
        input_len = _count(path, line, "Request tokens", req)
        output_len = _count(path, line, "Response tokens", resp)
        if (model is not None and row_model != model) or (drop_failed and output_len == 0):
            continue
        if input_len == 0:
            raise _no_prompt(path, line, "Request tokens")
        rows.append((arrival, input_len, output_len, line))
    name = Path(path).stem if model is None else f"{Path(path).stem}[{model}]"
    return _build_trace(path, name, rows)


def load_mooncake(path: PathLike) -> Trace:
    """Load a Mooncake JSON-lines trace (``timestamp`` in ms, ``input_length``, ``output_length``)."""
    rows: list[_Row] = []
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if text.strip():
                rows.append(_mooncake_row(path, line, text))
    return _build_trace(path, Path(path).stem, rows)


LOADERS: dict[str, Callable[..., Trace]] = {
    "azure": load_azure,
    "burstgpt": load_burstgpt,
    "mooncake": load_mooncake,
}


def sniff_format(path: PathLike) -> str:
    """The :data:`LOADERS` key for ``path``, judged from its header or first line."""
    first = _first_line(path)
    if first.lstrip().startswith("{"):
        return "mooncake"
    header = {h.strip() for h in next(csv.reader([first]))}
    for fmt, columns in (("azure", AZURE_COLUMNS), ("burstgpt", BURSTGPT_COLUMNS)):
        if set(columns) <= header:
            return fmt
    raise TraceFormatError(path, f"unrecognized trace format (known: {', '.join(LOADERS)}); "
                                 f"first line is {first[:200]!r}", line=1)


def load_trace(path: PathLike, fmt: str = "auto", **options: Any) -> Trace:
    """Load ``path`` with the loader for ``fmt`` (a :data:`LOADERS` key, or ``auto`` to sniff).

    ``options`` go to the loader, e.g. ``model=`` for BurstGPT.
    """
    if fmt == "auto":
        fmt = sniff_format(path)
    loader = LOADERS.get(fmt)
    if loader is None:
        raise ValueError(f"unknown trace format fmt={fmt!r}; known: auto, {', '.join(LOADERS)}")
    return loader(path, **options)


# --- shared plumbing ---------------------------------------------------------------------


def _build_trace(path: PathLike, name: str, rows: list[_Row]) -> Trace:
    if not rows:
        raise TraceFormatError(path, "the trace has no requests")
    t0 = min(r[0] for r in rows)
    return Trace([TraceRequest(t - t0, i, o, line, *rest) for t, i, o, line, *rest in rows], name=name)


def _csv_records(path: PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, the ``required`` fields in order) for each non-blank data row."""
    # utf-8-sig: files exported on Windows often start with a byte-order mark.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        columns = _column_indices(path, next(reader, None), required)
        width = max(columns) + 1
        for row in reader:
            if not row:
                continue
            if len(row) < width:
                raise TraceFormatError(path, f"expected at least {width} fields, got {len(row)}",
                                       reader.line_num)
            yield reader.line_num, [row[i] for i in columns]


def _column_indices(path: PathLike, header: list[str] | None, required: tuple[str, ...]) -> list[int]:
    if header is None:
        raise TraceFormatError(path, "the file is empty")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceFormatError(path, f"missing column(s) {', '.join(missing)}; header is {header}",
                               line=1)
    return [header.index(c) for c in required]


def _first_line(path: PathLike) -> str:
    with open(path, encoding="utf-8-sig") as f:
        for text in f:
            if text.strip():
                return text.rstrip("\r\n")
    raise TraceFormatError(path, "the file is empty")


def _wallclock(path: PathLike, line: int, text: str) -> datetime:
    """An ISO date-time; naive ones are read as UTC so that local DST shifts cannot apply."""
    try:
        stamp = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TraceFormatError(path, f"TIMESTAMP is not a date-time: {text!r}", line) from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _seconds(path: PathLike, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceFormatError(path, f"{column} is not a number: {text!r}", line) from None
    if not math.isfinite(value):
        raise TraceFormatError(path, f"{column} is not finite: {text!r}", line)
    return value


def _count(path: PathLike, line: int, column: str, text: str) -> int:
    """A non-negative token count; ``12.0`` is refused, as it hints at a misread column."""
    try:
        value = int(text)
    except ValueError:
        raise TraceFormatError(path, f"{column} is not an integer: {text!r}", line) from None
    if value < 0:
        raise TraceFormatError(path, f"{column} is negative: {value}", line)
    return value


def _prompt_len(path: PathLike, line: int, column: str, text: str) -> int:
    value = _count(path, line, column, text)
    if value == 0:
        raise _no_prompt(path, line, column)
    return value


def _no_prompt(path: PathLike, line: int, column: str) -> TraceFormatError:
    return TraceFormatError(path, f"{column} is 0; a request needs at least one prompt token", line)


def _mooncake_row(path: PathLike, line: int, text: str) -> _Row:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(path, f"not valid JSON: {exc.msg}", line) from None
    if not isinstance(obj, dict):
        raise TraceFormatError(path, f"expected a JSON object, got {type(obj).__name__}", line)
    missing = [k for k in MOONCAKE_KEYS if k not in obj]
    if missing:
        raise TraceFormatError(path, f"missing key(s) {', '.join(missing)}", line)
    stamp = obj["timestamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
        raise TraceFormatError(path, f"timestamp is not a number: {stamp!r}", line)
    input_len = _json_count(path, line, "input_length", obj["input_length"])
    if input_len == 0:
        raise _no_prompt(path, line, "input_length")
    hashes = obj.get("hash_ids", [])
    if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes):
        raise TraceFormatError(path, f"hash_ids is not a list of integers: {hashes!r}", line)
    if hashes and not (len(hashes) - 1) * MOONCAKE_BLOCK_TOKENS < input_len <= len(hashes) * MOONCAKE_BLOCK_TOKENS:
        raise TraceFormatError(path, f"{len(hashes)} hash_ids of {MOONCAKE_BLOCK_TOKENS} tokens do not cover "
                                     f"input_length {input_len}", line)
    output = _json_count(path, line, "output_length", obj["output_length"])
    return stamp / 1000.0, input_len, output, line, tuple(hashes)


def _json_count(path: PathLike, line: int, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceFormatError(path, f"{key} is not an integer: {value!r}", line)
    if value < 0:
        raise TraceFormatError(path, f"{key} is negative: {value}", line)
    return value
