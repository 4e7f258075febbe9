"""``api/session/login``: an integration's admin credentials in, an API token for that integration out.

The credentials must match the stored ones (compared in constant time) AND be accepted by Xelion
(a password changed on the phone system since it was stored no longer opens the API). Every failure
is the same 401/10004, whether the integration, the user name or the password was wrong, and counts
toward the login limiter. The token is 40 random hex characters, like Xelion's own; only its SHA-256
is stored; it is valid for ``session_ttl_seconds``, reported as ``validUntil`` in Xelion's
``YYYY-MM-DD HH:MM:SS`` UTC form (the manual).
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from cti_bridge.admin import schemas
from cti_bridge.admin.auth import LoginLimiter, client_address, get_limiter
from cti_bridge.admin.body import read_model
from cti_bridge.admin.common import xelion_failure
from cti_bridge.admin.deps import AdminDeps, get_deps
from cti_bridge.clock import xelion_time
from cti_bridge.errors import ApiError, ErrorCode
from cti_bridge.ports import XelionCheckError, XelionTarget
from cti_bridge.store import integrations as store
from cti_bridge.store.crypto import constant_time_equal, hash_token

router = APIRouter(prefix="/api/session", tags=["session"])

Deps = Annotated[AdminDeps, Depends(get_deps)]

# Compared against when no integration matches, so that the answer takes as long either way.
_NO_SUCH_SECRET = "\x01" * 32


def _refused() -> ApiError:
    return ApiError(401, ErrorCode.WRONG_CREDENTIALS, "Wrong user name, password or tenant", "")


@router.post(
    "/login",
    summary="Log in with an integration's admin credentials; the token reaches that integration",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LoginIn"}}},
        }
    },
    responses={
        200: {"model": schemas.LoginOut},
        401: {"model": schemas.ErrorOut},
        429: {"model": schemas.ErrorOut},
        502: {"model": schemas.ErrorOut},
    },
)
async def login(request: Request, deps: Deps) -> JSONResponse:
    limiter = get_limiter(request)
    address = client_address(request)
    limiter.check(address)
    # The body first: a request that never finishes sending it must not hold an attempt's place
    # (enough of them locked every correct login of the address out; a review's finding).
    body = await read_model(request, schemas.LoginIn)
    with limiter.attempt(address):
        return await _login(body, deps, limiter, address)


async def _login(body: schemas.LoginIn, deps: Deps, limiter: LoginLimiter, address: str) -> JSONResponse:
    view = await deps.database.run(lambda s: store.find_integration(s, body.host, body.tenant))
    stored = None
    if view is not None:
        xid = view.xelion.id
        stored = await deps.database.run(lambda s: store.admin_credentials(s, deps.secret_box, xid))
    user_ok = constant_time_equal(body.adminUsername, stored[0] if stored else _NO_SUCH_SECRET)
    password_ok = constant_time_equal(body.adminPassword, stored[1] if stored else _NO_SUCH_SECRET)
    if view is None or stored is None or not (user_ok and password_ok):
        limiter.failure(address)
        raise _refused()
    x = view.xelion
    target = XelionTarget(protocol=x.protocol, host=x.host, tenant=x.tenant)
    try:
        await deps.directory.check_admin(target, body.adminUsername, body.adminPassword)
    except XelionCheckError as exc:
        err = xelion_failure(exc, target)
        if err.code == ErrorCode.WRONG_CREDENTIALS:
            limiter.failure(address)
            raise _refused() from None
        raise err from None
    limiter.success(address)
    token = secrets.token_hex(20)
    now = deps.clock.now()
    valid_until = now + timedelta(seconds=deps.settings.session_ttl_seconds)
    await deps.database.run(
        lambda s: store.create_session(
            s, token_hash=hash_token(token), xelion_context_id=x.id, valid_until=valid_until, now=now
        )
    )
    return JSONResponse({"authentication": token, "validUntil": xelion_time(valid_until)})
