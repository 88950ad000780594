"""Fixtures for ingress tests: the tiny model's tokenizer, a fake backend, a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.tokenizer import Tokenizer
from orchestrator.ingress.server import IngressServer
from tests.orchestrator.ingress.fake_backend import FakeBackend


@pytest.fixture(scope="session")
def tokenizer(tiny_store: Path) -> Tokenizer:
    """The byte-level tokenizer of the tiny model ('é' is two tokens)."""
    return Tokenizer(tiny_store / "tokenizer")


@pytest.fixture
def backend(tokenizer: Tokenizer) -> FakeBackend:
    return FakeBackend(tokenizer=tokenizer)


@pytest.fixture
def server(backend: FakeBackend) -> Iterator[IngressServer]:
    """A real ``IngressServer`` on an OS-chosen port, stopped after the test."""
    srv = IngressServer(backend, host="127.0.0.1", port=0, shutdown_timeout=0.5)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
