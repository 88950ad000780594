"""Pieces the ingress's route modules share."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from orchestrator.contracts import IngressBackend
from orchestrator.ingress.errors import InvalidRequest

BACKEND_KEY = web.AppKey("backend", IngressBackend)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; a 400 naming the problem otherwise."""
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
