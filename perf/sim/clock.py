"""The simulated clock: events at simulated times, taken in time order.

Events at the same time run in the order they were scheduled, so a run is deterministic.
An event is a callable; it may schedule more. Cancelling marks an event dead (it stays
in the heap and is skipped), which keeps cancellation O(1).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Event:
    """One scheduled call; ``cancel`` marks it dead."""

    __slots__ = ("time", "seq", "fn", "cancelled")

    def __init__(self, time: float, seq: int, fn: Callable[[], None]) -> None:
        self.time = time
        self.seq = seq
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """Simulated time, in seconds from 0.

    The heap holds ``(time, seq, event)`` tuples: tuples compare in C, and the sequence
    number breaks ties in scheduling order before the event itself is ever compared."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Event]] = []
        self._seq = itertools.count()
        self.processed = 0
        """Events run so far (cancelled ones not counted)."""

    def at(self, time: float, fn: Callable[[], None]) -> Event:
        """Run ``fn`` at simulated ``time`` (not before now)."""
        if time < self.now:
            raise ValueError(f"cannot schedule at {time:.9f} s: the clock is at {self.now:.9f} s")
        seq = next(self._seq)
        event = Event(time, seq, fn)
        heapq.heappush(self._queue, (time, seq, event))
        return event

    def after(self, delay: float, fn: Callable[[], None]) -> Event:
        if delay < 0:
            raise ValueError(f"a delay must be >= 0, got {delay}")
        return self.at(self.now + delay, fn)

    @property
    def pending(self) -> int:
        return sum(not e.cancelled for _, _, e in self._queue)

    def run(self, until: float | None = None, max_events: int | None = None) -> None:
        """Take events in time order until none is left or the next is after ``until``
        (the clock then stands at ``until``), or ``max_events`` have run (a test's bound)."""
        stop = None if max_events is None else self.processed + max_events
        queue, pop = self._queue, heapq.heappop
        while queue and (stop is None or self.processed < stop):
            time, _, event = queue[0]
            if until is not None and time > until:
                break
            pop(queue)
            if event.cancelled:
                continue
            self.now = time
            self.processed += 1
            event.fn()
        if until is not None and until > self.now:
            self.now = until
