"""The memory-overload policies ``serve --policy`` offers, each a bundle of mechanisms.

All run on the same engine, scheduler and cluster; a policy only picks which mechanisms
act when KV runs short:

- ``reshape``: whether instances fuse into pipelined groups (KunServe's parameter drop);
- ``preemption``: what happens to a running request that must make room: its KV is
  dropped and recomputed later (vLLM) or moved to host memory and back (InferCept-style);
- ``migration``: whether running requests move between replicas with their KV (Llumnix);
- ``unlimited_kv``: a pool larger than any load needs (the oracle's lower bound).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServingPolicy:
    """A bundle: the policies and mechanisms one ``--policy`` turns on. Bundles are data,
    not behaviour, so they are listed in one table (``POLICIES``) rather than registered
    classes; the policies they name come from their registries."""

    name: str
    description: str
    reshape: str = "never"
    """A reshape policy (``policy.reshape.RESHAPE``): ``never`` or ``kunserve``."""
    preemption: str = "recompute"
    """``recompute`` or ``swap``."""
    migration: str | None = None
    """A migration policy (``policy.migration.MIGRATION``), or none."""
    unlimited_kv: bool = False


POLICIES: dict[str, ServingPolicy] = {p.name: p for p in (
    ServingPolicy("vllm", "KV-centric baseline: admit while KV fits, FCFS queue, recompute preemption"),
    ServingPolicy("kunserve", "parameter-centric: on KV overload fuse replicas into pipelined groups that "
                              "drop weights for KV; restore when the burst has passed", reshape="kunserve"),
    ServingPolicy("swap", "InferCept-style: preempted requests' KV goes to host memory and back "
                          "(no recompute)", preemption="swap"),
    ServingPolicy("llumnix", "Llumnix-style: running requests migrate with their KV from loaded to "
                             "less loaded replicas while decoding goes on", migration="llumnix"),
    ServingPolicy("oracle", "lower bound: a KV pool larger than any load needs (pages take memory only "
                            "when used; CPU only)", unlimited_kv=True),
)}


def get_policy(name: str) -> ServingPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown --policy {name!r}; known: {', '.join(POLICIES)}") from None
