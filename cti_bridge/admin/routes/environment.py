"""``api/xelion-environment/{xelionContextId}`` and its ``admin/username`` / ``admin/password`` updates.

The manual swaps the bodies of the two admin updates (``admin/password/update`` shows
``oldUsername``/``newUsername`` and vice versa). The PATH decides what changes here; a body of the
other kind is refused with a 422 that says so, rather than, say, setting the user name to what the
caller meant as a password.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from cti_bridge.admin import schemas
from cti_bridge.admin.auth import Principal, client_address, get_limiter, require_principal
from cti_bridge.admin.body import read_body, validate
from cti_bridge.admin.common import xelion_failure
from cti_bridge.admin.deps import AdminDeps, get_deps
from cti_bridge.errors import ApiError, ErrorCode, conflict, invalid_request, not_found
from cti_bridge.ports import XelionCheckError, XelionTarget
from cti_bridge.store import integrations as store
from cti_bridge.store.crypto import constant_time_equal
from cti_bridge.store.integrations import StoreConflict, XelionView

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/xelion-environment", tags=["xelion-environment"])

Deps = Annotated[AdminDeps, Depends(get_deps)]
Auth = Annotated[Principal, Depends(require_principal)]

_ENV = TypeAdapter(schemas.XelionEnvironment)
_USERNAME = TypeAdapter(schemas.AdminUsernameUpdateIn)
_PASSWORD = TypeAdapter(schemas.AdminPasswordUpdateIn)


def _body_doc(model: type[Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def environment_json(x: XelionView) -> dict[str, Any]:
    return {"host": x.host, "protocol": x.protocol, "tenant": x.tenant}


async def reachable_environment(deps: AdminDeps, principal: Principal, x: int) -> XelionView:
    principal.ensure_context(x)
    view = await deps.database.run(lambda s: store.get_integration(s, x))
    if view is None:
        raise not_found("xelionContext", x)
    return view.xelion


@router.get(
    "/{xelionContextId}",
    summary="Get the Xelion environment of an integration",
    responses={200: {"model": schemas.XelionEnvironmentOut}, 404: {"model": schemas.ErrorOut}},
)
async def get_environment(xelionContextId: int, deps: Deps, principal: Auth) -> JSONResponse:
    return JSONResponse(environment_json(await reachable_environment(deps, principal, xelionContextId)))


@router.put(
    "/{xelionContextId}",
    summary="Change the Xelion host, tenant and protocol of an integration",
    openapi_extra=_body_doc(schemas.XelionEnvironment),
    responses={
        200: {"model": schemas.XelionEnvironmentOut},
        403: {"model": schemas.ErrorOut},
        404: {"model": schemas.ErrorOut},
        409: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
    },
)
async def put_environment(
    xelionContextId: int,
    request: Request,
    deps: Deps,
    principal: Auth,
) -> JSONResponse:
    env = await reachable_environment(deps, principal, xelionContextId)
    body = validate(_ENV, await read_body(request))
    if not principal.operator and not deps.settings.host_allowed(body.host):
        raise ApiError(
            403,
            ErrorCode.HOST_NOT_ALLOWED,
            "This Xelion host may not be used without the operator token",
            f"host: {body.host} is not in CTI_BRIDGE_ALLOWED_XELION_HOSTS",
        )
    if body.host.lower() != env.host.lower():
        # The manual's own example moves the integration to another host, with a session token:
        # allowed, within CTI_BRIDGE_ALLOWED_XELION_HOSTS (checked above). The source then logs in
        # there with the stored admin password, so the allow-list is the trust boundary (README).
        log.info(
            "integration %d moved from Xelion at %s to %s by %s",
            xelionContextId,
            env.host,
            body.host,
            principal.describe(),
        )
    now = deps.clock.now()
    try:
        view = await deps.database.run(
            lambda s: store.update_environment(
                s, xelionContextId, host=body.host, tenant=body.tenant, protocol=body.protocol, now=now
            )
        )
    except StoreConflict as exc:
        raise conflict("Another integration uses this environment", str(exc)) from None
    if view is None:
        raise not_found("xelionContext", xelionContextId)
    # Where the source logs in: one that gave up on refused credentials tries again.
    deps.supervisor.integration_changed(xelionContextId, retry_failed=True)
    return JSONResponse(environment_json(view))


async def _change_admin(
    request: Request, deps: AdminDeps, principal: Principal, x: int, *, what: str
) -> JSONResponse:
    env = await reachable_environment(deps, principal, x)
    raw = await read_body(request)
    if what == "username":
        if isinstance(raw, dict) and "oldUsername" not in raw and "oldPassword" in raw:
            raise _swapped("admin/username/update", "oldUsername and newUsername")
        body_u = validate(_USERNAME, raw)
        old, new = body_u.oldUsername, body_u.newUsername
    else:
        if isinstance(raw, dict) and "oldPassword" not in raw and "oldUsername" in raw:
            raise _swapped("admin/password/update", "oldPassword and newPassword")
        body_p = validate(_PASSWORD, raw)
        old, new = body_p.oldPassword, body_p.newPassword
    limiter = get_limiter(request)
    address = client_address(request)
    with limiter.attempt(address):
        stored = await deps.database.run(lambda s: store.admin_credentials(s, deps.secret_box, x))
        if stored is None:
            raise not_found("xelionContext", x)
        stored_user, stored_password = stored
        current = stored_user if what == "username" else stored_password
        field = "oldUsername" if what == "username" else "oldPassword"
        if not constant_time_equal(old, current):
            # Never say what the stored value is, nor how close the guess was; and a guess counts as
            # a failed login (it was an unlimited oracle for the stored password).
            limiter.failure(address)
            raise invalid_request(f"Invalid request: {field}: does not match the stored admin {what}", field)
    user = new if what == "username" else stored_user
    password = new if what == "password" else stored_password
    target = XelionTarget(protocol=env.protocol, host=env.host, tenant=env.tenant)
    try:
        await deps.directory.check_admin(target, user, password)
    except XelionCheckError as exc:
        raise xelion_failure(exc, target, what="new admin") from None
    now = deps.clock.now()
    changed = await deps.database.run(
        lambda s: store.set_admin_credentials(
            s,
            deps.secret_box,
            x,
            username=new if what == "username" else None,
            password=new if what == "password" else None,
            now=now,
            keep_session=principal.session_hash,
        )
    )
    if not changed:
        raise not_found("xelionContext", x)
    # How the source logs in (checked with Xelion above): one that gave up tries again.
    deps.supervisor.integration_changed(x, retry_failed=True)
    # Its other sessions ended with the change (store.set_admin_credentials).
    log.info("integration %d: the Xelion admin %s changed by %s", x, what, principal.describe())
    return JSONResponse({})


def _swapped(path: str, wanted: str) -> ApiError:
    return invalid_request(
        f"Invalid request: {path} takes {wanted}",
        "the manual swaps the bodies of admin/username/update and admin/password/update; "
        "the path decides what changes",
    )


@router.post(
    "/{xelionContextId}/admin/username/update",
    summary="Change the Xelion admin user name (body: oldUsername, newUsername)",
    openapi_extra=_body_doc(schemas.AdminUsernameUpdateIn),
    responses={
        401: {"model": schemas.ErrorOut},
        404: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
    },
)
async def update_admin_username(
    xelionContextId: int,
    request: Request,
    deps: Deps,
    principal: Auth,
) -> JSONResponse:
    return await _change_admin(request, deps, principal, xelionContextId, what="username")


@router.post(
    "/{xelionContextId}/admin/password/update",
    summary="Change the Xelion admin password (body: oldPassword, newPassword)",
    openapi_extra=_body_doc(schemas.AdminPasswordUpdateIn),
    responses={
        401: {"model": schemas.ErrorOut},
        404: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
    },
)
async def update_admin_password(
    xelionContextId: int,
    request: Request,
    deps: Deps,
    principal: Auth,
) -> JSONResponse:
    return await _change_admin(request, deps, principal, xelionContextId, what="password")
