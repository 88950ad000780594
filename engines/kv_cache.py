"""The paged KV pool: device memory holding K and V, one page per (layer, page_size tokens).

Layout: ``data[max_pages, 2, page_size, num_kv_heads, head_size]``. A page is one
contiguous slab (K rows then V rows), so moving or freeing a page is one region. Token
slots are addressed in the flat view ``[max_pages * 2 * page_size, num_kv_heads, head_size]``:
token ``o`` of page ``p`` has its K at ``2*p*page_size + o`` and its V ``page_size`` later.

The pool can grow in place. On CPU the whole range the pool may ever need
(``max_pages``) is reserved up front as one anonymous mapping; only the first
``num_pages`` are committed (touched, so resident). ``grow`` commits more pages at the
tail when dropped weights free memory, and ``shrink`` hands the tail back to the OS
(``madvise(MADV_DONTNEED)``). Attention keeps seeing one pool with stable page ids and
nothing is copied. The pages committed at start-up are on transparent huge pages (see
``__init__``).

With an ``Arena`` (``engines.vmm``: CUDA's virtual-memory API on a GPU, shared memory on a
CPU) the pool is instead one reserved address range with physical chunks mapped back to
back: ``extend`` maps the chunks of dropped weight buffers onto its tail (the memory of
the weights becomes KV pages without being freed or copied) and ``detach_chunks``
unmaps them again for the restored weights.
"""

from __future__ import annotations

import mmap

import torch

from engines.config import ModelConfig
from engines.vmm import Arena, Chunk, VirtualRange, VmmError

_OS_PAGE = mmap.PAGESIZE


class KVPool:
    """Device memory for KV pages. Which page belongs to whom is tracked elsewhere."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device | str, max_pages: int | None = None, lazy: bool = False,
                 arena: Arena | None = None) -> None:
        if page_size <= 0 or num_pages <= 0:
            raise ValueError("page_size and num_pages must be positive")
        device = torch.device(device)
        # Without an arena only the CPU reserves beyond its pages: on CUDA, reserving
        # without allocating takes the driver's virtual-memory API (the arena's driver).
        grows = device.type == "cpu" or arena is not None
        max_pages = max(max_pages or num_pages, num_pages) if grows else num_pages
        self.page_size = page_size
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_size = cfg.head_size
        shape = (max_pages, 2, page_size, self.num_kv_heads, self.head_size)
        self._mapping: mmap.mmap | None = None
        self._range: VirtualRange | None = None
        self.lazy = lazy and device.type == "cpu"
        """Pages become resident when first written, not when committed (the oracle's
        unbounded pool: only the KV in use takes memory)."""
        if arena is not None:
            if self.lazy:
                raise ValueError("a lazy pool (pages resident once written) cannot be a remapped one")
            if arena.driver.device.type != device.type:
                raise ValueError(f"the arena's memory is on {arena.driver.device}, the pool on {device}")
            page_bytes = self.page_bytes_of(shape, dtype)
            self._range = VirtualRange(arena.driver, max_pages * page_bytes)
            self._range.push(arena.chunk(num_pages * page_bytes))
            self.data = self._range.view(max_pages * page_bytes).view(dtype).view(shape)
        elif device.type == "cpu" and (max_pages > num_pages or self.lazy):
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            self._mapping = mmap.mmap(-1, max_pages * self.page_bytes_of(shape, dtype), flags=flags)
            if not self.lazy and hasattr(mmap, "MADV_HUGEPAGE"):
                # Transparent huge pages for the pages committed now: KV copied between ranks
                # (process_vm_readv pins memory page by page) moves at the speed of large
                # buffers; the exchange's first batch went from 62% to 72% of raw MPI's
                # bandwidth (perf.bench_kunserve). Not for the tail a drop grows into: its
                # memory comes from just-freed weights, and with huge pages there the median
                # drop latency rose from ~300 ms to ~500 ms (kernel compaction, presumably).
                base = num_pages * self.page_bytes_of(shape, dtype) // _OS_PAGE * _OS_PAGE
                if base:
                    self._mapping.madvise(mmap.MADV_HUGEPAGE, 0, base)
            self.data = torch.frombuffer(self._mapping, dtype=dtype).view(shape)
        else:
            # Zeroed, not empty: padded attention reads masked slots, and 0 * NaN would poison it.
            self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.flat = self.data.view(-1, self.num_kv_heads, self.head_size)
        self.num_pages = 0
        self._commit(num_pages)

    @staticmethod
    def page_bytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = 1
        for d in shape[1:]:
            n *= d
        return n * torch.empty((), dtype=dtype).element_size()

    @property
    def max_pages(self) -> int:
        return self.data.shape[0]

    @property
    def page_bytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    @staticmethod
    def page_nbytes(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        return page_size * cfg.kv_bytes_per_token_per_layer(dtype)

    @property
    def nbytes(self) -> int:
        """Committed bytes (what the pool holds now, not what it reserved)."""
        return self.num_pages * self.page_bytes

    def _commit(self, new_num_pages: int) -> None:
        # Zeroing touches the pages: the memory is really taken now, not at first use.
        # A lazy pool's fresh anonymous pages are zero already and stay untouched.
        if not self.lazy:
            self.data[self.num_pages:new_num_pages].zero_()
        self.num_pages = new_num_pages

    def grow(self, extra_pages: int) -> None:
        """Commit ``extra_pages`` more pages at the tail of the reserved range."""
        if self._range is not None:
            raise ValueError("a remapped pool grows by extend(chunks), not by committing pages")
        if self.data.device.type != "cpu" and extra_pages:
            raise ValueError("a CUDA KV pool grows in place only as a remapped pool (an Arena from "
                             "engines.vmm: --kv-extension remap, with cuda-bindings installed)")
        if extra_pages < 0 or self.num_pages + extra_pages > self.max_pages:
            raise ValueError(f"cannot grow {self.num_pages} pages by {extra_pages}: "
                             f"{self.max_pages} are reserved")
        self._commit(self.num_pages + extra_pages)

    @property
    def remapped(self) -> bool:
        """Whether the pool is a range of chunks (``extend`` / ``detach_chunks``)."""
        return self._range is not None

    def extend(self, chunks: list[Chunk]) -> int:
        """Map ``chunks`` onto the tail; returns how many pages the pool grew by.

        The chunks' previous contents are zeroed as their pages are committed.
        """
        if self._range is None:
            raise ValueError("only a remapped pool (one made with an arena) takes chunks")
        self._range.check_room(sum(c.nbytes for c in chunks))  # all or nothing
        for i, chunk in enumerate(chunks):
            try:
                self._range.push(chunk)
            except VmmError:  # all or nothing here too: the chunks stay the caller's
                self._range.pop_many(i, synced=True)  # mapped just now: nothing used them
                raise
        before = self.num_pages
        self._commit(min(self.max_pages, self._range.mapped // self.page_bytes))
        return self.num_pages - before

    def detach_chunks(self, num_pages: int) -> list[Chunk]:
        """Shrink to ``num_pages`` (the pages above are empty) and unmap every chunk the
        smaller pool does not need, after one wait for the device; they are the caller's now."""
        if self._range is None:
            raise ValueError("only a remapped pool has chunks to detach")
        if not 0 < num_pages <= self.num_pages:
            raise ValueError(f"cannot shrink {self.num_pages} pages to {num_pages}")
        chunks = self._range.pop_many(self._spare_chunks(num_pages * self.page_bytes))
        self.num_pages = num_pages
        return chunks

    def _spare_chunks(self, nbytes: int) -> int:
        """How many chunks off the tail the first ``nbytes`` do not need (never the first)."""
        rng, count, mapped = self._range, 0, self._range.mapped
        while count < len(rng.chunks) - 1 and mapped - rng.chunks[-1 - count].nbytes >= nbytes:
            mapped -= rng.chunks[-1 - count].nbytes
            count += 1
        return count

    def shrink(self, num_pages: int) -> None:
        """Give the pages from ``num_pages`` on back; the caller has emptied them."""
        if self._range is not None:
            raise ValueError("a remapped pool gives its tail back with detach_chunks")
        if not 0 < num_pages <= self.num_pages:
            raise ValueError(f"cannot shrink {self.num_pages} pages to {num_pages}")
        if self._mapping is not None:
            start = -(-num_pages * self.page_bytes // _OS_PAGE) * _OS_PAGE
            end = self.num_pages * self.page_bytes // _OS_PAGE * _OS_PAGE
            if end > start:
                self._mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
        self.num_pages = num_pages

    @property
    def reserved(self) -> bool:
        """Whether the pool sits in a reserved range it can grow into and lend out."""
        return self._mapping is not None

    def detach_tail(self, num_pages: int) -> torch.Tensor:
        """Shrink to ``num_pages`` but keep the tail's memory committed, and return it as a
        flat tensor of the pool's dtype: restored weights move into it, so the memory the
        drop turned into KV turns back into weights without a trip through the OS."""
        if self._mapping is None or not 0 < num_pages <= self.num_pages:
            raise ValueError(f"cannot detach the tail above page {num_pages} of this pool")
        per_page = self.data[0].numel()
        tail = self.data.view(-1)[num_pages * per_page:self.num_pages * per_page]
        self.num_pages = num_pages
        return tail

    def release(self, region: torch.Tensor) -> None:
        """Hand a part of the reserved range (a flat view of it, unused) back to the OS."""
        if self._mapping is None or region.numel() == 0:
            return
        base = self.data.data_ptr()
        start = -(-(region.data_ptr() - base) // _OS_PAGE) * _OS_PAGE
        end = (region.data_ptr() - base + region.numel() * region.element_size()) // _OS_PAGE * _OS_PAGE
        if end > start:
            self._mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in this pool's reserved range above its committed pages."""
        if self._mapping is None:
            return False
        start = self.data.data_ptr() + self.num_pages * self.page_bytes
        end = self.data.data_ptr() + self.max_pages * self.page_bytes
        return start <= tensor.data_ptr() < end

    def write(self, k_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V rows ``[n, kv_heads, head]`` at the given K slots (V is a page later)."""
        self.flat.index_copy_(0, k_slots, k)
        self.flat.index_copy_(0, k_slots + self.page_size, v)

    def gather(self, k_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read K and V rows at the given K slots (any shape of index; rows appended)."""
        flat_idx = k_slots.reshape(-1)
        k = self.flat.index_select(0, flat_idx)
        v = self.flat.index_select(0, flat_idx + self.page_size)
        shape = (*k_slots.shape, self.num_kv_heads, self.head_size)
        return k.view(shape), v.view(shape)
