"""Policies: small classes behind an ABC each, made by name from a registry
(``registry.Registry``); the mechanisms in ``cluster/`` and ``core/`` do not know which
one runs.

- ``bundles``: ``serve --policy`` (vllm, kunserve, swap, llumnix, oracle), each a bundle
  naming the reshape, preemption and migration policies it uses;
- ``dispatch``: which instance serves a new request (least_loaded, round_robin);
- ``reshape``: when to fuse replicas into groups and split them again (never, kunserve;
  KunServe's algorithms are in ``orchestrator.kunserve``);
- ``migration``: which replica sheds a running request to which (llumnix).

Policies import only the contracts and their algorithms: nothing from the cluster, the
ingress or a transport.
"""
