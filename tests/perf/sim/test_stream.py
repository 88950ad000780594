"""The simulator's request stream: a synthetic prompt is its tokens on demand, equal to the
list it stands for, and a Mooncake request's blocks stay shared."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.policy.dispatch import block_hashes
from perf.sim.stream import VOCAB, SyntheticPrompt, synthetic_stream


def test_a_synthetic_prompt_is_the_list_it_stands_for():
    p = SyntheticPrompt(20_000, 37)
    whole = [(20_000 * 7_919 + j) % VOCAB for j in range(37)]
    assert list(p) == whole and len(p) == 37 and p[-1] == whole[-1] and p[3] == whole[3]
    assert p[5:20] == whole[5:20] and p[30:99] == whole[30:] and p[::4] == whole[::4]
    assert block_hashes(p, 16) == block_hashes(whole, 16)
    with pytest.raises(IndexError):
        p[37]


def test_the_stream_shares_only_what_the_trace_shares():
    trace = SimpleNamespace(requests=[
        SimpleNamespace(arrival_s=0.0, input_len=40, output_len=5, block_hashes=None),
        SimpleNamespace(arrival_s=0.1, input_len=40, output_len=0, block_hashes=None),
        SimpleNamespace(arrival_s=0.2, input_len=6, output_len=3, block_hashes=[7, 9]),
        SimpleNamespace(arrival_s=0.3, input_len=6, output_len=3, block_hashes=[7, 8])])
    (a, _, pa, na), (_, _, pb, nb), (_, _, pc, _), (_, _, pd, _) = synthetic_stream(trace)
    assert a == "r0000000" and na == 5 and nb == 1  # at least one token
    assert isinstance(pa, SyntheticPrompt) and list(pa)[:8] != list(pb)[:8]
    assert pc[:3] == pd[:3] and pc[3:] != pd[3:]


def test_gaps_are_binned_by_the_requests_decoding_at_the_time():
    from perf.sim.gaps import binned_gaps
    alone = [[0.0, 1.0, 2.0]]  # one request: its gaps fall in bin 0
    assert binned_gaps(alone) == {0: [1.0, 1.0]}
    crowd = [[10.0 + i * 0.01, 11.0, 12.0] for i in range(5)]  # five decoding at once: bin 1 (4-7)
    assert set(binned_gaps(crowd)) == {1}
