"""What a rank's loop does between its steps, and what therefore waits for them.

``orchestrator.cluster.rank_loop`` turns once per step. A turn receives the other ranks'
messages, polls the controller (on rank 0: it dispatches the requests the ingress posted,
hands tokens to the ingress and runs the control tick), advances the KV moves (posts their
next layers, tests the transfers in flight), and then runs this rank's next step, which
blocks the loop until it ends. So whatever a rank must do while it computes waits for the
step to end:

- an arrival is dispatched, another instance's token reaches its client, and the control
  tick runs at rank 0's next turn (``Controller``);
- a KV batch of a drop's exchange (or a restore's move, or a migration's copy) is posted by
  each side at its next turn after the batch message reaches it, is seen landed by each side
  at its next turn after the copy, and its completion reaches the leader at the leader's
  next turn (``turn_bound_copy``). On idle ranks (a drained group, a paused part) all of
  this is at once.

On this host the waits are large. In a real ``perf.bench --preset cpu --policies oracle``
run with every step timed, a token took a median 254 ms from the end of its step to the
ingress (up to 1.3 s behind a prefill on rank 0), and an arrival waited a median 263 ms
for its first step. A drop's exchange batch of 16 MB took 1.95 s in the kunserve runs,
against under 2 ms of copying at the host's memory speed.

``RankExec`` (``perf.sim.instance``) keeps each rank's turn queue: ``at_turn`` runs an
action at once while the rank is not computing, and otherwise when its job ends, before the
job's own completion (the loop receives and polls before it launches the next step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from perf.sim.instance import SimContext

CONTROLLER_RANK = 0
"""``serve`` runs the controller and the ingress on rank 0 (``orchestrator.launch``)."""


@dataclass
class Controller:
    """Where the controller runs, and how often its actions waited for a step."""

    rank: int = CONTROLLER_RANK
    """-1: on no serving rank (a dedicated process; tests use it to take the wait away)."""
    deferred: int = 0


def to_controller(ctx: SimContext, action: Callable[[], None]) -> None:
    """Run ``action`` at the controller's next loop turn."""
    if ctx.rank(ctx.controller.rank).at_turn(action):
        ctx.controller.deferred += 1


def turn_bound_copy(ctx: SimContext, src: int, dst: int, nbytes: float, then: Callable[[], None]) -> None:
    """Copy ``nbytes`` from rank ``src`` to ``dst`` as the KV mover does: both post at their
    next turn, the copy crosses the fabric, both see it landed at their next turn after,
    then ``then`` (which a caller with a leader sends on with ``at_turn`` of the leader)."""
    posted, seen = [2], [2]

    def one_seen() -> None:
        seen[0] -= 1
        if not seen[0]:
            then()

    def landed(_t) -> None:
        ctx.rank(src).at_turn(one_seen)
        ctx.rank(dst).at_turn(one_seen)

    def one_posted() -> None:
        posted[0] -= 1
        if not posted[0]:
            ctx.net.transfer(ctx.fabric.path(src, dst), nbytes, landed)

    ctx.rank(src).at_turn(one_posted)
    ctx.rank(dst).at_turn(one_posted)
