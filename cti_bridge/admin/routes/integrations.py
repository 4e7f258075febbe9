"""``api/crm-integrations`` and its ``user-credentials`` and ``event-uri-mappings`` (the manual's paths).

Shapes follow the Xelion CTI server manual exactly (ids are integers, except ``userCredentialsId``,
which the manual shows as a string); extension keys (``source``, ``state``, ``method``, ...) appear
beside the manual's keys, never instead of them. Lists are bare arrays, paged with ``limit`` and
``offset``, the total in ``X-Total-Count`` (DESIGN.md §4).

Anything that calls Xelion is async and runs its database work through ``Database.run``; Xelion is
asked before anything is written, so a refused check leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from cti_bridge.admin import schemas
from cti_bridge.admin.auth import (
    LoginLimiter,
    Principal,
    client_address,
    get_limiter,
    optional_operator,
    require_principal,
)
from cti_bridge.admin.body import read_model, read_models
from cti_bridge.admin.common import Limit, Offset, paged, query_filter, query_text, xelion_failure
from cti_bridge.admin.deps import AdminDeps, get_deps
from cti_bridge.admin.mappings import mapping_input, validate_mappings
from cti_bridge.clock import xelion_time
from cti_bridge.errors import ApiError, ErrorCode, conflict, invalid_request, not_found
from cti_bridge.ports import XelionCheckError, XelionTarget
from cti_bridge.store import integrations as store
from cti_bridge.store.integrations import (
    CredentialInput,
    CredentialView,
    CrmView,
    IntegrationView,
    MappingInput,
    MappingView,
    StoreConflict,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/crm-integrations", tags=["crm-integrations"])

Deps = Annotated[AdminDeps, Depends(get_deps)]
Auth = Annotated[Principal, Depends(require_principal)]


def _body_doc(model: type[Any], *, array: bool = False) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    schema = {"type": "array", "items": ref} if array else ref
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# --- JSON shapes ---------------------------------------------------------------------------------


def integration_json(view: IntegrationView) -> dict[str, Any]:
    """The manual's ``RestCrmIntegration`` response."""
    x = view.xelion
    out: dict[str, Any] = {
        "crmContext": None,
        "xelionContext": {"host": x.host, "id": x.id, "protocol": x.protocol, "tenant": x.tenant},
    }
    if view.crm is not None:
        out["crmContext"] = {
            "authorizationHeaderPrefix": view.crm.authorization_header_prefix,
            "authorizationServerUri": view.crm.authorization_server_uri,
            "id": view.crm.id,
        }
        if view.crm.token_parameters:  # an extension: shown only when set
            out["crmContext"]["tokenRequestParameters"] = dict(view.crm.token_parameters)
    return out


def _source_json(view: IntegrationView, gaps: list[store.GapView]) -> dict[str, Any]:
    x = view.xelion
    return {
        "state": x.source_state,
        "error": x.source_error,
        "lastEventAt": None if x.last_event_at is None else xelion_time(x.last_event_at),
        "gaps": [
            {
                "start": xelion_time(g.started_at),
                "end": None if g.ended_at is None else xelion_time(g.ended_at),
                "reason": g.reason,
            }
            for g in gaps
        ],
    }


def credential_json(view: CredentialView) -> dict[str, Any]:
    return {
        "xelionUsername": view.xelion_username,
        "xelionOid": view.xelion_oid,
        "userCredentialsId": str(view.id),
        "state": view.state,
    }


def iso_local(dt: Any) -> str:
    """``createdAt`` as the manual shows it: ISO-8601, UTC, no zone marker."""
    from datetime import UTC

    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    text: str = dt.isoformat(timespec="microseconds")
    return text


def mapping_json(view: MappingView) -> dict[str, Any]:
    out: dict[str, Any] = {
        "createdAt": iso_local(view.created_at),
        "crmResourcePayload": view.crm_resource_payload,
        "crmResourceUri": view.crm_resource_uri,
        "id": view.id,
        "xelionEvent": view.xelion_event,
    }
    # Extension keys only when they say something beyond the manual's defaults.
    if view.method != "POST":
        out["method"] = view.method
    if view.headers is not None:
        out["headers"] = view.headers
    if view.content_type is not None:
        out["contentType"] = view.content_type
    if view.condition is not None:
        out["condition"] = view.condition
    return out


def mapping_inputs(items: list[schemas.EventUriMappingIn]) -> list[MappingInput]:
    return [mapping_input(m) for m in items]


# --- shared steps --------------------------------------------------------------------------------


async def crm_context_for(deps: AdminDeps, principal: Principal, x: int, c: int) -> CrmView:
    """The CRM context ``c`` of integration ``x`` as this principal may see it, else 404."""
    principal.ensure_context(x)
    crm = await deps.database.run(lambda s: store.crm_context_of(s, x, c))
    if crm is None:
        raise not_found("crmContext", f"{c} of xelionContext {x}")
    return crm


async def resolve_users(
    deps: AdminDeps,
    target: XelionTarget,
    admin_username: str,
    admin_password: str,
    users: list[schemas.UserCredentialsIn],
) -> list[CredentialInput]:
    """Look every user up in Xelion (its oid is what events name); 422/10204 for an unknown one.

    The manual's Java server answers 500 for an unknown user; a 422 that names it is kinder.
    """
    seen: set[str] = set()
    out: list[CredentialInput] = []
    for index, u in enumerate(users):
        if u.xelionUsername in seen:
            raise conflict(
                "Duplicate user",
                f"userCredentials[{index}].xelionUsername: {u.xelionUsername} is given twice",
            )
        seen.add(u.xelionUsername)
        try:
            found = await deps.directory.find_user(target, admin_username, admin_password, u.xelionUsername)
        except XelionCheckError as exc:
            if exc.kind != "not_found":
                raise xelion_failure(exc, target) from None
            found = None
        if found is None:
            raise ApiError(
                422,
                ErrorCode.UNKNOWN_XELION_USER,
                f"Unknown Xelion user {u.xelionUsername}",
                f"userCredentials[{index}].xelionUsername: {u.xelionUsername} does not exist "
                f"on {target.host} tenant {target.tenant}",
            )
        out.append(
            CredentialInput(
                xelion_username=u.xelionUsername,
                xelion_oid=found.oid,
                client_id=u.clientId,
                client_secret=u.clientSecret,
                device_code=u.deviceCode,
                refresh_token=u.refreshToken,
            )
        )
    return out


# --- api/crm-integrations ------------------------------------------------------------------------


@router.get(
    "",
    summary="Get the CRM integration of a Xelion host and tenant (or, without them, all reachable ones)",
    responses={200: {"model": schemas.CrmIntegrationOut}, 404: {"model": schemas.ErrorOut}},
)
async def get_crm_integration(
    deps: Deps,
    principal: Auth,
    xelionHost: Annotated[str | None, Query()] = None,
    xelionTenant: Annotated[str | None, Query()] = None,
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    host = query_text(xelionHost, "xelionHost")
    tenant = query_text(xelionTenant, "xelionTenant")
    if host is None and tenant is None:
        # Extension: without the query the operator lists every integration, a session its own.
        if principal.operator:
            views, total = await deps.database.run(
                lambda s: store.list_integrations(s, offset=offset, limit=limit)
            )
        else:
            xid = principal.xelion_context_id or 0
            one = await deps.database.run(lambda s: store.get_integration(s, xid))
            views, total = ([one] if one is not None and offset == 0 else []), (0 if one is None else 1)
        items = [await _with_source(deps, v) for v in views]
        return paged(items, total)
    if host is None or tenant is None:
        missing = "xelionHost" if host is None else "xelionTenant"
        raise invalid_request(f"Invalid request: query.{missing}: field required", f"query.{missing}")
    view = await deps.database.run(lambda s: store.find_integration(s, host, tenant))
    if view is None or not principal.can_reach(view.xelion.id):
        raise not_found("crm-integration", f"for host {host} and tenant {tenant}")
    return JSONResponse(await _with_source(deps, view))


async def _with_source(deps: AdminDeps, view: IntegrationView) -> dict[str, Any]:
    gaps = await deps.database.run(lambda s: store.recent_gaps(s, view.xelion.id))
    out = integration_json(view)
    out["source"] = _source_json(view, gaps)
    return out


@router.post(
    "",
    summary="Create a CRM integration (no token needed for an allowed Xelion host)",
    openapi_extra=_body_doc(schemas.CrmIntegrationIn),
    responses={
        200: {"model": schemas.CrmIntegrationOut},
        400: {"model": schemas.ErrorOut},
        401: {"model": schemas.ErrorOut},
        403: {"model": schemas.ErrorOut},
        409: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
        502: {"model": schemas.ErrorOut},
    },
)
async def post_crm_integration(
    request: Request, deps: Deps, operator: Annotated[bool, Depends(optional_operator)]
) -> JSONResponse:
    limiter = get_limiter(request)
    address = client_address(request)
    # This resource logs in to Xelion with the posted admin password: without a token it is a
    # password-guessing oracle, so it shares the login limiter.
    if not operator:
        limiter.check(address)
    # The body first: a request that never finishes sending it must not hold an attempt's place.
    body = await read_model(request, schemas.CrmIntegrationIn)
    with contextlib.nullcontext() if operator else limiter.attempt(address):
        return await _post_crm_integration(body, deps, operator, limiter, address)


async def _post_crm_integration(
    body: schemas.CrmIntegrationIn, deps: AdminDeps, operator: bool, limiter: LoginLimiter, address: str
) -> JSONResponse:
    xc = body.xelionContext
    if not operator and not deps.settings.host_allowed(xc.host):
        raise ApiError(
            403,
            ErrorCode.HOST_NOT_ALLOWED,
            "This Xelion host may not be added without the operator token",
            f"xelionContext.host: {xc.host} is not in CTI_BRIDGE_ALLOWED_XELION_HOSTS",
        )
    mappings = mapping_inputs(body.eventUriMappings)
    validate_mappings(mappings)
    if await deps.database.run(lambda s: store.integration_exists(s, xc.host, xc.tenant)):
        raise conflict("The integration exists", f"host {xc.host} and tenant {xc.tenant} already have one")
    target = XelionTarget(protocol=xc.protocol, host=xc.host, tenant=xc.tenant)
    try:
        await deps.directory.check_admin(target, xc.adminUsername, xc.adminPassword)
    except XelionCheckError as exc:
        err = xelion_failure(exc, target)
        if err.code == ErrorCode.WRONG_CREDENTIALS and not operator:
            limiter.failure(address)
        raise err from None
    credentials = await resolve_users(deps, target, xc.adminUsername, xc.adminPassword, body.userCredentials)
    crm = body.crmContext
    now = deps.clock.now()
    try:
        view = await deps.database.run(
            lambda s: store.create_integration(
                s,
                deps.secret_box,
                host=xc.host,
                protocol=xc.protocol,
                tenant=xc.tenant,
                admin_username=xc.adminUsername,
                admin_password=xc.adminPassword,
                authorization_server_uri=crm.authorizationServerUri,
                authorization_header_prefix=crm.authorizationHeaderPrefix,
                token_auth_method=crm.tokenEndpointAuthMethod,
                credentials=credentials,
                mappings=mappings,
                now=now,
                token_parameters=crm.tokenRequestParameters,
            )
        )
    except StoreConflict as exc:
        raise conflict("The integration exists", str(exc)) from None
    deps.supervisor.integration_changed(view.xelion.id)
    log.info(
        "integration %d (%s/%s) created by %s",
        view.xelion.id,
        view.xelion.host,
        view.xelion.tenant,
        "the operator" if operator else "its Xelion admin (no operator token)",
    )
    return JSONResponse(integration_json(view))


@router.delete(
    "/{xelionContextId}",
    summary="Delete a CRM integration and everything that belongs to it",
    responses={404: {"model": schemas.ErrorOut}},
)
async def delete_crm_integration(
    xelionContextId: int,
    deps: Deps,
    principal: Auth,
) -> JSONResponse:
    principal.ensure_context(xelionContextId)
    if not await deps.database.run(lambda s: store.delete_integration(s, xelionContextId)):
        raise not_found("xelionContext", xelionContextId)
    deps.supervisor.integration_deleted(xelionContextId)
    log.info("integration %d deleted by %s", xelionContextId, principal.describe())
    return JSONResponse({})


# --- user credentials ----------------------------------------------------------------------------


@router.get(
    "/{xelionContextId}/crm-contexts/{crmContextId}/user-credentials",
    summary="List the users of a CRM context (optionally the one with a user name or oid)",
    responses={200: {"model": list[schemas.UserCredentialsOut]}, 404: {"model": schemas.ErrorOut}},
)
async def get_user_credentials(
    xelionContextId: int,
    crmContextId: int,
    deps: Deps,
    principal: Auth,
    username: Annotated[str | None, Query()] = None,
    oid: Annotated[str | None, Query()] = None,
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    crm = await crm_context_for(deps, principal, xelionContextId, crmContextId)
    name = query_filter(username, "username")
    oid_ = query_filter(oid, "oid", 64)
    views, total = await deps.database.run(
        lambda s: store.list_credentials(s, crm.id, username=name, oid=oid_, offset=offset, limit=limit)
    )
    return paged([credential_json(v) for v in views], total)


@router.post(
    "/{xelionContextId}/crm-contexts/{crmContextId}/user-credentials",
    summary="Add users' OAuth2 credentials (an array, as the manual shows; one object is accepted too)",
    openapi_extra=_body_doc(schemas.UserCredentialsIn, array=True),
    responses={
        200: {"model": schemas.UserCredentialsOut},
        404: {"model": schemas.ErrorOut},
        409: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
    },
)
async def post_user_credentials(
    xelionContextId: int,
    crmContextId: int,
    request: Request,
    deps: Deps,
    principal: Auth,
) -> JSONResponse:
    crm = await crm_context_for(deps, principal, xelionContextId, crmContextId)
    items, _single = await read_models(request, schemas.UserCredentialsIn)
    if not items:
        raise invalid_request("Invalid request: body: at least one user is required", "body")
    admin = await deps.database.run(lambda s: store.admin_credentials(s, deps.secret_box, xelionContextId))
    integration = await deps.database.run(lambda s: store.get_integration(s, xelionContextId))
    if admin is None or integration is None:
        raise not_found("xelionContext", xelionContextId)
    x = integration.xelion
    target = XelionTarget(protocol=x.protocol, host=x.host, tenant=x.tenant)
    credentials = await resolve_users(deps, target, admin[0], admin[1], items)
    now = deps.clock.now()
    try:
        views = await deps.database.run(
            lambda s: store.add_credentials(s, deps.secret_box, crm.id, credentials, now=now)
        )
    except StoreConflict as exc:
        raise conflict("The user exists", str(exc)) from None
    deps.supervisor.integration_changed(xelionContextId)
    created = [credential_json(v) for v in views]
    # The manual posts an array of one and answers the created object; several get an array.
    return JSONResponse(created[0] if len(created) == 1 else created)


# --- event uri mappings --------------------------------------------------------------------------


@router.get(
    "/{xelionContextId}/crm-contexts/{crmContextId}/event-uri-mappings",
    summary="List the current event-uri mappings of a CRM context",
    responses={200: {"model": list[schemas.EventUriMappingOut]}, 404: {"model": schemas.ErrorOut}},
)
async def get_event_uri_mappings(
    xelionContextId: int,
    crmContextId: int,
    deps: Deps,
    principal: Auth,
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    crm = await crm_context_for(deps, principal, xelionContextId, crmContextId)
    views, total = await deps.database.run(
        lambda s: store.list_mappings(s, crm.id, offset=offset, limit=limit)
    )
    return paged([mapping_json(v) for v in views], total)


@router.put(
    "/{xelionContextId}/crm-contexts/{crmContextId}/event-uri-mappings",
    summary="Replace the event-uri mappings of a CRM context",
    openapi_extra=_body_doc(schemas.EventUriMappingIn, array=True),
    responses={
        200: {"model": list[schemas.EventUriMappingOut]},
        404: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
    },
)
async def put_event_uri_mappings(
    xelionContextId: int,
    crmContextId: int,
    request: Request,
    deps: Deps,
    principal: Auth,
) -> JSONResponse:
    """Replace all mappings: the old rows are retired (kept for the deliveries that reference them)
    and the new ones inserted, in one transaction.

    The manual says the number of elements "must be the same" as the GET returns; we do not require
    that (the body simply is the new set, which may add or drop mappings), so every script written
    for the manual still works.
    """
    crm = await crm_context_for(deps, principal, xelionContextId, crmContextId)
    items, _single = await read_models(request, schemas.EventUriMappingIn, single_ok=False)
    mappings = mapping_inputs(items)
    validate_mappings(mappings)
    now = deps.clock.now()
    views = await deps.database.run(lambda s: store.replace_mappings(s, crm.id, mappings, now=now))
    deps.supervisor.integration_changed(xelionContextId)
    return JSONResponse([mapping_json(v) for v in views])
