"""Tensor transports: the factory, MpiTransport in one process and across two ranks, the
nccl transport's code over gloo (CPU) across two and four ranks, NCCL on GPUs, and how a
rank's GPU is chosen and whether ranks share one.

Single-process tests use ``MPI.COMM_SELF`` (a rank may send to itself); the multi-rank
tests launch ``mpi_transport_job.py`` under mpirun.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from engines.devices import cuda_index, gpus_shared
from orchestrator.transport import (TENSOR_TAGS, Transport, known_transports, make_transport, register_transport,
                                    resolve_kind)
from tests.mpi_util import REPO_ROOT, requires_mpirun, run_mpi_module

JOB = "tests.orchestrator.transport.mpi_transport_job"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so NaNs and -0.0 compare exactly."""
    return t.reshape(-1).view(torch.uint8)


@pytest.fixture()
def comm_self():
    from mpi4py import MPI

    return MPI.COMM_SELF


@pytest.fixture()
def transport(comm_self):
    t = make_transport("mpi", comm_self)
    yield t
    t.close()


# --- the factory --------------------------------------------------------------------------

def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown transport 'pigeon'; known: auto, gloo, mpi, nccl"):
        resolve_kind("pigeon")
    assert known_transports() == ["auto", "gloo", "mpi", "nccl"]
    assert resolve_kind("gloo") == "gloo"  # serve --transport gloo selects it


def test_auto_picks_nccl_only_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_kind("auto") == "mpi"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_kind("auto") == "nccl"
    assert resolve_kind("mpi") == "mpi"


def test_register_refuses_taken_names():
    for name in ("auto", "gloo", "mpi", "nccl"):
        with pytest.raises(ValueError, match="is taken"):
            register_transport(name, lambda comm: None)


def test_auto_without_cuda_builds_mpi(comm_self, monkeypatch):
    from orchestrator.transport.mpi import MpiTransport

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = make_transport("auto", comm_self)
    assert isinstance(t, MpiTransport) and t.name == "mpi" and (t.rank, t.size) == (0, 1)
    t.close()


def test_auto_takes_mpi_when_ranks_share_a_gpu(comm_self, monkeypatch):
    from orchestrator.transport.mpi import MpiTransport

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # one rank on this host, no GPU of its own
    t = make_transport("auto", comm_self)
    assert isinstance(t, MpiTransport)
    t.close()


def test_importing_the_package_starts_neither_mpi_nor_cuda():
    code = ("import sys, orchestrator.transport, orchestrator.transport.nccl\n"
            "assert 'mpi4py.MPI' not in sys.modules, 'MPI initialized on import'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- MpiTransport in one process ------------------------------------------------------------

@pytest.mark.parametrize("dtype,shape", [(torch.float32, (3, 5)), (torch.bfloat16, (4, 7)),
                                         (torch.int64, (9,)), (torch.float32, ()), (torch.bool, (0,))])
def test_self_roundtrip_is_bit_exact(transport, dtype, shape):
    src = (torch.randn(shape) * 100).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    recv = transport.irecv(out, src=0, tag=3)
    send = transport.isend(src, dst=0, tag=3)
    send.wait()
    recv.wait()
    assert recv.test() and send.test()
    assert out.shape == src.shape and torch.equal(bits(out), bits(src))


def test_chunked_roundtrip_with_tags_out_of_order(comm_self):
    from orchestrator.transport.mpi import MpiTransport

    t = MpiTransport(comm_self, max_chunk_bytes=100)
    a, b = torch.arange(1001, dtype=torch.int64), torch.randn(77).to(torch.bfloat16)
    out_a, out_b = torch.empty_like(a), torch.empty_like(b)
    handles = [t.irecv(out_b, 0, tag=2), t.irecv(out_a, 0, tag=1), t.isend(a, 0, tag=1), t.isend(b, 0, tag=2)]
    assert len(handles[1].requests) == 81  # 8008 bytes in chunks of 100
    for h in handles:
        h.wait()
    assert torch.equal(out_a, a) and torch.equal(bits(out_b), bits(b))
    assert all(h.tensor is None for h in handles)  # released on completion
    t.close()


def test_blocking_send_recv(transport):
    # Small messages go out eagerly, so a blocking send to oneself returns before the receive.
    transport.send(torch.tensor([1.5, 2.5]), dst=0, tag=0)
    assert transport.recv(torch.zeros(2), src=0, tag=0).tolist() == [1.5, 2.5]


def test_short_message_is_reported(transport):
    recv = transport.irecv(torch.zeros(8), src=0, tag=4)
    transport.isend(torch.ones(2), dst=0, tag=4).wait()
    with pytest.raises(RuntimeError, match="received 8 bytes .* into a buffer of 32"):
        recv.wait()
    with pytest.raises(RuntimeError):  # and again: the failure is remembered
        recv.test()


def test_refuses_non_contiguous(transport):
    t = torch.zeros(4, 6).t()
    with pytest.raises(ValueError, match="contiguous"):
        transport.isend(t, dst=0, tag=0)
    with pytest.raises(ValueError, match="contiguous"):
        transport.irecv(t, src=0, tag=0)


def test_refuses_tensors_off_the_cpu_and_cuda(transport):
    with pytest.raises(ValueError, match="moves CPU and CUDA tensors, got one on meta"):
        transport.isend(torch.empty(4, device="meta"), dst=0, tag=0)


def test_refuses_bad_arguments(transport, comm_self):
    from orchestrator.transport.mpi import MpiTransport

    with pytest.raises(TypeError, match="torch.Tensor"):
        transport.isend([1, 2, 3], dst=0, tag=0)
    with pytest.raises(ValueError, match="contiguous"):
        transport.isend(torch.eye(3).to_sparse(), dst=0, tag=0)
    with pytest.raises(ValueError, match="rank 1 is not in this communicator of size 1"):
        transport.isend(torch.zeros(1), dst=1, tag=0)
    with pytest.raises(ValueError, match="tag -1"):
        transport.irecv(torch.zeros(1), src=0, tag=-1)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        MpiTransport(comm_self, max_chunk_bytes=1 << 31)


# --- rows (KV pages) --------------------------------------------------------------------------

class PlainRows(Transport):
    """Only isend/irecv (MpiTransport's): rows go through the base class's gather and
    scatter, as they do over NCCL."""

    name = "plain"

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    def isend(self, tensor, dst, tag):
        return self.inner.isend(tensor, dst, tag)

    def irecv(self, out, src, tag):
        return self.inner.irecv(out, src, tag)


@pytest.fixture(params=["cma", "datatype"])
def rows_transport(request, comm_self):
    """MpiTransport with each of its two rows paths: cross-memory attach (a process may
    read its own memory, so one process exercises the whole protocol) and MPI datatypes."""
    from orchestrator.transport.mpi import MpiTransport

    t = MpiTransport(comm_self, cma=request.param == "cma")
    assert t.cma.can_read == [[request.param == "cma"]]
    yield t
    t.close()


def _rows_roundtrip(t, send_rows, recv_rows, row_shape=(2, 3), dtype=torch.float32):
    pool_a = (torch.randn((40, *row_shape)) * 10).to(dtype)
    pool_b = torch.full((40, *row_shape), -1.0).to(dtype)
    before = pool_b.clone()
    recv = t.irecv_rows(pool_b, recv_rows, src=0, tag=11)
    send = t.isend_rows(pool_a, send_rows, dst=0, tag=11)
    send.wait()  # over CMA this drives the receive: the copy is the receiver's to make
    recv.wait()
    assert recv.test() and send.test()
    assert torch.equal(bits(pool_b[recv_rows]), bits(pool_a[send_rows]))
    untouched = [i for i in range(40) if i not in set(recv_rows)]
    assert torch.equal(bits(pool_b[untouched]), bits(before[untouched]))
    return recv


# Runs of consecutive rows, single rows, a reversed run and rows out of order on either side.
ROWS = [([0, 1, 2, 3], [10, 11, 12, 13]), ([5, 9, 1, 30], [2, 3, 4, 5]), ([7, 8, 20, 21, 22], [39, 0, 1, 17, 16])]


@pytest.mark.parametrize("send_rows,recv_rows", ROWS)
def test_rows_land_in_their_rows_and_nowhere_else(rows_transport, send_rows, recv_rows):
    _rows_roundtrip(rows_transport, send_rows, recv_rows)


@pytest.mark.parametrize("send_rows,recv_rows", ROWS)
def test_gather_scatter_default_agrees(transport, send_rows, recv_rows):
    _rows_roundtrip(PlainRows(transport), send_rows, recv_rows, dtype=torch.bfloat16)


def test_rows_are_sent_without_a_gather(rows_transport):
    pool = torch.zeros(8, 4)
    recv = rows_transport.irecv_rows(torch.zeros(8, 4), [0, 1, 2], src=0, tag=12)
    h = rows_transport.isend_rows(pool, [1, 2, 5], dst=0, tag=12)
    assert h.tensor is pool  # the pool itself, no packed copy
    recv.wait()
    h.wait()
    assert h.tensor is None  # released on completion
    assert getattr(h, "datatypes", []) == []  # and MPI datatypes freed


def test_many_rows_take_several_readv_calls(rows_transport):
    # Every other row: 3000 runs, more than one process_vm_readv call takes.
    n = 6000
    a, b = torch.randn(n, 4), torch.zeros(n, 4)
    recv = rows_transport.irecv_rows(b, list(range(1, n, 2)), src=0, tag=15)
    rows_transport.isend_rows(a, list(range(0, n, 2)), dst=0, tag=15).wait()
    recv.wait()
    assert torch.equal(b[1::2], a[0::2]) and not b[0::2].any()


def test_rows_chunked_into_several_messages(comm_self):
    from orchestrator.transport.mpi import MpiTransport

    t = MpiTransport(comm_self, max_chunk_bytes=3 * 24, cma=False)  # three rows of 2x3 float32 per message
    recv = _rows_roundtrip(t, [0, 1, 2, 3, 9, 10, 11], [30, 31, 32, 33, 34, 35, 36])
    assert len(recv.requests) == 3
    t.close()


def test_row_larger_than_a_chunk_falls_back_to_gather(comm_self):
    from orchestrator.transport.mpi import MpiTransport

    t = MpiTransport(comm_self, max_chunk_bytes=16, cma=False)  # a 24-byte row: gathered, then chunked
    _rows_roundtrip(t, [3, 4, 7], [0, 2, 1])
    t.close()


def test_no_rows_is_one_empty_message(rows_transport):
    pool = torch.zeros(4, 2)
    recv = rows_transport.irecv_rows(pool, [], src=0, tag=13)
    rows_transport.isend_rows(torch.ones(4, 2), [], dst=0, tag=13).wait()
    recv.wait()
    assert torch.equal(pool, torch.zeros(4, 2))


def test_rows_refuse_bad_indices(rows_transport):
    with pytest.raises(IndexError, match="row 8 is outside the tensor's 8 rows"):
        rows_transport.isend_rows(torch.zeros(8, 2), [1, 8], dst=0, tag=0)
    with pytest.raises(IndexError, match="row -1"):
        rows_transport.irecv_rows(torch.zeros(8, 2), [-1], src=0, tag=0)
    with pytest.raises(ValueError, match="0-d tensor has no rows"):
        rows_transport.isend_rows(torch.tensor(1.0), [0], dst=0, tag=0)
    with pytest.raises(ValueError, match="flat list"):
        rows_transport.isend_rows(torch.zeros(8, 2), [[1, 2]], dst=0, tag=0)


def test_rows_of_a_different_size_are_reported(rows_transport):
    recv = rows_transport.irecv_rows(torch.zeros(8, 2), [0, 1, 2], src=0, tag=14)
    send = rows_transport.isend_rows(torch.ones(8, 2), [4, 5], dst=0, tag=14)
    with pytest.raises(RuntimeError, match="received 16 bytes .* into a buffer of 24"):
        recv.wait()
    if rows_transport.cma.can_read[0][0]:  # the sender learns it too, instead of waiting forever
        with pytest.raises(RuntimeError, match="expected rows of another size"):
            send.wait()
    else:
        send.wait()


def test_cma_can_be_turned_off(comm_self, monkeypatch):
    from orchestrator.transport.mpi import MpiTransport

    monkeypatch.setenv("KUNSERVE_CMA", "0")
    t = MpiTransport(comm_self)
    assert t.cma.can_read == [[False]]
    t.close()


def test_a_refused_probe_falls_back_to_datatypes(comm_self, monkeypatch):
    """Where ptrace rules or seccomp forbid process_vm_readv, rows still move (by MPI)."""
    import ctypes
    import errno

    from orchestrator.transport import cma
    from orchestrator.transport.mpi import MpiTransport

    def refused(*_args):
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(cma, "_READV", refused)
    t = MpiTransport(comm_self)
    assert t.cma.can_read == [[False]]
    _rows_roundtrip(t, [1, 2, 9], [4, 5, 6])
    t.close()


# --- across ranks ----------------------------------------------------------------------------

@requires_mpirun
def test_two_ranks_exchange_bit_exact():
    proc = run_mpi_module(2, JOB, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "mpi transport job: ok" in proc.stdout


# --- the nccl transport's code, over gloo (CPU) ----------------------------------------------

def test_tensor_tags_are_the_clusters():
    """The channels made by default are the cluster's tensor tags (transport may not import them)."""
    from orchestrator.cluster.messages import TAG_HIDDEN, TAG_KV, TAG_WEIGHTS

    assert sorted(TENSOR_TAGS) == sorted({TAG_HIDDEN, TAG_KV, TAG_WEIGHTS})


@pytest.fixture()
def gloo(comm_self):
    t = make_transport("gloo", comm_self)
    yield t
    t.close()


def test_gloo_has_one_channel_per_tag_and_refuses_others(gloo):
    from orchestrator.transport.nccl import GlooTransport

    assert isinstance(gloo, GlooTransport) and gloo.name == "gloo" and gloo.device == torch.device("cpu")
    assert gloo.tags == tuple(sorted(TENSOR_TAGS)) and len({id(gloo._channel(t)) for t in gloo.tags}) == 3
    for post in (gloo.isend, gloo.irecv):
        with pytest.raises(ValueError, match="tag 99 has no channel in the gloo transport"):
            post(torch.zeros(2), 0, 99)
    with pytest.raises(ValueError, match="tag 99 has no channel"):
        gloo.isend_rows(torch.zeros(4, 2), [0, 1], 0, 99)
    with pytest.raises(ValueError, match="tag 99 has no channel"):
        gloo.irecv_rows(torch.zeros(4, 2), [0, 1], 0, 99)


def test_gloo_refuses_bad_tensors_and_peers(gloo):
    tag = TENSOR_TAGS[0]
    with pytest.raises(ValueError, match="moves tensors on cpu, got one on meta"):
        gloo.isend(torch.empty(2, device="meta"), 0, tag)
    with pytest.raises(ValueError, match="contiguous"):
        gloo.irecv(torch.zeros(4, 6).t(), 0, tag)
    with pytest.raises(ValueError, match="peer 0 must be another rank"):
        gloo.isend(torch.zeros(2), 0, tag)  # one process: no peer
    with pytest.raises(TypeError, match="torch.Tensor"):
        gloo.isend([1.0], 0, tag)


def test_gloo_can_be_built_again_after_close(comm_self):
    from orchestrator.transport.nccl import GlooTransport

    for tags in ((7,), (1, 2)):
        t = GlooTransport(comm_self, tags)
        assert t.tags == tags
        t.close()
    with pytest.raises(ValueError, match="at least one tag"):
        GlooTransport(comm_self, ())


class FakeWork:
    """A gloo work as torch gives it: ``is_completed`` false until ``wait`` returns."""

    def __init__(self, error: Exception | None = None) -> None:
        self.arrived = threading.Event()
        self.error = error

    def is_completed(self) -> bool:
        return False

    def wait(self) -> bool:
        self.arrived.wait(10)
        if self.error is not None:
            raise self.error
        return True


def _poll(handle, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not handle.test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # waiting for the handle's waiter thread, not standing in for a transfer
    return True


def test_waited_handle_polls_without_blocking():
    """gloo's works complete only from wait(): test() must still report completion, and
    never block (the rank loop and the KV mover poll their transfers)."""
    from orchestrator.transport.nccl import WaitedHandle

    work = FakeWork()
    h = WaitedHandle(work, torch.zeros(3))
    t0 = time.monotonic()
    assert not h.test() and not h.test()
    assert time.monotonic() - t0 < 1 and h.tensor is not None
    work.arrived.set()
    assert _poll(h) and h.tensor is None
    h.wait()  # and done stays done
    direct = WaitedHandle(FakeWork(), torch.zeros(1))
    direct.work.arrived.set()
    direct.wait()  # no thread when waited at once
    assert direct.test() and direct._waiter is None


def test_waited_handle_reports_a_failed_transfer():
    from orchestrator.transport.nccl import WaitedHandle

    work = FakeWork(error=RuntimeError("Connection closed by peer"))
    h = WaitedHandle(work, torch.zeros(1))
    assert not h.test()
    work.arrived.set()
    with pytest.raises(RuntimeError, match="a gloo transfer failed: Connection closed by peer"):
        _poll(h)
    with pytest.raises(RuntimeError, match="Connection closed"):
        h.wait()


def _simulate(size: int, tags: tuple[int, ...]) -> int:
    """Run every rank's warm-up steps, a step completing when both its ranks are at it;
    returns the rounds taken (the critical path), or raises on a deadlock."""
    from orchestrator.transport.nccl import warm_up_steps

    todo = {r: [s for s in warm_up_steps(size, tags) if r in s[:2]] for r in range(size)}
    rounds = 0
    while any(todo.values()):
        heads = {steps[0] for steps in todo.values() if steps}
        ready = [s for s in heads if todo[s[0]][0] == s == todo[s[1]][0]]
        assert ready, f"deadlock: every rank waits on a peer at {sorted(heads)}"
        for lo, hi, _ in ready:
            todo[lo].pop(0)
            todo[hi].pop(0)
        rounds += 1
    return rounds


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
def test_warm_up_order_covers_every_pair_and_cannot_deadlock(size):
    from orchestrator.transport.nccl import warm_up_steps

    tags = (3, 5, 6)
    steps = list(warm_up_steps(size, tags))
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == size * (size - 1) // 2 * len(tags)
    assert {(lo, hi) for lo, hi, _ in steps} == {(i, j) for i in range(size) for j in range(i + 1, size)}
    # Disjoint pairs proceed at once: about 2n - 3 pair steps on the critical path, not n (n-1) / 2.
    assert _simulate(size, tags) == max(0, 2 * size - 3) * len(tags)


@requires_mpirun
def test_gloo_two_ranks_fifo_rows_classes_and_unknown_tags():
    """The nccl transport's code over gloo on two ranks: bit-exact FIFO on one channel,
    rows (gather/scatter), two classes posted in opposite orders on one pair landing in
    their own receives (this fails when the tags share one group), an unknown tag."""
    proc = run_mpi_module(2, JOB, "--kind", "gloo", timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "gloo transport job: ok" in proc.stdout


@requires_mpirun
def test_gloo_four_ranks_every_pair_every_channel():
    """Four ranks: warm-up of 6 pairs x 3 channels, then each pair both ways on every
    channel, posted in different channel orders by the two sides, completed by test() alone."""
    proc = run_mpi_module(4, JOB, "--kind", "gloo-pairs", timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "gloo-pairs transport job: ok" in proc.stdout and "6 pairs x 3 channels" in proc.stdout


# --- which GPU, and whether ranks share one ------------------------------------------------

def _identities(ranks: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """Each rank's (host, UUID) in a fake cluster: ``(host, UUIDs this rank sees)`` per rank,
    in rank order; local ranks count per host, as MPI's shared-memory split does."""
    seen: dict[str, int] = {}
    out = []
    for host, visible in ranks:
        local = seen[host] = seen.get(host, -1) + 1
        out.append((host, visible[cuda_index(local, len(visible))]))
    return out


GPUS = ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]


def test_one_visible_gpu_per_rank_is_not_sharing():
    """CUDA_VISIBLE_DEVICES=i for rank i: each sees one GPU, index 0; none is shared (the
    count rule took 4 ranks > 1 device for sharing and staged everything through the host)."""
    ranks = [("node0", [g]) for g in GPUS]
    assert [cuda_index(i, 1) for i in range(4)] == [0, 0, 0, 0]
    assert not gpus_shared(_identities(ranks))


def test_more_ranks_than_gpus_is_sharing():
    assert gpus_shared(_identities([("node0", GPUS)] * 8))  # 8 ranks on 4 GPUs
    assert not gpus_shared(_identities([("node0", GPUS)] * 4))
    assert [cuda_index(i, 4) for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_two_hosts_and_ranks_without_a_gpu():
    # GPU index 0 on two hosts is two GPUs; local ranks restart on each host.
    assert not gpus_shared(_identities([("node0", ["GPU-a", "GPU-b"])] * 2 + [("node1", ["GPU-x", "GPU-y"])] * 2))
    assert gpus_shared([("node0", "GPU-a"), None])  # a rank with no GPU cannot take part in NCCL
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        cuda_index(0, 0)


def test_auto_reads_gpu_identities(comm_self, monkeypatch):
    """The factory's check gathers every rank's (host, UUID) and asks gpus_shared."""
    import engines.devices
    from orchestrator import transport

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(engines.devices, "gpu_identity", lambda device: ("node0", f"GPU-{device.index}"))
    assert not transport._ranks_share_gpus(comm_self)


# --- CUDA ----------------------------------------------------------------------------------

def test_nccl_needs_cuda(comm_self):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    from orchestrator.transport.nccl import NcclTransport

    with pytest.raises(RuntimeError, match="needs CUDA"):
        NcclTransport(comm_self, TENSOR_TAGS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mpi_stages_cuda_tensors_through_the_host(transport):
    src = torch.arange(24, dtype=torch.bfloat16, device="cuda").view(6, 4)
    out = torch.zeros(6, 4, dtype=torch.bfloat16, device="cuda")
    recv = transport.irecv(out, src=0, tag=1)
    transport.isend(src, dst=0, tag=1).wait()
    recv.wait()
    assert torch.equal(out, src)
    rows = torch.zeros(8, 4, dtype=torch.bfloat16, device="cuda")
    recv = transport.irecv_rows(rows, [7, 0, 3], src=0, tag=2)
    transport.isend_rows(src, [1, 2, 5], dst=0, tag=2).wait()
    recv.wait()
    assert torch.equal(rows[[7, 0, 3]], src[[1, 2, 5]]) and not rows[[1, 2, 4, 5, 6]].any()
    with pytest.raises(ValueError, match="contiguous"):
        transport.isend(src.t(), dst=0, tag=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@requires_mpirun
def test_mpi_two_ranks_sharing_one_gpu_exchange_bit_exact():
    proc = run_mpi_module(2, JOB, "--kind", "mpi-cuda", timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "mpi-cuda transport job: ok" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL refuses two ranks on one)")
@requires_mpirun
def test_nccl_two_ranks_exchange_bit_exact():
    proc = run_mpi_module(2, JOB, "--kind", "nccl", timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "nccl transport job: ok" in proc.stdout


def test_cuda_staging_buffers_are_pinned(monkeypatch):
    """The mpi transport stages a CUDA tensor through a pinned host buffer (a pageable one
    makes every copy a synchronous bounce through a driver buffer); checked without CUDA by
    recording the allocation the staging helper asks for."""
    import orchestrator.transport.mpi as mpi

    asked = []

    def empty(*shape, **kwargs):
        asked.append(kwargs)
        return torch.zeros(*shape, dtype=kwargs.get("dtype"))

    monkeypatch.setattr(mpi.torch, "empty", empty)
    buf = mpi._staging_buffer(torch.ones(2, 3, dtype=torch.bfloat16))
    assert asked == [{"dtype": torch.bfloat16, "pin_memory": True}] and buf.shape == (2, 3)
