"""``POST api/cti-app-context`` and ``POST api/external-api-endpoint/call`` (the manual's app resources),
and ``DELETE api/cti-app-context`` (an extension: the user's own way to let a context go).

A Xelion app user registers OAuth2 credentials for an external service (Microsoft Exchange, say)
once, then calls that service's endpoints through cti-bridge, which keeps the tokens fresh. Both
bodies are the manual's, verbatim (its ``//`` comment removed: a comment is not JSON, and a body
that keeps it is 400/10200 with its line and column, like any malformed body).

``POST api/cti-app-context`` with ``Authorization: xelion <Xelion user token>``:

- The Xelion host must be in ``CTI_BRIDGE_ALLOWED_XELION_HOSTS`` (403/10203), checked before
  anything is sent there: the user's token goes only to an allowed host. There is no operator
  token on this resource; the caller is an app user.
- **(chosen)** The manual's ``appXelionContext`` has no protocol. Extension: an optional
  ``protocol``, ``"http"`` or ``"https"`` (default ``"https"``), as in ``xelionContext`` of
  ``api/crm-integrations``.
- The token is checked with ``GET me/info`` on that host and tenant (xelion-protocol.md §2): refused
  → 401/10000, Xelion unreachable → 502/10500. The ``userName`` it belongs to must be
  ``appUserContext.xelionUsername`` exactly, else 403/10101: a user registers credentials for
  himself only.
- Stored by ``store/app_contexts.py`` (secrets encrypted) under host, tenant, user name and
  ``authorizationServerUri``; a second POST for the same key replaces them, and the token manager's
  cached token of that context is dropped. ``clientSecret`` is optional (a public client);
  ``clientId``, ``refreshToken`` and ``accessToken`` are required: without them no call could be
  made. The access token's expiry is unknown, so it is used until the service answers 401.
  ``authorizationHeaderPrefix`` is used exactly as given (its trailing space included); when
  absent, ``"Bearer "``, as for ``crmContext``.
- **(chosen)** The manual does not say how the client authenticates to the token endpoint.
  Extension: an optional ``appExternalApiContext.tokenEndpointAuthMethod``,
  ``"client_secret_post"`` (default: ``client_id`` and ``client_secret`` in the form body) or
  ``"client_secret_basic"`` (HTTP Basic, RFC 6749 §2.3.1), as the same field of
  ``crmContext``; anything else is 422/10201 naming the field. Without ``clientSecret`` the client
  is public and only its ``client_id`` is sent in the body, whatever the method.
- A POST also revives a context whose grant the authorization server refused (below): the context
  is ``active`` again, and the next call uses the new credentials.
- Answer: 200 with ``{}``; never a secret.

``DELETE api/cti-app-context``: the POST's key parts (a whole POST body works too), checked as
the POST (allowed host, the user's own Xelion token); the context and its secrets are deleted and
the token manager forgets it (a refresh in flight saves nothing). 200 ``{}``, or 404/10100.

``POST api/external-api-endpoint/call`` with ``Authorization: xelion_cti <access token>``:

1. The context is found by ``appXelionContext.host``/``tenant``, ``xelionUsername`` and
   ``endpointContext.authorizationServerUri``, an exact match as the manual says (the host in lower
   case); none → 404/10100.
2. The presented token must be the one cti-bridge holds for that context: the current one, or the
   one its last refresh replaced (a request that was in flight during a refresh). Anything else →
   401/10000 and nothing is sent: naming another user's context does not lend his credentials.
3. ``endpointUri`` goes through the outbound guard (reliability.md §15): only ``http(s)``, and
   non-public addresses only with ``CTI_BRIDGE_ALLOW_PRIVATE_TARGETS``; refused → 422/10201 naming
   ``endpointContext.endpointUri``. Redirects are never followed. Its query string is sent as
   given: the manual has the caller URL-encode it, so it is not encoded again.
4. The request: ``method``, ``authorizationHeaderPrefix`` + token in ``Authorization``, ``payload``
   as a JSON body (left out when null, and for GET, which has no body).
5. A 401 from the service: one refresh (single-flight per context, the rotated refresh token
   committed before the new access token is used: ``TokenManager``, reliability.md §10-§12), and
   one retry. When the expiry of the token is known (after a refresh), it is refreshed before use
   once less than the margin is left.
6. The answer carries the service's status. 2xx: ``{"accessToken": <the token now held>,
   "payload": <the service's JSON>}`` (its text as a string if it is not JSON, null if empty);
   **(chosen)** a 204/205 is answered 200, as a body is needed to carry the token. 4xx and 5xx:
   the service's body as it came, with its ``Content-Type`` (and ``Retry-After``). 3xx: 502/10501
   (not followed). No answer in time: 504/10502; connection failed: 502/10501; answer longer than
   ``CTI_BRIDGE_MAX_RESPONSE_BYTES``: 502/10501; the authorization server failed: 502/10501.
7. The authorization server refused the stored grant (``invalid_grant``, ``invalid_client``, ...):
   401/10503, its ``info`` giving the reason (the OAuth2 error code, never a secret). The context is
   then marked ``reauth_required`` (its secrets kept): every later call is 401/10503 at once,
   without a token-endpoint call and without sending anything to the service, until a new
   ``POST api/cti-app-context`` for the same key makes it ``active`` again. Steps 1 and 2 come
   first: only the holder of the context's token learns its state.

Secrets (reliability.md §14): no token, refresh token or client secret in a log line or an error
message; log lines name the context by id and the service by host (a URL's query may hold a token).
The only secret answered is the ``accessToken`` the manual returns, to the caller who proved to hold
that context's token.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator

from cti_bridge.admin import schemas
from cti_bridge.admin.auth import bearer_token
from cti_bridge.admin.body import read_model
from cti_bridge.admin.common import xelion_failure
from cti_bridge.admin.deps import AdminDeps, get_deps
from cti_bridge.delivery.egress import EgressRefused, check_url, read_limited
from cti_bridge.delivery.oauth import (
    AccessToken,
    CredentialNotFound,
    ReauthRequired,
    TokenError,
    TokenManager,
)
from cti_bridge.errors import ApiError, ErrorCode, invalid_request, not_authenticated, not_found
from cti_bridge.ports import XelionCheckError, XelionTarget
from cti_bridge.store.app_contexts import KEY_MAX_BYTES, AppContextInput, AppContextKey, AppContextTokenStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["apps"])

Deps = Annotated[AdminDeps, Depends(get_deps)]

APP_TOKEN_SCHEME = "xelion_cti"  # noqa: S105 - the manual's header scheme, not a secret
URI_MAX = 8192
_NO_BODY_STATUSES = frozenset({204, 205})

# Document the two resources' own Authorization headers in OpenAPI; the values are checked by hand
# (auto_error=False), so that a missing header is our 401/10000.
xelion_user_header = APIKeyHeader(
    name="Authorization",
    scheme_name="XelionUserToken",
    auto_error=False,
    description='"xelion <token>": a Xelion user token of the host and tenant in the body',
)
app_token_header = APIKeyHeader(
    name="Authorization",
    scheme_name="XelionCtiAccessToken",
    auto_error=False,
    description='"xelion_cti <token>": the access token held for that user and service',
)


# --- request models --------------------------------------------------------------------------------


class _In(BaseModel):
    # As every request model of the admin API (admin/schemas.py).
    model_config = schemas.IN_CONFIG


Uri2048 = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
OptionalSecret = Annotated[str, StringConstraints(max_length=schemas.SECRET_MAX)] | None


class AppExternalApiContextIn(_In):
    authorizationServerUri: Uri2048
    # Used exactly as given: the caller puts in the trailing space when the service wants one.
    authorizationHeaderPrefix: schemas.HeaderPrefix = "Bearer "
    # Extension (the manual has none): the client authentication at the token endpoint.
    tokenEndpointAuthMethod: Literal["client_secret_post", "client_secret_basic"] = "client_secret_post"

    _uri = field_validator("authorizationServerUri")(schemas.check_http_uri)


class AppUserContextIn(_In):
    xelionUsername: schemas.Str255
    clientId: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    clientSecret: OptionalSecret = None
    refreshToken: schemas.Secret
    accessToken: schemas.Secret


class AppXelionContextIn(_In):
    host: schemas.Str255
    tenant: schemas.Str255
    # Extension (the manual has none here): how to reach the Xelion host for the token check.
    protocol: Literal["http", "https"] = "https"

    _host = field_validator("host")(schemas.check_host)
    _tenant = field_validator("tenant")(schemas.check_tenant)


class CtiAppContextIn(_In):
    appExternalApiContext: AppExternalApiContextIn
    appUserContext: AppUserContextIn
    appXelionContext: AppXelionContextIn


class EndpointContextIn(_In):
    # A lookup key, compared exactly with the stored one: no check beyond its length.
    authorizationServerUri: Uri2048
    endpointUri: Annotated[str, StringConstraints(min_length=1, max_length=URI_MAX)]
    payload: Any = None
    method: str

    _endpoint = field_validator("endpointUri")(schemas.check_http_uri)

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        upper = value.upper()
        if upper not in schemas.HTTP_METHODS:
            raise ValueError("must be one of " + ", ".join(schemas.HTTP_METHODS))
        return upper


class ExternalApiCallIn(_In):
    appXelionContext: AppXelionContextIn
    endpointContext: EndpointContextIn
    xelionUsername: schemas.Str255


class ExternalApiCallOut(BaseModel):
    """The answer to a call the service answered with a 2xx (the manual's shape)."""

    model_config = ConfigDict(extra="allow")

    accessToken: str
    payload: Any


class AppExternalApiKeyIn(_In):
    authorizationServerUri: Uri2048


class AppUserKeyIn(_In):
    xelionUsername: schemas.Str255


class CtiAppContextKeyIn(_In):
    """What ``DELETE api/cti-app-context`` names: the key parts of the POST's body (a whole POST
    body works too: the rest is ignored)."""

    appExternalApiContext: AppExternalApiKeyIn
    appUserContext: AppUserKeyIn
    appXelionContext: AppXelionContextIn


# Added to the OpenAPI components by admin/app.py, like schemas.REQUEST_MODELS.
REQUEST_MODELS: tuple[type[BaseModel], ...] = (CtiAppContextIn, CtiAppContextKeyIn, ExternalApiCallIn)


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _app_token(header: str | None) -> str | None:
    """The token of ``Authorization: xelion_cti <token>`` (scheme case-insensitive, as
    ``auth.bearer_token`` reads the ``xelion`` scheme), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != APP_TOKEN_SCHEME or not token:
        return None
    return token


# --- POST api/cti-app-context -------------------------------------------------------------------------


async def _check_xelion_user(deps: AdminDeps, target: XelionTarget, token: str, user_name: str) -> None:
    """The token must be valid on that host and tenant and belong to ``user_name``."""
    where = f"{target.host} tenant {target.tenant}"
    try:
        owner = await deps.directory.whoami(target, token)
    except XelionCheckError as exc:
        if exc.kind in ("credentials", "disabled", "not_found"):
            raise not_authenticated(f"{where}: Xelion does not accept the token") from None
        raise xelion_failure(exc, target) from None
    if owner != user_name:
        raise ApiError(
            403,
            ErrorCode.FORBIDDEN,
            "The Xelion token belongs to another user",
            f"appUserContext.xelionUsername: the token of {where} is not this user's",
        )


def _xelion_user_token(authorization: str | None) -> str:
    """The caller's Xelion user token (the ``xelion`` scheme, as for the rest of the admin API),
    asked for before the body is read: a caller who shows none learns nothing of the body's checks."""
    token = bearer_token(authorization)
    if token is None:
        raise not_authenticated('an "Authorization: xelion <Xelion user token>" header is required')
    return token


async def _users_own_key(
    deps: AdminDeps, token: str, xc: AppXelionContextIn, user_name: str, server_uri: str
) -> AppContextKey:
    """The app context's key named by a request of ``user_name`` itself: the Xelion host allowed,
    the key not too large, and the caller's ``token`` that user's on that host and tenant."""
    if not deps.settings.host_allowed(xc.host):
        raise ApiError(
            403,
            ErrorCode.HOST_NOT_ALLOWED,
            "This Xelion host may not be used",
            f"appXelionContext.host: {xc.host} is not in CTI_BRIDGE_ALLOWED_XELION_HOSTS",
        )
    key = AppContextKey(xc.host, xc.tenant, user_name, server_uri)
    if key.too_large():
        # PostgreSQL refused the index entry, which came back as a 503 "try again" no retry mends.
        raise invalid_request(
            "Invalid request: appExternalApiContext.authorizationServerUri: too long with the host, "
            f"tenant and user name (at most {KEY_MAX_BYTES} bytes together in UTF-8)",
            "appExternalApiContext.authorizationServerUri",
        )
    target = XelionTarget(protocol=xc.protocol, host=xc.host, tenant=xc.tenant)
    await _check_xelion_user(deps, target, token, user_name)
    return key


@router.post(
    "/cti-app-context",
    summary="Store a Xelion app user's OAuth2 credentials for an external service",
    openapi_extra=_body_doc(CtiAppContextIn),
    responses={
        200: {"description": "stored (an empty object)"},
        400: {"model": schemas.ErrorOut},
        401: {"model": schemas.ErrorOut},
        403: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
        502: {"model": schemas.ErrorOut},
    },
)
async def post_app_context(
    request: Request, deps: Deps, authorization: Annotated[str | None, Security(xelion_user_header)]
) -> JSONResponse:
    token = _xelion_user_token(authorization)
    body = await read_model(request, CtiAppContextIn)
    xc, uc, ec = body.appXelionContext, body.appUserContext, body.appExternalApiContext
    key = await _users_own_key(deps, token, xc, uc.xelionUsername, ec.authorizationServerUri)
    data = AppContextInput(
        key=key,
        authorization_header_prefix=ec.authorizationHeaderPrefix,
        client_id=uc.clientId,
        client_secret=uc.clientSecret or None,  # "" from a client that fills every field: none
        refresh_token=uc.refreshToken,
        access_token=uc.accessToken,
        token_auth_method=ec.tokenEndpointAuthMethod,
    )
    store = AppContextTokenStore(deps.database, deps.secret_box)
    context_id, created = await store.save(data, deps.clock.now())
    if deps.app_tokens is not None:
        # The cached token of this context is the replaced one: the next call must load the new.
        deps.app_tokens.invalidate(context_id)
    log.info(
        "%s %s for %s tenant %s",
        store.describe(context_id),
        "created" if created else "replaced",
        xc.host,
        xc.tenant,
    )
    return JSONResponse({})


@router.delete(
    "/cti-app-context",
    summary="Delete a Xelion app user's credentials for an external service (extension)",
    openapi_extra=_body_doc(CtiAppContextKeyIn),
    responses={
        200: {"description": "deleted (an empty object)"},
        400: {"model": schemas.ErrorOut},
        401: {"model": schemas.ErrorOut},
        403: {"model": schemas.ErrorOut},
        404: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
        502: {"model": schemas.ErrorOut},
    },
)
async def delete_app_context(
    request: Request, deps: Deps, authorization: Annotated[str | None, Security(xelion_user_header)]
) -> JSONResponse:
    """Extension: the manual stores an app user's credentials and never lets them go, so a user
    who stops using the service (or leaves) kept a refresh token here for good. Checked exactly as
    the POST (the user's own Xelion token); the context and its secrets are deleted, and a token
    request in flight for it saves nothing."""
    token = _xelion_user_token(authorization)
    body = await read_model(request, CtiAppContextKeyIn)
    xc = body.appXelionContext
    server_uri = body.appExternalApiContext.authorizationServerUri
    key = await _users_own_key(deps, token, xc, body.appUserContext.xelionUsername, server_uri)
    store = AppContextTokenStore(deps.database, deps.secret_box)
    context_id = await store.delete(key)
    if context_id is None:
        raise not_found("app context", f"of {key.xelion_username} for that authorizationServerUri")
    if deps.app_tokens is not None:
        deps.app_tokens.forget(context_id)
    log.info("%s deleted for %s tenant %s", store.describe(context_id), xc.host, xc.tenant)
    return JSONResponse({})


# --- POST api/external-api-endpoint/call ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ServiceAnswer:
    status: int
    body: bytes
    truncated: bool
    content_type: str | None
    retry_after: str | None


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(found) < 8:
        found.append(current)
        current = current.__cause__
    return found


def _timed_out(exc: httpx.TimeoutException) -> bool:
    """Whether a timeout is one. httpx-aiohttp reports every connector failure (a refused
    connection, a DNS failure) as ``ConnectTimeout``; the cause chain tells them apart."""
    causes = _chain(exc)[1:]
    if any(isinstance(c, TimeoutError) for c in causes):
        return True
    return not any(isinstance(c, OSError) for c in causes)


def _cause(exc: BaseException) -> str:
    """The innermost exception's type name: its text may carry the URL, whose query may carry a
    token, so only the type is told."""
    return type(_chain(exc)[-1]).__name__


async def _send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    headers: dict[str, str],
    content: bytes | None,
    limit: int,
) -> _ServiceAnswer:
    """One request to the service; transport failures become the API errors of the docstring.

    Cancellation: the response (if any) is closed by ``read_limited``; the error propagates.
    """
    host = urlsplit(url).hostname or "?"
    try:
        request = http.build_request(method, url, headers=headers, content=content)
        response = await http.send(request, stream=True)
        status = response.status_code
        content_type = response.headers.get("Content-Type")
        retry_after = response.headers.get("Retry-After")
        raw, truncated = await read_limited(response, limit)
    except EgressRefused as exc:
        # A host name that resolved to an address the guard refuses, found when connecting.
        raise invalid_request(
            f"Invalid request: endpointContext.endpointUri: refused by the outbound guard: {exc}",
            "endpointContext.endpointUri",
        ) from None
    except (httpx.InvalidURL, ValueError) as exc:
        # A URL no client can send (schemas.check_http_uri refuses those it can foresee; a query
        # parameter may still add one): the caller's to fix, so a 422, not a 500.
        raise invalid_request(
            f"Invalid request: endpointContext.endpointUri: cannot be sent ({type(exc).__name__})",
            "endpointContext.endpointUri",
        ) from None
    except httpx.TimeoutException as exc:
        if _timed_out(exc):
            raise ApiError(
                504, ErrorCode.UPSTREAM_TIMEOUT, "The external service did not answer in time", host
            ) from None
        raise ApiError(
            502,
            ErrorCode.UPSTREAM_FAILED,
            "The external service could not be reached",
            f"{host}: {_cause(exc)}",
        ) from None
    except (httpx.HTTPError, OSError) as exc:
        # Only the type: an exception text may carry the URL, and its query may carry a token.
        raise ApiError(
            502,
            ErrorCode.UPSTREAM_FAILED,
            "The external service could not be reached",
            f"{host}: {_cause(exc)}",
        ) from None
    return _ServiceAnswer(status, raw, truncated, content_type, retry_after)


async def _token(tokens: TokenManager[int], context_id: int, rejected: str | None = None) -> AccessToken:
    """The token to present: the current one, or (after a 401 to ``rejected``) a refreshed one."""
    try:
        if rejected is None:
            return await tokens.get(context_id)
        return await tokens.refresh_after_401(context_id, rejected)
    except ReauthRequired as exc:
        # The reason is the manager's text: an OAuth2 error code (sanitised), never a secret.
        raise ApiError(
            401,
            ErrorCode.UPSTREAM_REAUTH,
            "The authorization server refused the stored credentials",
            f"{exc.reason}; POST api/cti-app-context again with a new refresh token",
        ) from None
    except CredentialNotFound:
        raise not_found("app context", context_id) from None
    except TokenError as exc:
        # TokenError texts name the context and the token endpoint's host, never a secret.
        raise ApiError(502, ErrorCode.UPSTREAM_FAILED, "The authorization server failed", str(exc)) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _success_body(access_token: str, raw: bytes) -> bytes:
    """The manual's ``{"accessToken", "payload"}``: the service's JSON, its text when it is not
    JSON (or is JSON that cannot be sent on: NaN, lone surrogates, extreme nesting), null if empty."""
    text = raw.decode("utf-8", "replace")
    payload: Any = None
    if raw.strip():
        try:
            payload = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            payload = text
    try:
        out = json.dumps({"accessToken": access_token, "payload": payload}, ensure_ascii=False)
        return out.encode()
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return json.dumps({"accessToken": access_token, "payload": text}, ensure_ascii=False).encode()


@router.post(
    "/external-api-endpoint/call",
    summary="Call an external service's endpoint with the caller's OAuth2 credentials",
    openapi_extra=_body_doc(ExternalApiCallIn),
    responses={
        200: {"model": ExternalApiCallOut, "description": "the service's 2xx, with its status"},
        400: {"model": schemas.ErrorOut},
        401: {"model": schemas.ErrorOut},
        404: {"model": schemas.ErrorOut},
        422: {"model": schemas.ErrorOut},
        502: {"model": schemas.ErrorOut},
        504: {"model": schemas.ErrorOut},
    },
)
async def call_external_api(
    request: Request, deps: Deps, authorization: Annotated[str | None, Security(app_token_header)]
) -> Response:
    presented = _app_token(authorization)
    if presented is None:
        raise not_authenticated('an "Authorization: xelion_cti <access token>" header is required')
    body = await read_model(request, ExternalApiCallIn)
    tokens, http = deps.app_tokens, deps.external_http
    if tokens is None or http is None:
        # A composition bug (app.py builds both), not the caller's fault.
        log.error("external API call refused: AdminDeps.app_tokens/external_http are not set")
        raise ApiError(500, ErrorCode.INTERNAL, "Internal error", "")
    xc, ep = body.appXelionContext, body.endpointContext
    key = AppContextKey(xc.host, xc.tenant, body.xelionUsername, ep.authorizationServerUri)
    store = AppContextTokenStore(deps.database, deps.secret_box)
    match = await store.find(key, presented)
    if match is None:
        raise not_found(
            "app context", f"of {body.xelionUsername} on {xc.host} tenant {xc.tenant} for that server"
        )
    if not match.token_ok:
        raise not_authenticated("the token is not the one held for this user and service")
    settings = deps.settings
    try:
        check_url(ep.endpointUri, settings.allow_private_targets)
    except EgressRefused as exc:
        raise invalid_request(
            f"Invalid request: endpointContext.endpointUri: refused by the outbound guard: {exc}",
            "endpointContext.endpointUri",
        ) from None

    headers = {"Accept": "application/json"}
    content: bytes | None = None
    if ep.payload is not None and ep.method != "GET":
        content = json.dumps(ep.payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json"
    host = urlsplit(ep.endpointUri).hostname or "?"
    who = store.describe(match.id)

    async def attempt(token: AccessToken) -> _ServiceAnswer:
        authorization = match.authorization_header_prefix + token.access_token
        if not schemas.sendable_header(authorization):
            # The authorization server's token (or a prefix stored before it was checked) cannot
            # be a header: its fault, not the caller's URL (the 422 that named endpointUri).
            raise ApiError(
                502,
                ErrorCode.UPSTREAM_FAILED,
                "The authorization server failed",
                f"{who}: its access token cannot be sent in an Authorization header",
            )
        sent = {**headers, "Authorization": authorization}
        return await _send(http, ep.method, ep.endpointUri, sent, content, settings.max_response_bytes)

    token = await _token(tokens, match.id)
    answer = await attempt(token)
    refreshed = False
    if answer.status == 401:
        log.info("external API call for %s: %s answered 401; refreshing the token", who, host)
        token = await _token(tokens, match.id, rejected=token.access_token)
        refreshed = True
        answer = await attempt(token)
    log.info(
        "external API call for %s: %s %s answered HTTP %d%s",
        who,
        ep.method,
        host,
        answer.status,
        " (after a token refresh)" if refreshed else "",
    )
    if answer.truncated:
        raise ApiError(
            502,
            ErrorCode.UPSTREAM_FAILED,
            "The external service's answer is too large",
            f"{host}: more than {settings.max_response_bytes} bytes",
        )
    if 200 <= answer.status < 300:
        status = 200 if answer.status in _NO_BODY_STATUSES else answer.status
        return Response(
            content=_success_body(token.access_token, answer.body),
            status_code=status,
            media_type="application/json",
        )
    if answer.status >= 400:
        passed: dict[str, str] = {}
        if answer.retry_after is not None:
            passed["Retry-After"] = answer.retry_after
        return Response(
            content=answer.body,
            status_code=answer.status,
            media_type=answer.content_type,
            headers=passed,
        )
    raise ApiError(
        502,
        ErrorCode.UPSTREAM_FAILED,
        "The external service answered with a redirect, which is not followed",
        f"{host}: HTTP {answer.status}",
    )
