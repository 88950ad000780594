"""The simulator's clock and links: events in time order (ties in scheduling order), and
transfers that share a link's bandwidth, each direction on its own."""

from __future__ import annotations

import pytest

from perf.sim.clock import EventLoop
from perf.sim.links import Link, Network

GB = 1e9


def test_events_run_in_time_order_and_ties_in_the_order_scheduled():
    clock, seen = EventLoop(), []
    clock.at(2.0, lambda: seen.append(("b", clock.now)))
    clock.at(1.0, lambda: seen.append(("a", clock.now)))
    clock.at(2.0, lambda: seen.append(("c", clock.now)))
    late = clock.at(3.0, lambda: seen.append(("never", clock.now)))
    late.cancel()
    clock.after(0.5, lambda: clock.after(0.25, lambda: seen.append(("nested", clock.now))))
    clock.run()
    assert seen == [("nested", 0.75), ("a", 1.0), ("b", 2.0), ("c", 2.0)]
    assert clock.processed == 5 and clock.pending == 0


def test_the_clock_stops_at_until_and_refuses_the_past():
    clock, seen = EventLoop(), []
    clock.at(5.0, lambda: seen.append(clock.now))
    clock.run(until=2.0)
    assert clock.now == 2.0 and seen == [] and clock.pending == 1
    with pytest.raises(ValueError, match="the clock is at 2"):
        clock.at(1.0, lambda: None)
    clock.run()
    assert seen == [5.0]


def _run(transfers):
    """Start (path, bytes, start time) transfers; return each one's seconds."""
    clock = EventLoop()
    net = Network(clock)
    out = {}
    for name, path, nbytes, start in transfers:
        clock.at(start, lambda name=name, path=path, nbytes=nbytes:
                 net.transfer(path, nbytes, lambda t, name=name: out.__setitem__(name, t.seconds)))
    clock.run()
    return out, net


def test_one_transfer_takes_latency_plus_bytes_over_bandwidth():
    link = Link("nvlink", 100 * GB, latency=2e-6)
    out, net = _run([("a", [link], 1 * GB, 0.0)])
    assert out["a"] == pytest.approx(0.01 + 2e-6)
    assert net.bytes_moved["nvlink"] == pytest.approx(1 * GB)


def test_transfers_on_one_link_share_it_and_speed_up_when_one_ends():
    link = Link("ib", 50 * GB)
    # Both at 25 GB/s until the small one ends (0.5 GB: 20 ms); the big one then has it all.
    out, _ = _run([("small", [link], 0.5 * GB, 0.0), ("big", [link], 1.5 * GB, 0.0)])
    assert out["small"] == pytest.approx(0.02)
    assert out["big"] == pytest.approx(0.02 + 1.0 * GB / (50 * GB))


def test_a_late_transfer_slows_the_one_in_flight_from_when_it_starts():
    link = Link("pcie", 10 * GB)
    out, _ = _run([("first", [link], 1 * GB, 0.0), ("second", [link], 0.5 * GB, 0.05)])
    # first: 0.5 GB alone in 50 ms, then shares: 0.5 GB more at 5 GB/s while second runs (100 ms)
    assert out["second"] == pytest.approx(0.1)
    assert out["first"] == pytest.approx(0.15)


def test_each_direction_and_each_link_is_its_own():
    there, back, other = Link("a->b", 10 * GB), Link("b->a", 10 * GB), Link("c->d", 10 * GB)
    out, _ = _run([("x", [there], 1 * GB, 0.0), ("y", [back], 1 * GB, 0.0), ("z", [other], 1 * GB, 0.0)])
    assert out == pytest.approx({"x": 0.1, "y": 0.1, "z": 0.1})


def test_a_path_moves_at_its_slowest_share():
    nvlink, ib = Link("nvlink", 400 * GB), Link("ib", 50 * GB)
    out, _ = _run([("cross", [nvlink, ib], 1 * GB, 0.0), ("local", [nvlink], 1 * GB, 0.0)])
    assert out["cross"] == pytest.approx(1 / 50)  # the IB hop binds (nvlink's half is 200 GB/s)
    # local shares nvlink at 200 GB/s until cross ends at 20 ms (4 GB would have moved), so by then it is done
    assert out["local"] == pytest.approx(1 / 200)


def test_bad_links_and_transfers_are_refused():
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        Link("x", 0)
    with pytest.raises(ValueError, match="at least one link"):
        Network(EventLoop()).transfer([], 1, lambda t: None)


def test_small_transfers_late_in_a_run_end_in_a_few_events():
    """Late in a run an ulp of the clock is 1e-14 s: a leftover of a rescheduled transfer must
    count as done, not be rescheduled at the same instant for ever (a livelock seen at 70B)."""
    clock = EventLoop()
    net, nvlink, done = Network(clock), Link("nvlink", 450 * GB), []
    for k in range(50):  # crowds that change a transfer's rate while it is in flight
        clock.at(3600.0 + k * 1e-9, lambda k=k: net.transfer([nvlink], 1000.0 + 7 * k, done.append))
    clock.run(max_events=50 * 60)
    assert len(done) == 50 and clock.pending == 0
