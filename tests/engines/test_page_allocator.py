"""The page allocator hands out ids in the order a list of every id would (first in,
first out), while keeping the ids never used as a range: a pool of millions of pages costs
nothing until used (the simulator's pools at GPU scale), and picking specific pages still works."""

from __future__ import annotations

import random
from collections import deque

import pytest

from engines.paging import OutOfPages, PageAllocator


def test_the_allocation_order_is_a_full_free_lists():
    rng = random.Random(0)
    alloc, ref, held = PageAllocator(50), deque(range(50)), []
    for _ in range(400):
        if held and rng.random() < 0.45:
            pages = held.pop(rng.randrange(len(held)))
            alloc.free(pages)
            ref.extend(pages)
        else:
            n = rng.randint(0, 6)
            if n > len(ref):
                with pytest.raises(OutOfPages):
                    alloc.allocate(n)
                continue
            got = alloc.allocate(n)
            assert got == [ref.popleft() for _ in range(n)]
            held.append(got)
        assert alloc.num_free == len(ref) and alloc.free_pages() == set(ref)
        assert alloc.num_free_below(20) == sum(p < 20 for p in ref)


def test_taking_specific_pages_works_on_ids_never_handed_out():
    alloc = PageAllocator(10)
    assert alloc.allocate(2) == [0, 1]
    alloc.take([5, 7])
    assert alloc.free_pages() == {2, 3, 4, 6, 8, 9}
    assert alloc.allocate_below(2, 5) == [2, 3]
    with pytest.raises(OutOfPages):
        alloc.take([5])
    assert alloc.allocate(3) == [4, 6, 8]


def test_a_huge_pool_is_free_to_make():
    alloc = PageAllocator(10**9)
    assert alloc.num_free == 10**9 and alloc.allocate(3) == [0, 1, 2]
