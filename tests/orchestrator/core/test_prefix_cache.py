"""The prefix cache's bookkeeping, without a model: hash chains, LRU, references, audits."""

from __future__ import annotations

import pytest

import orchestrator.core.prefix_cache as pc
from engines.mapping import LayerRange
from engines.sampling import SamplingParams
from orchestrator.core.block_manager import BlockManager, PoolSpec
from engines.paging import ROOT_HASH, block_hashes
from orchestrator.core.prefix_cache import PrefixCache
from orchestrator.core.request import Request

PS = 4


def request(tokens: list[int]) -> Request:
    return Request(f"r{tokens[:3]}", list(tokens), SamplingParams(max_tokens=4), max_model_len=512)


def computed(bm: BlockManager, req: Request) -> Request:
    """Allocate and 'compute' the whole prompt (as a step would), then cache its full blocks."""
    bm.match(req)
    assert bm.allocate(req, req.num_tokens - req.num_computed_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.cache_computed(req)
    return req


def test_hash_chains_depend_on_the_tokens_and_everything_before():
    a = block_hashes(list(range(12)), PS, 3)
    assert a == block_hashes(list(range(12)), PS, 3)
    changed = block_hashes([99] + list(range(1, 12)), PS, 3)
    assert all(x != y for x, y in zip(a, changed))  # a change in block 0 changes every later hash
    tail = block_hashes(list(range(8)) + [99, 9, 10, 11], PS, 3)
    assert tail[:2] == a[:2] and tail[2] != a[2]


def test_lru_order_and_reacquire():
    cache = PrefixCache(PS)
    a = cache.insert(ROOT_HASH, (1, 2, 3, 4), (10,))
    b = cache.insert(a.hash, (5, 6, 7, 8), (11,))
    cache.release(b)
    cache.release(a)
    assert [blk.hash for blk in cache.evictable()] == [b.hash, a.hash]
    cache.acquire(b)
    assert [blk.hash for blk in cache.evictable()] == [a.hash]
    assert cache.evict() is a and not cache.lru
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release(a)


def test_a_hash_collision_is_never_a_hit(monkeypatch):
    monkeypatch.setattr(pc, "block_hash", lambda parent, tokens: 7)
    cache = PrefixCache(PS)
    cache.insert(ROOT_HASH, (1, 2, 3, 4), (10,))
    assert cache.lookup([9, 9, 9, 9, 1], 4) == []


def test_shared_blocks_are_counted_freed_kept_and_evicted():
    bm = BlockManager(PS, [PoolSpec(LayerRange(0, 2), 12), PoolSpec(LayerRange(2, 3), 6)], prefix_caching=True)
    prompt = list(range(10))  # 2 full blocks and a partial one
    a = computed(bm, request(prompt))
    assert len(a.prefix_blocks) == 2 and bm.usage() == [(6, 12), (3, 6)]
    b = request(prompt[:8] + [50, 51, 52])  # shares two blocks, then its own
    assert bm.match(b) == 8 and [blk.refs for blk in b.prefix_blocks] == [2, 2]
    assert b.block_table[0][:2] == a.block_table[0][:2] and b.block_table[2][:2] == a.block_table[2][:2]
    assert bm.allocate(b, 3)
    bm.audit([a, b])
    bm.free(a)
    bm.audit([b])
    assert [blk.refs for blk in b.prefix_blocks] == [1, 1]
    bm.free(b)
    bm.audit([])
    assert len(bm.cache.lru) == 2 and bm.usage() == [(0, 12), (0, 6)]  # cached, but free to use
    c = request(list(range(100, 124)))  # 6 blocks: needs the cached pages back
    assert bm.allocate(c, 24)
    assert not bm.cache.blocks  # both evicted, least recently used first
    bm.audit([c])


def test_the_last_token_is_always_computed():
    bm = BlockManager.single(32, PS, 2, prefix_caching=True)
    computed(bm, request(list(range(8))))
    again = request(list(range(8)))
    assert bm.match(again) == 4  # 8 tokens cached, but the 8th must be computed for its logits


def test_an_equal_block_cached_first_closes_the_later_chain():
    bm = BlockManager.single(32, PS, 1, prefix_caching=True)
    a, b = request(list(range(8))), request(list(range(8)))
    for r in (a, b):  # both computed at once: neither could hit the other
        assert bm.allocate(r, 8)
        r.num_computed_tokens = 8
    bm.cache_computed(a)
    bm.cache_computed(b)
    assert len(a.prefix_blocks) == 2 and b.prefix_blocks == [] and b.prefix_closed
    bm.audit([a, b])
    bm.free(b)
    bm.free(a)
    bm.audit([])


def test_an_audit_finds_a_page_both_cached_and_owned():
    bm = BlockManager.single(32, PS, 1, prefix_caching=True)
    a = computed(bm, request(list(range(6))))
    bm.free(a)
    thief = request([1, 2])
    thief.block_table = [[next(iter(bm.cache.blocks.values())).pages[0]]]
    with pytest.raises(RuntimeError, match="owned twice|leaked or double-booked"):
        bm.audit([thief])


def test_a_request_asking_for_prompt_logprobs_computes_its_whole_prompt():
    """Its prompt's log-probabilities need every position computed (vLLM skips the cache too)."""
    bm = BlockManager.single(32, PS, 2, prefix_caching=True)
    computed(bm, request(list(range(9))))
    plain, scored = request(list(range(9))), request(list(range(9)))
    scored.sampling = SamplingParams(max_tokens=4, prompt_logprobs=1)
    assert bm.match(plain) == 8 and bm.match(scored) is None and scored.num_computed_tokens == 0


def test_a_freed_prefix_loses_its_tail_first():
    """The last block of a freed request is evicted first, so what stays cached is still a
    prefix reachable from the root (evicting the head first would strand the rest)."""
    bm = BlockManager.single(32, PS, 2, prefix_caching=True)
    req = computed(bm, request(list(range(13))))
    first, second, third = req.prefix_blocks
    bm.free(req)
    assert [b.hash for b in bm.cache.evictable()] == [third.hash, second.hash, first.hash]
    bm.cache.evict()
    assert bm.match(request(list(range(13)))) == 2 * PS
