"""LoadMonitor: overload votes, trends, restore hysteresis, window eviction, config checks."""

from __future__ import annotations

import pytest

from orchestrator.kunserve.load_monitor import LoadMonitor, LoadSample, MonitorConfig

CAPACITY = 1000


def sample(t: float, demand: int, *, instance: int = 0, queued: int = 0, free: int | None = None,
           waiting: int = 0) -> LoadSample:
    """A sample of a 1,000-token pool; what is not free is used."""
    free = max(0, CAPACITY - demand) if free is None else free
    return LoadSample(instance=instance, time=t, capacity_tokens=CAPACITY, demand_tokens=demand,
                      used_tokens=CAPACITY - free, queued_tokens=queued, free_tokens=free,
                      num_waiting=waiting)


def feed(monitor: LoadMonitor, start: float, demands: list[int], **kw) -> float:
    """Add one sample per second; return the next time."""
    for i, demand in enumerate(demands):
        monitor.add(sample(start + i, demand, **kw))
    return start + len(demands)


# --- overload vote -----------------------------------------------------------------------

def test_votes_overload_needs_high_level_and_blocked_queue():
    m = LoadMonitor()
    m.add(sample(0.0, 1200, queued=300, free=20, waiting=2))
    assert m.level(0) == pytest.approx(1.2)
    assert m.votes_overload(0)


def test_no_vote_when_queue_can_be_admitted():
    m = LoadMonitor()
    m.add(sample(0.0, 960, queued=30, free=40, waiting=1))
    assert not m.votes_overload(0)


def test_no_vote_without_queue_or_below_level():
    m = LoadMonitor()
    m.add(sample(0.0, 990, queued=0, free=0))  # full but nothing waits
    m.add(sample(0.0, 900, instance=1, queued=200, free=100, waiting=1))  # queue blocked, level 0.9
    assert not m.votes_overload(0)
    assert not m.votes_overload(1)


def test_vote_uses_latest_sample_and_threshold_is_inclusive():
    m = LoadMonitor()
    m.add(sample(0.0, 1500, queued=600, free=0, waiting=3))
    m.add(sample(1.0, 950, queued=10, free=10, waiting=1))
    assert m.level(0) == pytest.approx(0.95)
    assert m.votes_overload(0)
    m.add(sample(2.0, 500, queued=0, free=500))
    assert not m.votes_overload(0)


def test_unknown_instance():
    m = LoadMonitor()
    assert not m.votes_overload(7)
    assert not m.wants_restore(7)
    assert m.trend(7) == 0.0
    assert m.history(7) == ()
    with pytest.raises(KeyError, match="instance 7"):
        m.level(7)


# --- trend ----------------------------------------------------------------------------------

def test_trend_sign_and_value():
    m = LoadMonitor()
    feed(m, 100.0, [100 + 10 * i for i in range(10)], instance=0)  # +0.01 per second
    feed(m, 100.0, [900 - 50 * i for i in range(10)], instance=1)
    feed(m, 100.0, [300] * 10, instance=2)
    assert m.trend(0) == pytest.approx(0.01)
    assert m.trend(1) == pytest.approx(-0.05)
    assert abs(m.trend(2)) < 1e-12


def test_trend_is_zero_with_too_few_samples():
    m = LoadMonitor(MonitorConfig(min_trend_samples=5))
    feed(m, 0.0, [100, 200, 300, 400])
    assert m.trend(0) == 0.0
    m.add(sample(4.0, 500))
    assert m.trend(0) > 0


def test_trend_uses_time_not_sample_index():
    m = LoadMonitor(MonitorConfig(min_trend_samples=3))
    for t, demand in [(0.0, 100), (10.0, 200), (30.0, 400)]:  # uneven spacing, +0.01/s
        m.add(sample(t, demand))
    assert m.trend(0) == pytest.approx(0.01)


# --- restore hysteresis -------------------------------------------------------------------

def test_one_low_sample_among_high_ones_does_not_restore():
    m = LoadMonitor()
    t = feed(m, 0.0, [900] * 15, waiting=2, queued=100)
    m.add(sample(t, 100))
    assert not m.wants_restore(0)
    t = feed(m, t + 1, [900] * 3, waiting=2, queued=100)
    t = feed(m, t, [100] * 9)
    assert not m.wants_restore(0)  # patience 10, only 9 low in a row


def test_patience_low_samples_with_falling_trend_restore():
    m = LoadMonitor()
    t = feed(m, 0.0, [900] * 15, waiting=2, queued=100)
    t = feed(m, t, [400 - 20 * i for i in range(9)])
    assert not m.wants_restore(0)
    m.add(sample(t, 200))
    assert m.trend(0) < 0
    assert m.wants_restore(0)


def test_waiting_requests_block_restore():
    m = LoadMonitor()
    t = feed(m, 0.0, [900] * 15, waiting=2, queued=100)
    t = feed(m, t, [100] * 9)
    m.add(sample(t, 100, waiting=1, queued=5))
    assert not m.wants_restore(0)


def test_rising_trend_blocks_restore():
    m = LoadMonitor(MonitorConfig(window=10, restore_patience=10))
    feed(m, 0.0, [100 + 30 * i for i in range(10)])  # all low, but climbing
    assert m.level(0) <= 0.5
    assert m.trend(0) > 0
    assert not m.wants_restore(0)


def test_flat_low_load_restores():
    m = LoadMonitor()
    feed(m, 1e6, [300] * 30)  # large clock values: float rounding must not read as rising
    assert m.wants_restore(0)


def test_restore_needs_enough_history():
    m = LoadMonitor(MonitorConfig(restore_patience=2, min_trend_samples=5))
    feed(m, 0.0, [100] * 4)
    assert not m.wants_restore(0)
    m.add(sample(4.0, 100))
    assert m.wants_restore(0)


# --- window, forget, snapshot ---------------------------------------------------------------

def test_window_evicts_oldest_samples():
    m = LoadMonitor(MonitorConfig(window=5, min_trend_samples=3, restore_patience=5))
    t = feed(m, 0.0, [900, 800, 700])
    t = feed(m, t, [200] * 5)
    history = m.history(0)
    assert len(history) == 5
    assert [s.time for s in history] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert m.trend(0) == pytest.approx(0.0)  # the falling start has left the window
    assert m.wants_restore(0)


def test_forget_and_snapshot():
    m = LoadMonitor()
    feed(m, 0.0, [100, 200], instance=0)
    feed(m, 0.0, [300], instance=1)
    snap = m.snapshot()
    assert set(snap) == {0, 1}
    assert snap[0].demand_tokens == 200 and snap[0].time == 1.0
    m.forget(0)
    m.forget(42)  # unknown: nothing to do
    assert m.instances() == [1]
    assert 0 not in m.snapshot()


def test_samples_must_not_go_back_in_time():
    m = LoadMonitor()
    m.add(sample(5.0, 100))
    m.add(sample(5.0, 100))  # same instant is fine
    with pytest.raises(ValueError, match="monotonic"):
        m.add(sample(4.0, 100))


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"min_trend_samples": 1}, "min_trend_samples must be >= 2"),
    ({"window": 4, "min_trend_samples": 5, "restore_patience": 3}, "window"),
    ({"restore_level": 0.0}, "restore_level < overload_level"),
    ({"restore_level": 0.96}, "restore_level < overload_level"),
    ({"overload_level": 1.1}, "overload_level <= 1"),
    ({"restore_patience": 0}, "restore_patience"),
    ({"restore_patience": 31}, "restore_patience"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MonitorConfig(**kwargs)


def test_sample_validation():
    with pytest.raises(ValueError, match="capacity_tokens must be positive"):
        LoadSample(0, 0.0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="queued_tokens must be >= 0"):
        LoadSample(0, 0.0, 10, 0, 0, -1, 0, 0)
    with pytest.raises(ValueError, match="time must be finite"):
        LoadSample(0, float("nan"), 10, 0, 0, 0, 0, 0)
