"""Tokenizer for serving: the ``tokenizers`` library plus the chat template, no transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from engines.errors import StoreError
from engines.store import read_json


class Tokenizer:
    """Encodes prompts, decodes completions and renders chat messages for one model."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise StoreError(f"{path} is missing; rebuild the store")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception
            raise StoreError(f"{path} is corrupt: {exc}") from None
        cfg_path = directory / "tokenizer_config.json"
        self._config: dict[str, Any] = read_json(cfg_path) if cfg_path.is_file() else {}
        template_file = directory / "chat_template.jinja"  # transformers 5 writes it apart
        self.chat_template: str | None = (template_file.read_text() if template_file.is_file()
                                          else self._config.get("chat_template"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat messages to a prompt string with the model's Jinja chat template."""
        if not self.chat_template:
            raise StoreError("this model's tokenizer has no chat template")
        import jinja2.sandbox  # only chat needs jinja2

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        special = {k: v for k, v in self._config.items() if k.endswith("_token") and isinstance(v, str)}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
