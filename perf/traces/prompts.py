"""Prompt texts of an exact token length, for replaying traces that record lengths only.

A prompt is a run of vocabulary words that are each one token, so its length is nearly the
word count; the exact count is then checked with the tokenizer itself, with special tokens,
exactly as the server counts it, and fixed up by adding or removing words.
"""

from __future__ import annotations

import random
import re
from typing import Protocol

# Space-led words: byte-level BPE pre-tokenizers split text before each space, so a run of
# them tokenizes word by word and the count is additive.
_SPACED_WORD = re.compile(r" [a-z]{2,}")
_LETTERS = re.compile(r"[A-Za-z]+")
_MIN_WORDS = 32           # fewer space-led words than this: fall back to plain letter tokens
_DISTINCT_INDICES = 2 ** 20  # prompts for at least this many indices start differently
_MAX_FIX_ROUNDS = 64


class TokenizerLike(Protocol):
    """What :class:`PromptSynthesizer` needs of ``engines.tokenizer.Tokenizer``."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class PromptSynthesizer:
    """Makes prompts that ``tokenizer`` encodes, special tokens included, to an exact length.

    ``prompt(n, index)`` is deterministic from ``(seed, index)``. The first words spell
    ``index`` in a seed-shuffled word alphabet, so prompts for different indices differ from
    their first word on (for at least ``2**20`` indices, given enough tokens) and a prefix cache
    cannot share them; the rest is random words.
    """

    def __init__(self, tokenizer: TokenizerLike, seed: int = 0) -> None:
        self._tok = tokenizer
        self.seed = seed
        # BOS (and any other template tokens) that every encoding carries.
        self.overhead = len(tokenizer.encode("", add_special_tokens=True))
        self._words = _single_token_words(tokenizer)
        self._alphabet = random.Random(f"{seed}/alphabet").sample(self._words, len(self._words))
        self._width = 1
        while len(self._alphabet) ** self._width < _DISTINCT_INDICES:
            self._width += 1

    @property
    def min_tokens(self) -> int:
        """The shortest possible prompt: the special tokens plus one word (the server refuses '')."""
        return self.overhead + 1

    def prompt(self, n_tokens: int, index: int) -> str:
        """A text that encodes to exactly ``n_tokens`` tokens, the same for the same ``index``."""
        if n_tokens < self.min_tokens:
            raise ValueError(f"n_tokens={n_tokens} is impossible: a non-empty prompt has at least "
                             f"{self.min_tokens} tokens with this tokenizer")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        body = n_tokens - self.overhead
        rng = random.Random(f"{self.seed}/{index}")
        words = (self._index_words(index) + self._draw(rng, body))[:body]
        return self._fit(words, n_tokens, rng)

    def prompt_blocks(self, block_hashes: tuple[int, ...], n_tokens: int, block_tokens: int) -> str:
        """A text of exactly ``n_tokens`` tokens made of one ``block_tokens``-word block per
        hash (the last cut short): equal hashes give identical blocks, so requests that share
        leading hashes share that token prefix, as Mooncake's ``hash_ids`` mean. Words are
        single space-led tokens, so blocks tokenize the same wherever they stand."""
        if n_tokens < self.min_tokens:
            raise ValueError(f"n_tokens={n_tokens} is impossible: a non-empty prompt has at least "
                             f"{self.min_tokens} tokens with this tokenizer")
        body = n_tokens - self.overhead
        if len(block_hashes) * block_tokens < body:
            raise ValueError(f"{len(block_hashes)} blocks of {block_tokens} tokens cannot make {body}")
        words = [w for h in block_hashes for w in self._draw(random.Random(f"{self.seed}/block/{h}"), block_tokens)]
        text = "".join(words[:body])
        got = len(self._tok.encode(text, add_special_tokens=True))
        if got != n_tokens:
            raise ValueError(f"a block prompt encoded to {got} tokens, not {n_tokens}: this tokenizer merges "
                             "across words")
        return text

    def _index_words(self, index: int) -> list[str]:
        # Least significant digit first, so that consecutive indices differ at the first word.
        base = len(self._alphabet)
        digits = []
        for _ in range(self._width):
            index, digit = divmod(index, base)
            digits.append(self._alphabet[digit])
        return digits

    def _draw(self, rng: random.Random, count: int) -> list[str]:
        return rng.choices(self._words, k=count)

    def _fit(self, words: list[str], n_tokens: int, rng: random.Random) -> str:
        """Add or drop trailing words until the text is exactly ``n_tokens`` tokens."""
        for _ in range(_MAX_FIX_ROUNDS):
            text = "".join(words)
            diff = n_tokens - len(self._tok.encode(text, add_special_tokens=True))
            if diff == 0:
                return text
            if diff > 0:
                words.extend(self._draw(rng, diff))
            elif len(words) > 1:
                del words[max(1, len(words) + diff):]
            else:  # one word that is more than one token here: try another
                words[0] = rng.choice(self._words)
        raise ValueError(f"could not make a prompt of exactly n_tokens={n_tokens} tokens "
                         f"in {_MAX_FIX_ROUNDS} rounds; this tokenizer merges across words")


def _single_token_words(tokenizer: TokenizerLike) -> list[str]:
    """Vocabulary pieces that are one token on their own: space-led words, else plain letters."""
    pieces = {tokenizer.decode([i]) for i in range(tokenizer.vocab_size)}
    for pattern in (_SPACED_WORD, _LETTERS):
        words = sorted(p for p in pieces if pattern.fullmatch(p)
                       and len(tokenizer.encode(p, add_special_tokens=False)) == 1)
        if len(words) >= _MIN_WORDS:
            return words
    raise ValueError("the tokenizer has too few single-token words to build prompts from")
