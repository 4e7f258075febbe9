"""The admin API application: ``create_admin_app(AdminDeps)`` builds a FastAPI app around injected parts.

Every error leaves in Xelion's shape, ``{"errorCode", "message", "info"}`` (xelion-protocol.md §1),
with the status and code of ``cti_bridge.errors``:

- ``ApiError`` as raised (its ``headers``, e.g. ``Retry-After``, included);
- ``RequestValidationError`` (a bad path or query parameter) → 422/10201 naming it;
- Starlette's ``HTTPException`` (an unknown path → 404/10100, a wrong method → 405/10206);
- the database going away under a request (a PostgreSQL connection dropped, a locked SQLite file;
  ``_database_away``) → 503/11001 with ``Retry-After: 1``, one log line;
- anything else → 500/11000 "Internal error", logged with its traceback; the answer carries neither
  the traceback nor the exception's text (which could hold a secret).

The last one is a plain ASGI middleware rather than an ``Exception`` handler: Starlette re-raises
after running such a handler, so the server would log the error a second time.

Every answer of the application, errors and passed-through external bodies included, carries
``X-Content-Type-Options: nosniff`` and ``Cache-Control: no-store`` (``CatchAllMiddleware``).

OpenAPI: FastAPI's own ``/docs`` and ``/openapi.json``. The routes read their bodies themselves
(``admin.body``, for line/column errors), so the request models are added to the schema components
here and referenced from each route's ``openapi_extra``.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cti_bridge.admin import schemas
from cti_bridge.admin.auth import LoginLimiter
from cti_bridge.admin.body import loc_text
from cti_bridge.admin.deps import AdminDeps, Readiness, get_deps
from cti_bridge.admin.routes import apps, environment, health, integrations, session, users
from cti_bridge.errors import ApiError, ErrorCode

__all__ = ["AdminDeps", "Readiness", "create_admin_app", "get_deps"]

log = logging.getLogger(__name__)

_STATUS_CODES = {
    401: ErrorCode.NOT_AUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.BODY_TOO_LARGE,
    429: ErrorCode.TOO_MANY_REQUESTS,
}


class ErrorJSONResponse(JSONResponse):
    """An error answer, written ASCII-only: its text may quote what the client sent (a key, a path),
    and a lone surrogate there cannot be encoded as UTF-8, which made the error a 500. As an escape
    it is valid JSON, and any other character reads the same to a JSON parser."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, code: ErrorCode, message: str, info: str = "", **kw: Any) -> JSONResponse:
    return ErrorJSONResponse(
        {"errorCode": int(code), "message": message, "info": info}, status_code=status, **kw
    )


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers: dict[str, str] | None = getattr(exc, "headers", None)
    return ErrorJSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        loc = [p for p in err.get("loc", ()) if isinstance(p, int | str)]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{loc_text(loc)}: {msg[:1].lower() + msg[1:]}")
    first = problems[0] if problems else "the request is invalid"
    return error_response(
        422, ErrorCode.INVALID_REQUEST, f"Invalid request: {first}", "; ".join(problems[:10])
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
    if exc.status_code == 404:
        message, info = "Not found", f"no resource at {request.url.path[:200]}"
    elif exc.status_code == 405:
        message, info = "Method not allowed", f"{request.method} is not allowed on {request.url.path[:200]}"
        allowed = _allowed_methods(request)
        if allowed:
            return error_response(405, code, message, info, headers={"Allow": ", ".join(allowed)})
    else:
        message, info = str(exc.detail)[:200], ""
    return error_response(exc.status_code, code, message, info, headers=exc.headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path. Starlette's ``Allow`` names only the first route
    that matched the path: ``GET`` for api/users/{id}, which PUT and DELETE reach as well. Each
    method is asked of the routes as a request of its own (``BaseRoute.matches``), so routers that
    FastAPI includes lazily answer too."""
    allowed: list[str] = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    if "GET" in allowed and "HEAD" not in allowed:
        allowed.insert(allowed.index("GET") + 1, "HEAD")  # PathMiddleware answers it as GET
    return allowed


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


#: What every answer of the admin API carries (``CatchAllMiddleware`` adds them). ``no-store``:
#: answers hold access tokens (the external call's; RFC 6749 §5.1 asks it of any answer with a
#: token), session tokens and a tenant's configuration, which no proxy or browser cache should keep.
#: ``nosniff``: a body passed through from an external service keeps that service's Content-Type,
#: and a browser must not take it for something else (a page served from the admin port).
_RESPONSE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))


class CatchAllMiddleware:
    """Answer 500/11000 for any exception no handler took, and log it once (see module docstring);
    put ``_RESPONSE_HEADERS`` on every answer (unless a route set its own value of one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in _RESPONSE_HEADERS if h[0] not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            # The client left (or admin/http.py cut off a body that did not arrive in time): no one
            # to answer, and nothing went wrong here.
            log.debug("admin API: the client left during %s %s", scope.get("method"), scope.get("path"))
        except Exception as exc:
            if isinstance(exc, OperationalError) and _database_away(exc):
                # The database went away under the request (a PostgreSQL connection dropped, a
                # server restarting, a SQLite file locked by another program): no bug, and the next
                # request gets a fresh connection. A 503 the client may retry, one line in the log.
                # (The drivers' messages name host, port, user or file, never a password.)
                reason = str(exc.orig or exc).strip().splitlines()
                log.warning(
                    "admin API: the database did not answer %s %s (%s: %s)",
                    scope.get("method"),
                    scope.get("path"),
                    type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__,
                    reason[0][:200] if reason else "",
                )
                status, code, message = (
                    503,
                    ErrorCode.DATABASE_UNAVAILABLE,
                    "The database is not available; try again",
                )
            else:
                log.exception("admin API: unhandled error on %s %s", scope.get("method"), scope.get("path"))
                status, code, message = 500, ErrorCode.INTERNAL, "Internal error"
            if started:
                raise  # too late for an error body: let the server drop the connection
            retry = [(b"retry-after", b"1")] if status == 503 else None
            await _send_error(send_wrapper, status, code, message, retry)


def _database_away(exc: OperationalError) -> bool:
    """Whether an ``OperationalError`` says the database is away (worth a retry), not that the
    statement is wrong: SQLite raises OperationalError for "no such column" and syntax errors
    too, which are bugs (PostgreSQL raises ProgrammingError for those)."""
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if type(orig).__module__.startswith("psycopg"):
        # psycopg's OperationalError: the connection or the server, never the SQL; but for class
        # 54, a limit of the statement itself (an index entry too large, too many arguments),
        # which no retry mends: the 503 "try again" answered for ever.
        return not str(getattr(orig, "sqlstate", None) or "").startswith("54")
    text = str(orig).lower()
    return "database is locked" in text or "database is busy" in text or "unable to open" in text


async def _send_error(
    send: Send, status: int, code: ErrorCode, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"errorCode": int(code), "message": message, "info": ""}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema(
        [(m, "validation") for m in (*schemas.REQUEST_MODELS, *apps.REQUEST_MODELS)],
        ref_template="#/components/schemas/{model}",
    )
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        components.setdefault(name, schema)
    app.openapi_schema = spec
    return spec


class PathMiddleware:
    """The request path as the routes know it.

    ``/api/users/1/`` is ``/api/users/1``: the route is found as it is, not through FastAPI's 307
    redirect to the path without the slash, which a script that does not follow redirects (curl
    without ``-L``) read as a failure, and which it would have to resend its body to.

    A request target in absolute form (``POST http://host:8080/api/... HTTP/1.1``, as a client
    behind a forward proxy may send it) is its path as well: HTTP/1.1 servers must accept it
    (RFC 9112 §3.2.2), and uvicorn's h11 protocol (admin/http.py) hands the target on as it is.

    ``//api/users/1`` is ``/api/users/1``: the manual gives its paths without a leading slash, and
    a script that joins them to a base URL ending in one asks for the doubled form.

    ``HEAD`` is ``GET`` without the body (RFC 9110 §9.3.2; FastAPI's routes take only the methods
    they name).

    A query parameter left empty (``?limit=&offset=``, ``?xelionContextId=``) is as if it were left
    out, for every parameter: a script that fills in a URL template sends the ones it has no value
    for empty. The text filters already read an empty value so (``common.query_filter``); a number
    left empty was a 422, and a cursor left empty one too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(("http://", "https://")):
            scope = dict(scope)
            path = scope["path"] = _origin_form(path)
            raw_path: bytes | None = scope.get("raw_path")
            if raw_path:
                scope["raw_path"] = _origin_form(raw_path.decode("latin-1")).encode("latin-1")
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "//" in path:
            scope = dict(scope)
            path = scope["path"] = _SLASHES.sub("/", path)
            doubled: bytes | None = scope.get("raw_path")
            if doubled:
                scope["raw_path"] = _RAW_SLASHES.sub(b"/", doubled)
        if len(path) > 1 and path.endswith("/"):
            scope = dict(scope)
            scope["path"] = path.rstrip("/") or "/"
            raw: bytes | None = scope.get("raw_path")
            if raw:
                scope["raw_path"] = raw.rstrip(b"/") or b"/"
        query: bytes = scope.get("query_string", b"")
        if query:
            kept = _without_empty(query)
            if kept != query:
                scope = {**scope, "query_string": kept}
        if scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
            await self.app(scope, receive, _without_body(send))
            return
        await self.app(scope, receive, send)


_SLASHES = re.compile("/{2,}")
_RAW_SLASHES = re.compile(b"/{2,}")


def _without_empty(query: bytes) -> bytes:
    """``query`` without its empty parameters (``name=``, a bare ``name``, an empty piece between
    two ``&``); every other piece stays byte for byte as it came."""
    return b"&".join(p for p in query.split(b"&") if p.partition(b"=")[2])


def _without_body(send: Send) -> Send:
    """``send`` with every body chunk emptied (the headers, ``Content-Length`` included, as GET's)."""

    async def head_send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            message = {**message, "body": b""}
        await send(message)

    return head_send


def _origin_form(target: str) -> str:
    """The path of an absolute-form target (``http://host:port/api/x`` -> ``/api/x``)."""
    after_scheme = target.split("://", 1)[1]
    slash = after_scheme.find("/")
    return after_scheme[slash:] if slash >= 0 else "/"


def create_admin_app(deps: AdminDeps) -> FastAPI:
    """The admin API over ``deps`` (stored on ``app.state.deps``), with ``deps.extra_routers`` included."""
    app = FastAPI(
        title="cti-bridge admin API",
        version="1",
        description=(
            "The REST admin API of the Xelion CTI server (same paths and JSON shapes), plus cti-bridge's "
            'extensions. Authenticate with "Authorization: xelion <token>".'
        ),
    )
    app.state.deps = deps
    app.state.login_limiter = LoginLimiter(
        deps.clock,
        max_failures=deps.settings.login_failures_before_delay,
        lockout_seconds=deps.settings.login_lockout_seconds,
    )
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(PathMiddleware)
    for module in (integrations, users, environment, session, health, apps):
        app.include_router(module.router)
    for router in deps.extra_routers:
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        return _openapi(app)

    app.openapi = openapi  # type: ignore[method-assign]
    return app
