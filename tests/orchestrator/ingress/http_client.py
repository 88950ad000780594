"""Small synchronous HTTP helpers for ingress tests (each call runs its own event loop)."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass
class Reply:
    status: int
    body: Any
    """Parsed JSON, or the text when the body is not JSON."""
    headers: dict[str, str]


def call(url: str, method: str = "GET", body: Any = None, data: bytes | None = None) -> Reply:
    """One request; ``body`` is sent as JSON, ``data`` as raw bytes."""
    return asyncio.run(_call(url, method, body, data))


async def _call(url: str, method: str, body: Any, data: bytes | None) -> Reply:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        # A stream, not bytes: aiohttp warns that a large bytes body blocks the loop.
        kwargs: dict[str, Any] = {"data": io.BytesIO(data)} if data is not None else {}
        if body is not None:
            kwargs["json"] = body
        async with s.request(method, url, **kwargs) as r:
            text = await r.text()
            try:
                parsed: Any = json.loads(text)
            except json.JSONDecodeError:
                parsed = text
            return Reply(r.status, parsed, dict(r.headers))


def sse(url: str, body: Any) -> tuple[int, list[Any]]:
    """POST a streaming request; return the status and the ``data:`` payloads in order
    (parsed JSON, or the string ``[DONE]``)."""
    return asyncio.run(_sse(url, body))


async def _sse(url: str, body: Any) -> tuple[int, list[Any]]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(url, json=body) as r:
            if r.status != 200:
                return r.status, [await r.json()]
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = (await r.read()).decode()
    events: list[Any] = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return 200, events
