"""A trace's requests as the simulator's request stream, without holding every prompt.

A GPU preset replays up to hundreds of thousands of requests of about a thousand tokens
each; as Python lists their prompts alone would take gigabytes. A ``SyntheticPrompt`` is
the prompt's recipe (its length and a per-request offset) and gives its tokens on demand;
the simulated instance builds the token list when the request arrives there and lets it go
when the request ends, so memory follows the requests in flight, not the trace.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

VOCAB = 120_000
"""Token ids are drawn below this (Llama-3's vocabulary is 128,256)."""


class SyntheticPrompt(Sequence[int]):
    """Token ``j`` of request ``i``'s prompt is ``(i * 7_919 + j) % VOCAB``: every prompt is
    unique, so nothing is shared in the prefix cache by chance."""

    __slots__ = ("index", "length")

    def __init__(self, index: int, length: int) -> None:
        self.index = index
        self.length = length

    def __len__(self) -> int:
        return self.length

    def _token(self, j: int) -> int:
        return (self.index * 7_919 + j) % VOCAB

    def __getitem__(self, key):
        if isinstance(key, slice):
            base = self.index * 7_919  # _token inlined: a prompt is built token by token on arrival
            return [(base + j) % VOCAB for j in range(*key.indices(self.length))]
        if not -self.length <= key < self.length:
            raise IndexError(key)
        return self._token(key % self.length)

    def __iter__(self) -> Iterator[int]:
        return iter(self[:])


def synthetic_stream(trace) -> list[tuple[str, float, Sequence[int], int]]:
    """A trace's requests as (request id, arrival s, prompt, max tokens): a
    ``SyntheticPrompt`` each, or for a Mooncake request its blocks (``hash_ids``) as equal
    tokens for equal ids, so that what the trace shares is shared here."""
    out: list[tuple[str, float, Sequence[int], int]] = []
    for i, r in enumerate(trace.requests):
        if r.block_hashes:
            per = -(-r.input_len // len(r.block_hashes))
            ids: Sequence[int] = [(h * 1_000_003 + j) % VOCAB for h in r.block_hashes for j in range(per)][:r.input_len]
        else:
            ids = SyntheticPrompt(i, r.input_len)
        out.append((f"r{i:07d}", r.arrival_s, ids, max(1, r.output_len)))
    return out
