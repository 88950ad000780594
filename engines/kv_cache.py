"""The paged KV pool: device memory holding K and V, one page per (layer, page_size tokens).

Layout: ``data[num_pages, 2, page_size, num_kv_heads, head_size]``. A page is one
contiguous slab (K rows then V rows), so moving or freeing a page is one region. Token
slots are addressed in the flat view ``[num_pages * 2 * page_size, num_kv_heads, head_size]``:
token ``o`` of page ``p`` has its K at ``2*p*page_size + o`` and its V ``page_size`` later.
"""

from __future__ import annotations

import torch

from engines.config import ModelConfig


class KVPool:
    """Device memory for KV pages. Which page belongs to whom is tracked elsewhere."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if page_size <= 0 or num_pages <= 0:
            raise ValueError("page_size and num_pages must be positive")
        self.page_size = page_size
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_size = cfg.head_size
        # Zeroed, not empty: padded attention reads masked slots, and 0 * NaN would poison it.
        self.data = torch.zeros(num_pages, 2, page_size, self.num_kv_heads, self.head_size,
                                dtype=dtype, device=device)
        self.flat = self.data.view(-1, self.num_kv_heads, self.head_size)

    @property
    def num_pages(self) -> int:
        return self.data.shape[0]

    @staticmethod
    def page_nbytes(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        return page_size * cfg.kv_bytes_per_token_per_layer(dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

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

    def read_pages(self, pages: list[int]) -> torch.Tensor:
        """Copy whole pages out (for moving KV between ranks)."""
        return self.data[torch.as_tensor(pages, device=self.data.device)]

    def write_pages(self, pages: list[int], content: torch.Tensor) -> None:
        """Overwrite whole pages with content read by ``read_pages``."""
        self.data[torch.as_tensor(pages, device=self.data.device)] = content
