"""Where a simulated rank computes and how its bytes travel: the links of a CPU host or of a
GPU cluster, as paths for ``perf.sim.links.Network``.

A simulated rank is what the cluster layer calls a rank: one TP set of ``tp`` devices. Its
compute path is what its steps run on; ``path(a, b)`` is what bytes from rank ``a`` to rank
``b`` cross (activations between stages, the KV exchange, weight pulls); ``host(a)`` is
the path to host memory (swap). A TP set's devices move their shards in parallel, each over
its own links, so a rank's links carry ``tp`` devices' bandwidth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from perf.sim.links import Link

GiB = 2**30


class Fabric(ABC):
    num_ranks: int
    @abstractmethod
    def compute(self, rank: int) -> list[Link]:
        """The path a step's work crosses (its units: seconds of the rank alone)."""

    @abstractmethod
    def path(self, src: int, dst: int) -> list[Link]:
        """Links bytes from ``src`` to ``dst`` cross."""

    @abstractmethod
    def host(self, rank: int, to_host: bool) -> list[Link]:
        """Links between the rank's devices and host memory, one direction."""

    @abstractmethod
    def remap_seconds(self, nbytes: int) -> float:
        """Seconds a rank takes to turn ``nbytes`` of freed weights into KV pages."""

    def link_kind(self, ranks: tuple[int, ...]) -> str:
        """What joins these ranks: the links a reshape of them moves its bytes over."""
        return "host memory"


@dataclass(frozen=True)
class CpuHostSpec:
    cores: float | None
    """Cores the ranks share (None: a core per rank)."""
    copy_bandwidth: float = 10.3 * GiB
    """Bytes/s of a copy between two ranks' processes: the raw mpi4py figure measured by the
    exchange benchmark on this host (docs/kunserve.md, 10.32 GiB/s)."""
    copy_latency: float = 20e-6
    """Seconds of an MPI message on this host (perf.bench_transport's small-message figure)."""
    remap_bandwidth: float = 2.84 * GiB
    """Bytes/s of the drop's memory step (weights freed, the KV pool committed): 202.6 MiB in
    69.7 ms on this host (docs/kunserve.md, ``--kv-extension commit``)."""
    efficiency: tuple[float, ...] = ()
    """Per number of busy ranks k = 1, 2, ..., the fraction of its share of the cores each
    gets (``perf.sim.host_cost.contention_efficiency`` of the profile's measurement; the
    last entry for more ranks); () for none: busy ranks only share the cores."""


class CpuHost(Fabric):
    """Ranks as processes of one host: each its own core (1 core-second per second), all of
    them sharing the host's cores (slowed further, with a measured ``efficiency``, by the
    memory bus and caches that busy ranks share) and its memory bus for copies."""

    def __init__(self, spec: CpuHostSpec, ranks: int) -> None:
        self.spec = spec
        self.num_ranks = ranks
        self._cores = [Link(f"rank {r} core", 1.0) for r in range(ranks)]
        self._shared = [Link("host cores", float(spec.cores), efficiency=self._crowd(spec, ranks))] if spec.cores else []
        self._bus = Link("host memory bus", spec.copy_bandwidth, spec.copy_latency)

    @staticmethod
    def _crowd(spec: CpuHostSpec, ranks: int) -> tuple[float, ...]:
        """The shared link's efficiency at each crowd k, so that each of k busy ranks gets
        ``min(1, cores / k) * efficiency[k - 1]`` core-seconds per second."""
        if not spec.efficiency:
            return ()
        cores = float(spec.cores)
        e = [spec.efficiency[min(k, len(spec.efficiency)) - 1] for k in range(1, max(ranks, 1) + 1)]
        return tuple(min(1.0, k / cores) * ek for k, ek in enumerate(e, start=1))

    def compute(self, rank: int) -> list[Link]:
        return [self._cores[rank], *self._shared]

    def path(self, src: int, dst: int) -> list[Link]:
        return [self._bus]

    def host(self, rank: int, to_host: bool) -> list[Link]:
        return [self._bus]

    def remap_seconds(self, nbytes: int) -> float:
        return nbytes / self.spec.remap_bandwidth


@dataclass(frozen=True)
class GpuNodeSpec:
    """The links of one GPU and its node; each constant names its source."""

    gpus_per_node: int = 8
    """DGX/HGX H100 and H200: 8 GPUs per node."""
    nvlink_bandwidth: float = 450e9
    """Bytes/s per direction per GPU: NVLink 4 gives 900 GB/s bidirectional per H100/H200 SXM
    (NVIDIA H100 and H200 datasheets), through NVSwitch to any GPU of the node."""
    nvlink_latency: float = 3e-6
    pcie_bandwidth: float = 64e9
    """Bytes/s per direction, PCIe Gen5 x16 to the host (128 GB/s both ways, H100 datasheet)."""
    pcie_latency: float = 5e-6
    ib_bandwidth: float = 50e9
    """Bytes/s per direction per GPU: one 400 Gb/s ConnectX-7 InfiniBand NIC per GPU (DGX H100
    user guide: 8 x 400 Gb/s compute ports)."""
    ib_latency: float = 5e-6
    remap_bandwidth: float = 16e9
    """Bytes/s of remapping freed weight memory as KV with CUDA's virtual memory API, per
    GPU: one ``cuMemMap`` costs about 4 ms on its slow path (kvcached, DESIGN.md section
    8), and KunServe maps 64 MB chunks, so 64 MB per 4 ms."""


class GpuCluster(Fabric):
    """Ranks (TP sets) packed onto nodes of ``gpus_per_node`` GPUs in rank order; within a
    node through NVLink, between nodes through each GPU's InfiniBand NIC."""

    def __init__(self, spec: GpuNodeSpec, ranks: int, tp: int) -> None:
        if spec.gpus_per_node % tp:
            raise ValueError(f"tp {tp} does not divide the node's {spec.gpus_per_node} GPUs")
        self.spec = spec
        self.num_ranks = ranks
        self.tp = tp
        self.per_node = spec.gpus_per_node // tp

        def links(kind: str, bw: float, lat: float) -> list[tuple[Link, Link]]:
            return [(Link(f"rank {r} {kind} out", bw * tp, lat), Link(f"rank {r} {kind} in", bw * tp, lat))
                    for r in range(ranks)]
        self._nvl = links("nvlink", spec.nvlink_bandwidth, spec.nvlink_latency)
        self._ib = links("ib", spec.ib_bandwidth, spec.ib_latency)
        self._pcie = links("pcie", spec.pcie_bandwidth, spec.pcie_latency)
        self._gpu = [Link(f"rank {r} gpus", 1.0) for r in range(ranks)]

    def node(self, rank: int) -> int:
        return rank // self.per_node

    def link_kind(self, ranks: tuple[int, ...]) -> str:
        return "NVLink" if len({self.node(r) for r in ranks}) == 1 else "InfiniBand"

    def compute(self, rank: int) -> list[Link]:
        return [self._gpu[rank]]

    def path(self, src: int, dst: int) -> list[Link]:
        table = self._nvl if self.node(src) == self.node(dst) else self._ib
        return [table[src][0], table[dst][1]]

    def host(self, rank: int, to_host: bool) -> list[Link]:
        return [self._pcie[rank][0 if to_host else 1]]

    def remap_seconds(self, nbytes: int) -> float:
        return nbytes / (self.spec.remap_bandwidth * self.tp)  # nbytes: a TP set's, its GPUs remap at once
