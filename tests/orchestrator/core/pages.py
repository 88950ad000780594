"""Test helpers for KV page counts."""

from __future__ import annotations

from orchestrator.core.block_manager import BlockManager


def free_pages(blocks: BlockManager) -> int:
    """Free pages over all of an instance's pools."""
    return sum(total - used for used, total in blocks.usage())
