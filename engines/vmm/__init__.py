"""Device memory as physical chunks mapped into reserved address ranges (virtual-memory
management), so that memory can change roles without being freed or copied.

KunServe's drop turns the weights a rank no longer needs into KV pages at once: the KV
pool is one address range reserved up front for the most it may ever hold, and each
dropped weight buffer's physical chunk is unmapped from the buffer's range and mapped onto
the pool's tail. Attention keeps seeing one pool with stable page ids; nothing is copied
and nothing goes through an allocator. A restore maps the chunks back under the weights
pulled from the peers.

Two drivers carry the same interface (``VmmDriver``):
- ``cuda``: the CUDA driver's virtual-memory API (cuMemAddressReserve, cuMemCreate,
  cuMemMap, cuMemSetAccess, cuMemUnmap) through ``cuda.bindings.driver``;
- ``host``: the same on a CPU with Linux shared memory (``memfd_create`` chunks mapped
  with ``mmap(MAP_FIXED)`` into ``PROT_NONE`` reservations): the CPU counterpart, and what
  runs the remap path in tests on machines without a GPU. It enforces CUDA's rules (sizes
  and addresses on the granularity, whole mappings), can run at CUDA's 2 MiB granularity,
  and can be made to fail a chosen call.

Mapping undoes itself when access cannot be granted, and unmapping waits for the compute
stream once per batch of chunks (``VmmDriver.sync``), never for the whole device.
"""

from engines.vmm.arena import Arena, VirtualRange
from engines.vmm.driver import Chunk, VmmDriver, VmmError, make_driver

__all__ = ["Arena", "Chunk", "VirtualRange", "VmmDriver", "VmmError", "make_driver"]
