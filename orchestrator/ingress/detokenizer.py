"""Incremental detokenization for streamed answers.

A byte-level tokenizer may split one character over several tokens ('é' is two byte
tokens); decoding them one at a time would send broken text. The decoder holds text back
while it ends with U+FFFD (an incomplete UTF-8 sequence) and sends the difference once
the character is whole.
"""

from __future__ import annotations

from engines.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas whose concatenation is the full text.

    Rather than decoding all ids on every token (quadratic in the output length), it
    decodes a short window from ``prefix_offset``, as vLLM does: the text of the window
    before the new tokens and the text of the window with them differ by exactly the new
    text, and decoding both from the same token keeps tokenizers that treat a leading
    token specially (SentencePiece's leading space) consistent.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text they complete (empty while a character is incomplete)."""
        self.token_ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back (at the end of the answer)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self.token_ids):
            return ""
        prefix_text = self._tok.decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._tok.decode(self.token_ids[self._prefix_offset:])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return new_text[len(prefix_text):]
