"""The step cost model: estimated seconds of one step of one pipeline stage.

DESIGN.md section 2, step 6. A step's time is a fixed overhead, plus per sequence, plus
linear work per new token (the GEMMs), plus attention work: a chunk of ``n`` new tokens
after ``s`` cached ones attends ``n*s + n*(n+1)/2`` (query, key) pairs. The four
coefficients are fitted by least squares to steps timed on the actual host
(``python -m perf.profile_cost``) and kept in a small JSON file.

Two properties the lookahead planner relies on: the cost is additive over chunks, and
the attention work of a prefill does not depend on how it is split (token ``p`` of a
sequence always attends ``p + 1`` keys), so splitting a prefill only adds ``per_seq_s``
per extra chunk.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import EngineError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_COEFFICIENTS = ("fixed_s", "per_token_s", "per_attention_s", "per_seq_s")


class CostModelError(EngineError):
    """A cost model file is missing or corrupt, or a fit was given unusable samples."""


def attention_work(n: int, s: int) -> int:
    """(query, key) pairs a chunk of ``n`` new tokens after ``s`` cached ones attends."""
    return n * s + n * (n + 1) // 2


@dataclass(frozen=True)
class CostModel:
    """Estimated seconds of one step of one stage, from the step's chunks ``(n, s)``."""

    fixed_s: float
    """Seconds every step pays whatever it holds (launch, index building, embedding)."""
    per_token_s: float
    """Seconds per new token: the GEMMs, norms and RoPE, linear in tokens."""
    per_attention_s: float
    """Seconds per unit of attention work (see ``attention_work``)."""
    per_seq_s: float
    """Seconds per sequence in the step (its attention call, KV gather, sampled row)."""
    layers: int
    """Decoder layers the profile ran; a stage of ``k`` layers costs ``k / layers`` as much."""
    host: str = ""
    """Host the profile was taken on (costs do not carry over to other hardware)."""
    dtype: str = ""
    """Compute dtype of the profile."""
    threads: int = 0
    """Intra-op threads of the profile (CPU), 0 if unknown."""
    model: str = ""
    """Model (store) the profile was taken on."""
    r2: float | None = None
    """Coefficient of determination of the fit on its own samples, None if not fitted."""
    samples: int = 0
    """Timed steps the fit used."""

    def __post_init__(self) -> None:
        for name in _COEFFICIENTS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.layers, int) or isinstance(self.layers, bool) or self.layers < 1:
            raise ValueError(f"layers must be an integer >= 1, got {self.layers!r}")

    def scale(self, layers: int | None) -> float:
        """Factor from the profiled layer count to a stage of ``layers`` layers (None: 1)."""
        if layers is None:
            return 1.0
        if layers < 1:
            raise ValueError(f"a stage has at least one layer, got {layers}")
        return layers / self.layers

    def chunk_cost(self, n: int, s: int) -> float:
        """Seconds one chunk of ``n`` new tokens at prefix ``s`` adds to a step (profiled layers)."""
        return self.per_seq_s + self.per_token_s * n + self.per_attention_s * attention_work(n, s)

    def step_cost(self, chunks: list[tuple[int, int]], layers: int | None = None) -> float:
        """Seconds of one step holding ``chunks`` ``(n, s)`` on a stage of ``layers`` layers.

        An empty step is not run, so it costs nothing. The whole cost scales with the layer
        count, the fixed part included: an approximation for stages that also carry the
        embedding or the LM head.
        """
        if not chunks:
            return 0.0
        total = self.fixed_s + sum(self.chunk_cost(n, s) for n, s in chunks)
        return total * self.scale(layers)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, with the format version."""
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> "CostModel":
        """Parse ``to_json``'s output; raises CostModelError naming what is wrong."""
        if not isinstance(data, dict):
            raise CostModelError("expected a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise CostModelError(f"format_version is {data.get('format_version')!r}, "
                                 f"this version reads {FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        missing = [k for k in (*_COEFFICIENTS, "layers") if k not in data]
        if missing:
            raise CostModelError(f"missing field {missing[0]!r}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise CostModelError(str(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """Read a cost model file written by ``save``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CostModelError(f"cost model file {path} is missing; make one with: "
                                 "python -m perf.profile_cost --engine-dir DIR --out FILE") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CostModelError(f"cost model file {path} is corrupt: {exc}") from None
        try:
            return cls.from_json(data)
        except CostModelError as exc:
            raise CostModelError(f"cost model file {path} is corrupt: {exc}") from None

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the model as JSON, atomically (a reader never sees half a file). ``extra``
        adds keys this class does not read (``perf.profile_cost`` keeps its timed steps
        there for the simulator); it may not shadow a field."""
        path = Path(path)
        data = self.to_json()
        if extra and (clash := set(extra) & set(data)):
            raise ValueError(f"extra keys shadow the model's fields: {sorted(clash)}")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({**data, **(extra or {})}, indent=2) + "\n")
        os.replace(tmp, path)


def features(chunks: list[tuple[int, int]]) -> list[float]:
    """The fit's regressors for one step: 1, tokens, attention work, sequences."""
    return [1.0, float(sum(n for n, _ in chunks)),
            float(sum(attention_work(n, s) for n, s in chunks)), float(len(chunks))]


def fit(samples: list[tuple[list[tuple[int, int]], float]], layers: int, *,
        relative: bool = True, **meta: Any) -> CostModel:
    """Fit a CostModel to timed steps ``(chunks, seconds)`` by least squares.

    ``relative`` weights each step by 1/seconds, so the fit minimizes relative rather than
    absolute error: otherwise the few multi-second prefills would decide every coefficient
    and decode steps, a thousand times shorter, would be fitted to noise. A coefficient
    that comes out negative is clipped to 0 and the others refitted without it (an active
    set, at most four solves), so the clip does not leave the rest biased. ``meta`` fills
    the metadata fields (host, dtype, threads, model).
    """
    if len(samples) < len(_COEFFICIENTS):
        raise CostModelError(f"a fit needs at least {len(_COEFFICIENTS)} samples, got {len(samples)}")
    x = np.array([features(chunks) for chunks, _ in samples], dtype=np.float64)
    y = np.array([t for _, t in samples], dtype=np.float64)
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise CostModelError("measured step times must be finite and positive")
    w = 1.0 / y if relative else np.ones_like(y)
    coef = nonnegative_lstsq(x * w[:, None], y * w)
    pred = x @ coef
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    model = CostModel(*(float(c) for c in coef), layers=layers, r2=r2, samples=len(samples), **meta)
    logger.info("fitted cost model: %s", model)
    return model


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: drop the most negative column, refit, repeat."""
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        cols = a[:, active]
        # Columns span 1 to ~1e6: scale them to unit norm so the solve is well conditioned.
        norms = np.linalg.norm(cols, axis=0)
        norms[norms == 0] = 1.0
        sol = np.linalg.lstsq(cols / norms, b, rcond=None)[0] / norms
        if np.all(sol >= 0):
            coef[active] = sol
            return coef
        del active[int(np.argmin(sol))]
    return coef
