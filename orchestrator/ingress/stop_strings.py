"""Stop strings (OpenAI ``stop``; TensorRT-LLM's ``stop_words``) on the detokenized stream.

Text that could be the start of a stop string is held back until the next tokens show
whether it is one, so a client never sees part of a stop string (vLLM does the same).
"""

from __future__ import annotations

MAX_STOP_STRINGS = 16


class StopStringMatcher:
    """Feeds new text through; reports where the first stop string ends the answer."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of ``held + text`` that is safe to send; sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[:min(hits)]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation: the held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
