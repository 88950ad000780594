"""Log-probabilities in OpenAI's two shapes: completions' parallel lists and chat's content list.

The engine reports ``TokenLogprob`` records (raw model log-probabilities, see
``engines/sampling.py``); this module spells them the way clients parse them. Token
strings are each token decoded alone (a piece of a multi-byte character decodes to
U+FFFD, as in vLLM); ``text_offset`` counts characters of those strings from the start
of the answer's text (the prompt's when echoed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engines.sampling import TokenLogprob
from engines.tokenizer import Tokenizer


@dataclass
class LogprobFormatter:
    """Formats one choice's log-probabilities, chunk by chunk (it keeps the text offset)."""

    tokenizer: Tokenizer
    kind: str
    """``completion`` or ``chat``."""
    top: int
    """Alternatives per token the client asked for."""
    offset: int = 0
    _strings: dict[int, str] = field(default_factory=dict)

    def token(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            s = self._strings[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    def format(self, lps: list[TokenLogprob], echo_prompt: list[TokenLogprob] | None = None,
               first_prompt_token: int | None = None) -> dict[str, Any]:
        """This chunk's tokens; ``echo_prompt`` (completions) puts the prompt's first."""
        if self.kind == "chat":
            return {"content": [self._chat_entry(lp) for lp in lps]}
        body: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first_prompt_token is not None:  # the prompt's first token has no log-probability
            self._append(body, self.token(first_prompt_token), None, None)
        for lp in (echo_prompt or []) + lps:
            self._append(body, self.token(lp.token_id), lp.logprob, self._top_dict(lp))
        return body

    def _append(self, body: dict[str, Any], text: str, logprob: float | None, top: dict | None) -> None:
        body["tokens"].append(text)
        body["token_logprobs"].append(logprob)
        body["top_logprobs"].append(top)
        body["text_offset"].append(self.offset)
        self.offset += len(text)

    def _top_dict(self, lp: TokenLogprob) -> dict[str, float]:
        """The k most likely, and the chosen token (OpenAI lists it even when not among them)."""
        top = {self.token(t): v for t, v in lp.top[:self.top]}
        top.setdefault(self.token(lp.token_id), lp.logprob)
        return top

    def _chat_entry(self, lp: TokenLogprob) -> dict[str, Any]:
        text = self.token(lp.token_id)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": self.token(t), "logprob": v,
                                  "bytes": list(self.token(t).encode("utf-8"))} for t, v in lp.top[:self.top]]}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One choice's chunks joined (a non-streamed answer)."""
    if not parts:
        return None
    out: dict[str, Any] = {k: [] for k in parts[0]}
    for part in parts:
        for k, v in part.items():
            out[k].extend(v)
    return out
