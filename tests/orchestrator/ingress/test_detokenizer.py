"""Incremental decoding never emits a broken character and adds up to the full text."""

from __future__ import annotations

from orchestrator.ingress.detokenizer import IncrementalDecoder


def test_split_characters_are_held_back(tokenizer):
    text = "a€é 日本語 b😀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.push([t]) for t in ids] + [dec.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == tokenizer.decode(ids)
    assert deltas[1:4] == ["", "", "€"]


def test_chunks_of_several_tokens_and_special_tokens(tokenizer):
    ids = tokenizer.encode("xé<|im_end|>yz", add_special_tokens=True)
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.push(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [dec.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == "xéyz"


def test_flush_sends_an_incomplete_tail(tokenizer):
    ids = tokenizer.encode("é", add_special_tokens=False)
    dec = IncrementalDecoder(tokenizer)
    assert dec.push(ids[:1]) == ""
    assert dec.flush() == tokenizer.decode(ids[:1]) == "\ufffd"
    assert dec.flush() == ""
