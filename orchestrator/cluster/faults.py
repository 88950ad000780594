"""Faults injected on purpose. This exists for tests only.

The test suite takes the cluster's fallback paths on purpose, through the environment
variable ``KUNSERVE_TEST_FAULTS``: a comma-separated list of the fields below, a flag by
its name (``restore_no_room``) and a number as ``name=value`` (``exchange_timeout_s=1``).
Nothing in a normal run sets it. Every rank reads it once at start; a rank that runs with
faults logs a warning naming them, so a fault left on by mistake shows in the log, and an
unknown name stops the start-up with an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

logger = logging.getLogger(__name__)

ENV = "KUNSERVE_TEST_FAULTS"

EXCHANGE_TIMEOUT_S = 30.0
"""How long the leader waits for an exchange batch before recomputing its requests."""


@dataclass(frozen=True)
class Faults:
    """The faults in force on this rank (all off by default)."""

    exchange_stall: bool = False
    """Members ignore a drop's exchange batches (posting nothing), so every batch times out
    and the leader recomputes its requests: the exchange-timeout fallback."""
    exchange_timeout_s: float = EXCHANGE_TIMEOUT_S
    """The leader's exchange-batch timeout (short in tests that stall the exchange)."""
    restore_no_room: bool = False
    """A restore finds no member with room in its base region for any request's KV, so it
    recomputes every request that holds KV: the restore's recompute fallback."""

    @property
    def active(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]

    @classmethod
    def parse(cls, text: str) -> "Faults":
        """``"exchange_stall,exchange_timeout_s=1"`` -> Faults; ValueError naming a bad entry."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, raw = item.partition("=")
            f = known.get(name)
            if f is None:
                raise ValueError(f"{ENV}: unknown fault {name!r} (known: {', '.join(known)})")
            try:
                values[name] = float(raw) if f.type == "float" else _flag(raw)
            except ValueError:
                raise ValueError(f"{ENV}: bad value {raw!r} for {name}") from None
        return cls(**values)

    @classmethod
    def from_env(cls) -> "Faults":
        faults = cls.parse(os.environ.get(ENV, ""))
        if faults.active:
            logger.warning("test faults in force (%s=%s): %s", ENV, os.environ[ENV], ", ".join(faults.active))
        return faults


def _flag(raw: str) -> bool:
    if raw in ("", "1", "true"):
        return True
    if raw in ("0", "false"):
        return False
    raise ValueError(raw)
