"""``api/users/{userId}`` and ``api/users/{userId}/{oauthCredentialsType}/update`` (the manual's paths).

``userId`` is a ``user_credentials`` id. A session token reaches only the users of its own
integration; any other id is 404, as if it did not exist.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from cti_bridge.admin import schemas
from cti_bridge.admin.auth import Principal, require_principal
from cti_bridge.admin.body import read_model
from cti_bridge.admin.deps import AdminDeps, get_deps
from cti_bridge.errors import conflict, invalid_request, not_found
from cti_bridge.store import integrations as store
from cti_bridge.store.integrations import CredentialView, StoreConflict

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/users", tags=["users"])

Deps = Annotated[AdminDeps, Depends(get_deps)]
Auth = Annotated[Principal, Depends(require_principal)]


def _body_doc(model: type[Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def user_json(view: CredentialView) -> dict[str, Any]:
    # The manual's example swaps the two values; we give each key its own value.
    return {"xelionOid": view.xelion_oid, "xelionUsername": view.xelion_username}


async def reachable_user(deps: AdminDeps, principal: Principal, user_id: int) -> CredentialView:
    view = await deps.database.run(lambda s: store.get_credential(s, user_id))
    if view is None or not principal.can_reach(view.xelion_context_id):
        raise not_found("user", user_id)
    return view


@router.get(
    "/{userId}",
    summary="Get a user's non-secret information",
    responses={200: {"model": schemas.XelionUserOut}, 404: {"model": schemas.ErrorOut}},
)
async def get_user(userId: int, deps: Deps, principal: Auth) -> JSONResponse:
    return JSONResponse(user_json(await reachable_user(deps, principal, userId)))


@router.put(
    "/{userId}",
    summary="Change a user's Xelion user name and/or oid",
    openapi_extra=_body_doc(schemas.XelionUserUpdateIn),
    responses={
        200: {"model": schemas.XelionUserOut},
        404: {"model": schemas.ErrorOut},
        409: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
    },
)
async def put_user(userId: int, request: Request, deps: Deps, principal: Auth) -> JSONResponse:
    current = await reachable_user(deps, principal, userId)
    body = await read_model(request, schemas.XelionUserUpdateIn)
    if body.xelionUsername is None and body.xelionOid is None:
        raise invalid_request(
            "Invalid request: body: xelionUsername or xelionOid is required", "xelionUsername, xelionOid"
        )
    now = deps.clock.now()
    try:
        view = await deps.database.run(
            lambda s: store.update_identity(
                s, userId, xelion_username=body.xelionUsername, xelion_oid=body.xelionOid, now=now
            )
        )
    except StoreConflict as exc:
        raise conflict("The user exists", str(exc)) from None
    if view is None:
        raise not_found("user", userId)
    # Events find their users by name and oid: the routing of this integration changed.
    deps.supervisor.integration_changed(current.xelion_context_id)
    return JSONResponse(user_json(view))


@router.delete("/{userId}", summary="Delete a user", responses={404: {"model": schemas.ErrorOut}})
async def delete_user(userId: int, deps: Deps, principal: Auth) -> JSONResponse:
    current = await reachable_user(deps, principal, userId)
    now = deps.clock.now()
    if not await deps.database.run(lambda s: store.delete_credential(s, userId, now=now)):
        raise not_found("user", userId)
    deps.supervisor.integration_changed(current.xelion_context_id)
    # Its cached token must go, and a token request in flight for it must save nothing.
    deps.supervisor.credentials_deleted(userId)
    return JSONResponse({})


@router.post(
    "/{userId}/{oauthCredentialsType}/update",
    summary="Update one OAuth2 credential: clientid, clientsecret, refreshtoken or devicecode",
    openapi_extra=_body_doc(schemas.UpdateValueIn),
    responses={404: {"model": schemas.ErrorOut}, 422: {"model": schemas.ErrorOut}},
)
async def update_credential(
    userId: int,
    oauthCredentialsType: str,
    request: Request,
    deps: Deps,
    principal: Auth,
) -> JSONResponse:
    kind = oauthCredentialsType.lower()
    if kind not in store.SECRET_KINDS:
        raise not_found("oauthCredentialsType", oauthCredentialsType[:40])
    await reachable_user(deps, principal, userId)
    body = await read_model(request, schemas.UpdateValueIn)
    if kind == "clientid" and len(body.value) > 1024:
        raise invalid_request("Invalid request: value: must be at most 1024 characters", "value")
    now = deps.clock.now()
    view = await deps.database.run(
        lambda s: store.update_secret(s, deps.secret_box, userId, kind, body.value, now=now)
    )
    if view is None:
        raise not_found("user", userId)
    # Every kind: the cached token belongs to the old grant or the old client, and the change may
    # have repaired a reauth_required user (store.update_secret): its deliveries are due again.
    deps.supervisor.credentials_changed(userId)
    log.info("user %d: a new %s set by %s", userId, kind, principal.describe())  # the kind, never the value
    return JSONResponse({})
