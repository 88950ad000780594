"""Operator endpoints: ``/admin/state``, ``/admin/plan``, ``/admin/regroup``, ``/admin/drop``,
``/admin/restore``.

The POST endpoints change the cluster; with ``--admin-token`` set they need the header
``Authorization: Bearer TOKEN``. Operations that wait for every rank run in a worker
thread, so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Callable

from aiohttp import web

from orchestrator.contracts import BackendUnavailable, Refused, ReshapeTimeout
from orchestrator.ingress.http_util import BACKEND_KEY, read_json
from orchestrator.ingress.errors import ApiError, InvalidRequest

TOKEN_KEY = web.AppKey("admin_token", str)


def add_admin_routes(app: web.Application, admin_token: str | None) -> None:
    app[TOKEN_KEY] = admin_token or ""
    app.router.add_get("/admin/state", _state)
    app.router.add_get("/admin/plan", _plan)
    app.router.add_post("/admin/regroup", _regroup)
    app.router.add_post("/admin/drop", _drop)
    app.router.add_post("/admin/restore", _restore)


def _check_token(request: web.Request) -> None:
    token = request.app[TOKEN_KEY]
    if not token:
        return
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "this admin endpoint needs 'Authorization: Bearer <--admin-token>'")


async def _run(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except Refused as exc:  # not possible in this state
        raise ApiError(409, str(exc)) from None
    except ReshapeTimeout as exc:
        raise ApiError(504, str(exc)) from None
    except ValueError as exc:  # a bad argument (a --groups text that does not parse, say)
        raise ApiError(400, str(exc)) from None
    except BackendUnavailable as exc:
        raise ApiError(503, f"the cluster is not serving ({exc})") from None


async def _state(request: web.Request) -> web.Response:
    try:
        state = request.app[BACKEND_KEY].state()
    except BackendUnavailable as exc:
        raise ApiError(503, f"the cluster is not serving ({exc})") from None
    return web.json_response(state.to_json())


async def _plan(request: web.Request) -> web.Response:
    """What the reshape policy would do now, without doing it."""
    return web.json_response(await _run(request, request.app[BACKEND_KEY].plan))


async def _regroup(request: web.Request) -> web.Response:
    _check_token(request)
    body = await read_json(request)
    groups = body.get("groups") if isinstance(body, dict) else None
    if not isinstance(groups, str) or not groups.strip():
        raise InvalidRequest('the body must be {"groups": "<ranks, e.g. 0-1,2,3>"}')
    await _run(request, request.app[BACKEND_KEY].regroup, groups)
    return web.json_response({"status": "ok", "groups": groups})


def _group_of(body: Any, required: bool) -> list[int] | None:
    group = body.get("group") if isinstance(body, dict) else None
    if group is None and not required:
        return None
    if not isinstance(group, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in group):
        raise InvalidRequest('the body must be {"group": [rank, rank, ...]}')
    return group


async def _drop(request: web.Request) -> web.Response:
    _check_token(request)
    group = _group_of(await read_json(request), required=True)
    formed = await _run(request, request.app[BACKEND_KEY].drop, group)
    return web.json_response({"status": "ok", "group": list(formed) if formed else group})


async def _restore(request: web.Request) -> web.Response:
    _check_token(request)
    group = _group_of(await read_json(request), required=False)
    restored = await _run(request, request.app[BACKEND_KEY].restore, group)
    return web.json_response({"status": "ok", "restored": [list(g) for g in restored]})
