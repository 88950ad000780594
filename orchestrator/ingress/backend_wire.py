"""The supervisor's channel to the job: the ``IngressBackend`` contract over a Unix socket.

Under ``python -m orchestrator supervise`` the front ends (the OpenAI ingress, the Triton
relay, tritonserver) run in the supervisor, outside the MPI job, and the job's controller
rank serves them through this channel (``supervisor_link.py`` on the job's side,
``orchestrator/supervisor/remote_backend.py`` on the supervisor's). The framing is the
relay's (``relay_wire.py``): one JSON object per line. The supervisor listens; the
controller rank connects once it has built the controller.

job -> supervisor::

    {"op": "hello", "world_size": 4, "pid": 123}
    {"op": "beat", "healthy": true, "reason": "", "silence": {"0": 0.1, "1": 0.2}}  # every BEAT_S
    {"op": "event", "event": {...TokenEvent...}}
    {"op": "rejected", "id": "cmpl-1", "error": "..."}     # not admitted now: the supervisor keeps it
    {"op": "reply", "call": 3, "result": ...}              # or "error" and "kind" (an exception's name)

supervisor -> job::

    {"op": "submit", "req": {...GenerateRequest...}}
    {"op": "abort", "id": "cmpl-1"}
    {"op": "call", "call": 3, "method": "drop", "args": [[0, 1]]}

``silence`` is seconds since each rank's last report (``Controller.rank_silence``): the
supervisor ends a job in which a rank has stopped or hangs. The supervisor going away
(end of file) stops the job.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engines.sampling import SamplingParams, TokenLogprob
from orchestrator.contracts import ClusterState, GenerateRequest, InstanceState, RankState, TokenEvent

BEAT_S = 0.5
"""How often the job's controller rank reports its health and its ranks' silence."""

CALLS = ("state", "plan", "drop", "restore", "regroup")
"""The ``IngressBackend`` methods the supervisor may call."""


def _tuples(value: Any) -> Any:
    """Lists back into the tuples the frozen dataclasses hold (JSON has only lists)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def sampling_from_wire(d: dict[str, Any]) -> SamplingParams:
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown sampling fields {sorted(unknown)}")
    return SamplingParams(**{k: _tuples(v) for k, v in d.items()})


def request_to_wire(req: GenerateRequest) -> dict[str, Any]:
    return dataclasses.asdict(req)


def request_from_wire(d: dict[str, Any]) -> GenerateRequest:
    return GenerateRequest(request_id=str(d["request_id"]), prompt_token_ids=[int(t) for t in d["prompt_token_ids"]],
                           sampling=sampling_from_wire(d["sampling"]), arrival_time=float(d["arrival_time"]),
                           output_token_ids=[int(t) for t in d.get("output_token_ids", ())])


def _logprobs(items: list | None) -> list[TokenLogprob] | None:
    if items is None:
        return None
    return [TokenLogprob(int(lp["token_id"]), float(lp["logprob"]), _tuples(lp.get("top", []))) for lp in items]


def event_to_wire(event: TokenEvent) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(event).items() if v is not None}


def event_from_wire(d: dict[str, Any]) -> TokenEvent:
    d = dict(d)
    d["logprobs"] = _logprobs(d.get("logprobs"))
    d["prompt_logprobs"] = _logprobs(d.get("prompt_logprobs"))
    return TokenEvent(**d)


def state_from_wire(d: dict[str, Any]) -> ClusterState:
    ranks = [RankState(**{**r, "layer_range": tuple(r["layer_range"])}) for r in d["ranks"]]
    return ClusterState(ranks=ranks, instances=[InstanceState(**i) for i in d["instances"]], queued=d["queued"],
                        events=d.get("events", []), counters=d.get("counters", {}))


def result_to_wire(method: str, result: Any) -> Any:
    """A call's result as JSON: the state as its dict, tuples as lists."""
    if method == "state":
        return result.to_json()
    if method == "drop":
        return list(result) if result is not None else None
    if method == "restore":
        return [list(g) for g in result]
    return result


def result_from_wire(method: str, value: Any) -> Any:
    if method == "state":
        return state_from_wire(value)
    if method == "drop":
        return tuple(value) if value is not None else None
    if method == "restore":
        return [tuple(g) for g in value]
    return value
