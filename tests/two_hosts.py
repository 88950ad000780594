"""Two simulated hosts on one machine, for the cross-host tests.

Each host is a network namespace with its own address, joined to the other by a veth
pair, and every process of a host runs under a UTS namespace of its own with the host's
name (without distinct names the transport takes both for one host, and Open MPI's
shared-memory split hangs). ``mpirun`` starts inside the first host; Open MPI reaches the
second through ``plm_rsh_agent``, a small script that runs the daemon's command inside the
other namespace (no ssh). The first host also has a link to the root namespace, so the
test reaches the ingress at ``front_address``. Root, ``ip`` (iproute2) and ``unshare``
(util-linux) are needed; ``TwoHosts.unavailable`` says why not when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

AGENT = """#!/bin/sh
# Open MPI's rsh agent: "agent [options] HOST COMMAND": COMMAND runs in HOST's namespaces.
while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done
host="$1"; shift
exec ip netns exec "$host" unshare --uts sh -c "hostname $host; $*"
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class TwoHosts:
    """``with TwoHosts() as h``: the namespaces exist inside the block, and are gone after."""

    def __init__(self) -> None:
        tag = os.getpid() % 200 + 20
        self.names = (f"ksa{tag}", f"ksb{tag}")
        self.addresses = (f"10.231.{tag}.1", f"10.231.{tag}.2")
        self.front_address = f"10.232.{tag}.2"
        self._root_address = f"10.232.{tag}.1"
        self._links = (f"kva{tag}", f"kvb{tag}", f"kvr{tag}", f"kvf{tag}")
        self._dir = Path(tempfile.mkdtemp(prefix="kunserve-hosts-"))
        self.agent = self._dir / "agent.sh"

    @staticmethod
    def unavailable() -> str | None:
        """Why two hosts cannot be made here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "unshare"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        probe = f"ksprobe{os.getpid()}"
        try:
            _ip("netns", "add", probe)
            _ip("netns", "del", probe)
        except (subprocess.CalledProcessError, OSError) as exc:
            return f"cannot make a network namespace: {getattr(exc, 'stderr', exc)}"
        uts = subprocess.run(["unshare", "--uts", "hostname", "kunserve-probe"], capture_output=True, text=True)
        if uts.returncode != 0:
            return f"cannot make a UTS namespace: {uts.stderr.strip()}"
        return None

    def __enter__(self) -> "TwoHosts":
        a, b = self.names
        va, vb, vr, vf = self._links
        for name in self.names:
            _ip("netns", "add", name)
            # ip netns exec binds /etc/netns/NAME/hosts over /etc/hosts: both names resolve.
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.addresses[0]} {a}\n{self.addresses[1]} {b}\n")
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        _ip("link", "add", vr, "type", "veth", "peer", "name", vf)  # root <-> host a, for the test
        _ip("link", "set", vf, "netns", a)
        for ns, dev, addr in ((a, va, self.addresses[0]), (b, vb, self.addresses[1]), (a, vf, self.front_address)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("addr", "add", f"{self._root_address}/24", "dev", vr)
        _ip("link", "set", vr, "up")
        self.agent.write_text(AGENT)
        self.agent.chmod(0o755)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "link", "del", self._links[2]], capture_output=True)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def mpirun(self, n_per_host: int = 1) -> list[str]:
        """``mpirun`` run on the first host, its ranks spread over both, TCP between them."""
        from perf.mpi_launch import find_mpirun

        a, b = self.names
        return ["ip", "netns", "exec", a, "unshare", "--uts", "sh", "-c", 'hostname "$1"; shift; exec "$@"', "sh", a,
                find_mpirun(), "--allow-run-as-root", "--host", f"{a}:{n_per_host},{b}:{n_per_host}",
                "--mca", "plm_rsh_agent", str(self.agent), "--mca", "btl", "tcp,self",
                "--bind-to", "none", "-x", "OMP_NUM_THREADS=1", "-x", "PATH", "-n", str(2 * n_per_host)]
