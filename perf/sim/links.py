"""Links and the transfers that share them.

A ``Link`` is one direction of a connection (NVLink, PCIe to the host, InfiniBand, or a
CPU host's memory bus): its bandwidth and latency are per direction, so a swap both ways
at once does not halve either way. A transfer crosses a path of links; it pays the path's
latency once, then moves its bytes at the rate its share of the path allows. Links are
shared fairly: a link with k transfers on it gives each 1/k of its bandwidth, and a
transfer's rate is its smallest share along its path (a simple processor-sharing model;
max-min fairness would let a transfer held back elsewhere leave its share to others).
Rates are recomputed whenever a transfer starts or ends, and each transfer's completion
event moves with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from perf.sim.clock import Event, EventLoop

_EPS_BYTES = 1e-6
"""A transfer within this many bytes of its end is done (floating-point slack)."""


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float
    """Bytes per second, this direction."""
    latency: float = 0.0
    """Seconds before the first byte arrives."""

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"link {self.name}: bandwidth must be > 0, got {self.bandwidth}")
        if self.latency < 0:
            raise ValueError(f"link {self.name}: latency must be >= 0, got {self.latency}")


@dataclass(eq=False)
class Transfer:
    path: tuple[Link, ...]
    nbytes: float
    on_done: Callable[[Transfer], None]
    started: float
    remaining: float = 0.0
    rate: float = 0.0
    since: float = 0.0
    """When ``remaining`` was last brought up to date."""
    finished: float | None = None
    _event: Event | None = field(default=None, repr=False)

    @property
    def seconds(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


class Network:
    """The transfers in flight and the links they share, on one clock."""

    def __init__(self, clock: EventLoop) -> None:
        self.clock = clock
        self._active: list[Transfer] = []
        self.bytes_moved: dict[str, float] = {}
        """Per link name, bytes that crossed it."""

    def transfer(self, path: Sequence[Link], nbytes: float, on_done: Callable[[Transfer], None]) -> Transfer:
        """Start moving ``nbytes`` over ``path``; ``on_done(transfer)`` runs when the last byte lands."""
        if not path:
            raise ValueError("a transfer needs at least one link")
        if nbytes < 0:
            raise ValueError(f"cannot move {nbytes} bytes")
        t = Transfer(tuple(path), float(nbytes), on_done, self.clock.now, remaining=float(nbytes))
        latency = sum(link.latency for link in t.path)
        self.clock.after(latency, lambda: self._begin(t))
        return t

    @property
    def active(self) -> int:
        return len(self._active)

    def _begin(self, t: Transfer) -> None:
        self._advance()
        self._active.append(t)
        t.since = self.clock.now
        self._reschedule()

    def _advance(self) -> None:
        """Bring every transfer's remaining bytes up to now at its current rate."""
        now = self.clock.now
        for t in self._active:
            moved = t.rate * (now - t.since)
            t.remaining -= moved
            t.since = now
            for link in t.path:
                self.bytes_moved[link.name] = self.bytes_moved.get(link.name, 0.0) + moved

    def _reschedule(self) -> None:
        load: dict[Link, int] = {}
        for t in self._active:
            for link in t.path:
                load[link] = load.get(link, 0) + 1
        for t in self._active:
            t.rate = min(link.bandwidth / load[link] for link in t.path)
            if t._event is not None:
                t._event.cancel()
            delay = max(0.0, t.remaining) / t.rate
            t._event = self.clock.after(delay, lambda t=t: self._end(t))

    def _end(self, t: Transfer) -> None:
        self._advance()
        if t.remaining > _EPS_BYTES * max(1.0, t.nbytes):  # a rate changed after this event was set
            self._reschedule()
            return
        t.remaining = 0.0
        t.finished = self.clock.now
        t._event = None
        self._active.remove(t)
        self._reschedule()
        t.on_done(t)
