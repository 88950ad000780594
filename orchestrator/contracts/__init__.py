"""Contracts shared between layers: the types the ingress, the Triton front end, the
cluster, the core and the policies exchange, and the errors that cross them.

Everything here is plain data or a protocol; nothing here imports from another
``orchestrator`` room, so every room may import from here (``tests/test_layering.py``).

- ``serving``: the front ends' backend interface, a generate request, token events,
  the cluster's state as ``/admin/state`` shows it;
- ``load``: an instance's load report (what dispatch and the policies read);
- ``topology``: which ranks form which instances, and how a drop or restore changes it;
- ``errors``: queue full, unavailable, refused now, timed out.
"""

from orchestrator.contracts.errors import BackendUnavailable, QueueFullError, Refused, ReshapeTimeout
from orchestrator.contracts.load import InstanceStats, PoolUsage
from orchestrator.contracts.serving import (ClusterState, GenerateRequest, IngressBackend, InstanceState,
                                            RankState, TokenEvent)
from orchestrator.contracts.topology import Topology

__all__ = ["BackendUnavailable", "ClusterState", "GenerateRequest", "IngressBackend", "InstanceState",
           "InstanceStats", "PoolUsage", "QueueFullError", "RankState", "Refused", "ReshapeTimeout", "TokenEvent",
           "Topology"]
