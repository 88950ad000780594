"""What waits for a rank's loop to turn (``perf.sim.loop_turns``): the controller's actions
on rank 0, and the KV mover's copies on both of their ranks."""

from __future__ import annotations

import pytest

from perf.sim.instance import SimRequest
from perf.sim.loop_turns import turn_bound_copy
from tests.perf.sim.sim_helpers import COST, LAYERS, context, simulate


def test_an_action_for_a_computing_rank_runs_when_its_job_ends():
    ctx = context(pages=400)
    rank, ran = ctx.rank(1), []
    assert rank.at_turn(lambda: ran.append("idle")) is False and ran == ["idle"]  # an idle loop: at once
    rank.run(0.5, lambda: ran.append("job done"))
    assert rank.at_turn(lambda: ran.append("a")) is True
    rank.at_turn(lambda: ran.append("b"))
    ctx.clock.run()
    assert ran == ["idle", "a", "b", "job done"]  # the turn comes before the next launch
    assert ctx.clock.now == pytest.approx(0.5)


def test_a_copy_is_posted_and_seen_at_each_side_s_turns():
    ctx = context(pages=400)
    ctx.rank(0).run(1.0, lambda: None)  # rank 0 computes for a second; rank 1 is idle
    landed = []
    turn_bound_copy(ctx, 1, 0, 1 << 20, lambda: landed.append(ctx.clock.now))
    ctx.clock.run()
    copy = (1 << 20) / ctx.fabric.path(1, 0)[0].bandwidth
    assert landed == [pytest.approx(1.0 + copy, rel=1e-3)]  # posted when rank 0 turned, not before
    assert ctx.net.bytes_moved and sum(ctx.net.bytes_moved.values()) > 0  # the bytes did move


def test_another_instance_s_tokens_and_an_arrival_wait_for_rank_0_s_step():
    # Rank 0 prefills 448 tokens in 7 steps of the 64-token budget, one after another; rank 1
    # serves a short request meanwhile. Every token of rank 1 reaches the client only when
    # rank 0's step in progress ends, and so does an arrival dispatched during one.
    long = SimRequest("long", 0.0, [1] * 448, max_tokens=1)
    short = SimRequest("short", 0.001, [2] * 8, max_tokens=3)
    ctx = context(pages=2000)
    simulate([long, short], 2, ctx)
    step0 = COST.step_cost([(64, 0)], LAYERS)
    ends = [sum(COST.step_cost([(64, 64 * j)], LAYERS) for j in range(i + 1)) for i in range(7)]
    first = step0 + COST.step_cost([(8, 0)], LAYERS)  # dispatched when rank 0's first step ended
    assert short.token_times_s[0] == pytest.approx(min(e for e in ends if e >= first - 1e-12))
    assert all(any(t == pytest.approx(e) for e in ends) for t in short.token_times_s)
    assert ctx.controller.deferred >= 4  # the arrival and three tokens (and ticks) waited
    assert long.token_times_s == [pytest.approx(ends[-1])]  # rank 0's own token: at once
