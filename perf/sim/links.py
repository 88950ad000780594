"""Links and the transfers that share them.

A ``Link`` is one direction of a connection (NVLink, PCIe to the host, InfiniBand, or a
CPU host's memory bus): its bandwidth and latency are per direction, so a swap both ways
at once does not halve either way. A transfer crosses a path of links; it pays the path's
latency once, then moves its bytes at the rate its share of the path allows. Links are
shared fairly: a link with k transfers on it gives each 1/k of its bandwidth (of its
efficiency at k, for a link whose crowd slows it), and a
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
"""A transfer within this share of its bytes of its end is done (floating-point slack)."""
_EPS_S = 1e-9
"""A transfer within this many seconds of its end is done: below the clock's resolution at
large times (an ulp of 100 s is 1.4e-14 s), a leftover would be rescheduled at the same
instant for ever."""


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float
    """Bytes per second, this direction."""
    latency: float = 0.0
    """Seconds before the first byte arrives."""
    efficiency: tuple[float, ...] = ()
    """With k transfers on the link, it moves ``efficiency[k - 1]`` of its bandwidth in all
    (the last entry for larger crowds; () for 1): a crowd that slows itself, such as ranks
    sharing a CPU host's cores and memory bus (``perf.sim.host_cost``)."""

    def __post_init__(self) -> None:
        # Links key the network's tables on every transfer: hash the fields once, not per lookup.
        object.__setattr__(self, "_hash", hash((self.name, self.bandwidth, self.latency, self.efficiency)))
        if not self.bandwidth > 0:
            raise ValueError(f"link {self.name}: bandwidth must be > 0, got {self.bandwidth}")
        if self.latency < 0:
            raise ValueError(f"link {self.name}: latency must be >= 0, got {self.latency}")
        if any(not 0 < e <= 1 for e in self.efficiency):
            raise ValueError(f"link {self.name}: efficiencies must be in (0, 1], got {self.efficiency}")

    def __hash__(self) -> int:
        return self._hash

    def share(self, crowd: int) -> float:
        """Bytes per second each of ``crowd`` transfers on this link gets."""
        eff = self.efficiency[min(crowd, len(self.efficiency)) - 1] if self.efficiency else 1.0
        return self.bandwidth * eff / crowd


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
    """The transfers in flight and the links they share, on one clock.

    A transfer's rate depends only on the loads of its own links, so when one starts or
    ends only the transfers sharing a link with it are brought up to date and rescheduled:
    the cost of an event is the crowd on its links, not the size of the cluster."""

    def __init__(self, clock: EventLoop) -> None:
        self.clock = clock
        self._on: dict[Link, list[Transfer]] = {}
        """Per link, the transfers in flight across it."""
        self._moved: dict[Link, float] = {}

    @property
    def bytes_moved(self) -> dict[str, float]:
        """Per link name, bytes that crossed it (transfers in flight counted to their last update)."""
        out: dict[str, float] = {}
        for link, n in self._moved.items():
            out[link.name] = out.get(link.name, 0.0) + n
        return out

    def transfer(self, path: Sequence[Link], nbytes: float, on_done: Callable[[Transfer], None]) -> Transfer:
        """Start moving ``nbytes`` over ``path``; ``on_done(transfer)`` runs when the last byte lands."""
        if not path:
            raise ValueError("a transfer needs at least one link")
        if nbytes < 0:
            raise ValueError(f"cannot move {nbytes} bytes")
        t = Transfer(tuple(path), float(nbytes), on_done, self.clock.now, remaining=float(nbytes))
        latency = sum(link.latency for link in t.path)
        if latency:
            self.clock.after(latency, lambda: self._begin(t))
        else:
            self._begin(t)
        return t

    @property
    def active(self) -> int:
        return len({id(t) for ts in self._on.values() for t in ts})

    def _neighbours(self, t: Transfer) -> list[Transfer]:
        if len(t.path) == 1:  # most transfers: a rank's compute, one link
            return list(self._on.get(t.path[0], ()))
        seen: dict[Transfer, None] = {}  # transfers hash by identity; insertion order kept
        for link in t.path:
            for u in self._on.get(link, ()):
                seen[u] = None
        return list(seen)

    def _advance(self, transfers: list[Transfer]) -> None:
        """Bring these transfers' remaining bytes up to now at their current rates."""
        now = self.clock.now
        for t in transfers:
            moved = t.rate * (now - t.since)
            t.remaining -= moved
            t.since = now
            if moved:
                for link in t.path:
                    self._moved[link] = self._moved.get(link, 0.0) + moved

    def _begin(self, t: Transfer) -> None:
        self._advance(self._neighbours(t))
        for link in t.path:
            self._on.setdefault(link, []).append(t)
        t.since = self.clock.now
        self._reschedule(self._neighbours(t))

    def _reschedule(self, transfers: list[Transfer]) -> None:
        on = self._on
        for t in transfers:
            path = t.path
            t.rate = (path[0].share(len(on[path[0]])) if len(path) == 1
                      else min(link.share(len(on[link])) for link in path))
            if t._event is not None:
                t._event.cancel()
            delay = max(0.0, t.remaining) / t.rate
            t._event = self.clock.after(delay, lambda t=t: self._end(t))

    def _end(self, t: Transfer) -> None:
        crowd = self._neighbours(t)
        self._advance(crowd)
        if t.remaining > max(_EPS_BYTES * max(1.0, t.nbytes), t.rate * _EPS_S):  # a rate changed since
            self._reschedule([t])
            return
        t.remaining = 0.0
        t.finished = self.clock.now
        t._event = None
        for link in t.path:
            self._on[link].remove(t)
            if not self._on[link]:
                del self._on[link]
        self._reschedule([u for u in crowd if u is not t])
        t.on_done(t)
