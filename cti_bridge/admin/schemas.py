"""Request and response models of the admin API, with the Xelion CTI server manual's camelCase names.

The request models validate what ``admin.body`` parsed (a missing or mistyped field becomes 422/10201
naming it); the response models document the answers in OpenAPI (the routes build the JSON
themselves, because the manual's lists are bare arrays with extension keys beside the manual's own).

Length limits match the columns of ``store.models``, so a value the API accepts always fits the
database (PostgreSQL would refuse a too-long ``VARCHAR`` with an error instead of a 422).
Unknown keys are ignored, as the manual's Java server (Jackson) did for the examples it shows.

A mapping's ``xelionEvent`` must be a call event type (``events.CALL_EVENT_TYPES``): the source
subscribes to every type the mappings name (xelion-protocol.md §3.2) but keeps only call events, so
a mapping for any other type would be saved and never delivered.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from cti_bridge.events import CALL_EVENT_TYPES
from cti_bridge.ports import RESERVED_TOKEN_PARAMETERS

# Secrets (client secrets, tokens, device codes) may be long JWTs; 16 KiB is far beyond any real one.
SECRET_MAX = 16384
TEMPLATE_MAX = 65536

Str255 = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Secret = Annotated[str, StringConstraints(min_length=1, max_length=SECRET_MAX)]

# host[:port] as a DNS name, an IPv4 address or a bracketed IPv6 address. Anything else (a slash, an
# "@", a space) could change the meaning of the URL ``{protocol}://{host}/api/v1/{tenant}/`` that is
# built from it (xelion-protocol.md §1), so it is refused. Matched whole (``fullmatch``): ``$`` also
# matches before a final newline, and "pbx.example.com\n" passed, then failed as a 502.
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
# The tenant is one path segment of that URL.
_TENANT_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]{1,255}$")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# Sorted, so that the error message and the OpenAPI enum read the same every time.
XELION_EVENTS = tuple(sorted(CALL_EVENT_TYPES))


def check_host(value: str) -> str:
    if not _HOST_RE.fullmatch(value):
        raise ValueError("must be a host name or address, optionally with :port")
    _check_host_and_port(urlsplit(f"//{value}"))
    return value


def _check_host_and_port(parts: Any) -> None:
    """What the pattern above and ``urlsplit`` let through but no HTTP client can send (each was a
    500 of the admin API, or a source or delivery failing for good, once stored): a port beyond
    65535, a bracketed address that is not IPv6, an empty or over-long DNS label (IDNA)."""
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    host = parts.hostname
    if not host:
        raise ValueError("must name a host")
    if parts.netloc.rpartition("@")[2].startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has a bracketed address that is not an IPv6 address") from None
        return
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError("has a host name with an empty or over-long label") from None


def check_tenant(value: str) -> str:
    if not _TENANT_RE.fullmatch(value) or value in (".", ".."):
        raise ValueError("must be one URL path segment (letters, digits, '.', '_', '-', ...)")
    return value


def check_xelion_event(value: str) -> str:
    if value not in CALL_EVENT_TYPES:
        raise ValueError("must be a call event type: one of " + ", ".join(XELION_EVENTS))
    return value


def check_http_uri(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http:// or https:// URI")
    _check_host_and_port(parts)
    try:
        httpx.URL(value)  # what the token endpoint's and the services' requests are built from
    except httpx.InvalidURL as exc:
        raise ValueError(f"is not a URI that can be sent: {str(exc)[:200]}") from None
    return value


#: Every request model's settings: unknown keys are ignored, and a number where a string belongs
#: is taken as its text (``"xelionOid": 1650950``), as the manual's Java server (Jackson) takes it.
IN_CONFIG = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


def sendable_header(value: str) -> bool:
    """Whether ``value`` can be an HTTP header value: visible ASCII, spaces and tabs (RFC 9110
    §5.5); a CR, an LF or a non-ASCII letter cannot be sent."""
    return all(c == "\t" or " " <= c <= "~" for c in value)


def _check_header_prefix(value: str) -> str:
    if not sendable_header(value):
        raise ValueError("must be visible ASCII, spaces and tabs: it starts an Authorization header")
    return value


#: The start of an ``Authorization`` header, refused where it is given when no header can carry
#: it, not met by every request later as a header that cannot be sent.
HeaderPrefix = Annotated[str, StringConstraints(max_length=255), AfterValidator(_check_header_prefix)]


class _In(BaseModel):
    model_config = IN_CONFIG


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- POST api/crm-integrations -------------------------------------------------------------------


class XelionContextIn(_In):
    adminUsername: Str255
    adminPassword: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    host: Str255
    tenant: Str255
    protocol: Literal["http", "https"] = "https"

    _host = field_validator("host")(check_host)
    _tenant = field_validator("tenant")(check_tenant)


class CrmContextIn(_In):
    authorizationServerUri: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    # May end in a space ("Bearer "): the manual says the caller sets it explicitly when wanted.
    authorizationHeaderPrefix: HeaderPrefix = "Bearer "
    # Extension: how the token endpoint authenticates the client (RFC 6749 §2.3.1).
    tokenEndpointAuthMethod: Literal["client_secret_post", "client_secret_basic"] = "client_secret_post"
    # Extension: more form parameters of every token request (``scope`` for Entra ID's v2
    # endpoint, ``resource`` for v1); not secrets (shown by GET).
    tokenRequestParameters: (
        dict[
            Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")],
            Annotated[str, StringConstraints(max_length=2048)],
        ]
        | None
    ) = None

    _uri = field_validator("authorizationServerUri")(check_http_uri)

    @field_validator("tokenRequestParameters")
    @classmethod
    def _token_parameters(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("at most 16 parameters")
        reserved = sorted(set(value) & RESERVED_TOKEN_PARAMETERS)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set here: the grant and the client set it")
        return value or None


class UserCredentialsIn(_In):
    xelionUsername: Str255
    clientId: Annotated[str, StringConstraints(max_length=1024)] | None = None
    clientSecret: Annotated[str, StringConstraints(max_length=SECRET_MAX)] | None = None
    deviceCode: Annotated[str, StringConstraints(max_length=SECRET_MAX)] | None = None
    refreshToken: Annotated[str, StringConstraints(max_length=SECRET_MAX)] | None = None


class EventUriMappingIn(_In):
    xelionEvent: Annotated[
        str,
        StringConstraints(min_length=1, max_length=64),
        Field(json_schema_extra={"enum": list(XELION_EVENTS)}),
    ]
    crmResourceUri: Annotated[str, StringConstraints(min_length=1, max_length=TEMPLATE_MAX)]
    # An object or array (a JSON template tree), a string (a raw body template) or null (no body).
    crmResourcePayload: Any = None
    # Extensions beyond the manual.
    method: str | None = None
    headers: dict[str, Annotated[str, StringConstraints(max_length=TEMPLATE_MAX)]] | None = None
    contentType: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    condition: Annotated[str, StringConstraints(min_length=1, max_length=TEMPLATE_MAX)] | None = None

    _event = field_validator("xelionEvent")(check_xelion_event)

    @field_validator("crmResourcePayload")
    @classmethod
    def _payload(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict | list | str):
            raise ValueError("must be an object, an array, a string or null")
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str | None) -> str | None:
        if value is None:
            return None
        upper = value.upper()
        if upper not in HTTP_METHODS:
            raise ValueError("must be one of " + ", ".join(HTTP_METHODS))
        return upper


class CrmIntegrationIn(_In):
    xelionContext: XelionContextIn
    crmContext: CrmContextIn
    userCredentials: list[UserCredentialsIn] = Field(default_factory=list)
    eventUriMappings: list[EventUriMappingIn] = Field(default_factory=list)


# --- responses of api/crm-integrations -----------------------------------------------------------


class CrmContextOut(_Out):
    authorizationHeaderPrefix: str
    authorizationServerUri: str
    id: int


class XelionContextOut(_Out):
    host: str
    id: int
    protocol: str
    tenant: str


class SourceGapOut(_Out):
    start: str
    end: str | None
    reason: str | None


class SourceStatusOut(_Out):
    state: str
    error: str | None
    lastEventAt: str | None
    gaps: list[SourceGapOut]


class CrmIntegrationOut(_Out):
    crmContext: CrmContextOut
    xelionContext: XelionContextOut
    source: SourceStatusOut | None = None


# --- user credentials and users ------------------------------------------------------------------


class UserCredentialsOut(_Out):
    xelionUsername: str
    xelionOid: str | None
    # A string, as the manual shows it ("userCredentialsId": "5").
    userCredentialsId: str
    state: str | None = None


class XelionUserOut(_Out):
    xelionOid: str | None
    xelionUsername: str


class XelionUserUpdateIn(_In):
    xelionUsername: Str255 | None = None
    xelionOid: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None


class UpdateValueIn(_In):
    value: Secret


# --- event uri mappings --------------------------------------------------------------------------


class EventUriMappingOut(_Out):
    createdAt: str
    crmResourcePayload: Any
    crmResourceUri: str
    id: int
    xelionEvent: str


# --- xelion environment and admin credentials ----------------------------------------------------


class XelionEnvironment(_In):
    host: Str255
    tenant: Str255
    # Optional on PUT: the current protocol stays when it is left out.
    protocol: Literal["http", "https"] | None = None

    _host = field_validator("host")(check_host)
    _tenant = field_validator("tenant")(check_tenant)


class XelionEnvironmentOut(_Out):
    host: str
    protocol: str
    tenant: str


class AdminUsernameUpdateIn(_In):
    oldUsername: Str255
    newUsername: Str255


class AdminPasswordUpdateIn(_In):
    oldPassword: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    newPassword: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


# --- session -------------------------------------------------------------------------------------


class LoginIn(_In):
    adminUsername: Str255
    adminPassword: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    host: Str255
    tenant: Str255
    protocol: Literal["http", "https"] | None = None


class LoginOut(_Out):
    authentication: str
    validUntil: str


# --- errors and probes ---------------------------------------------------------------------------


class ErrorOut(_Out):
    """Xelion's error shape (xelion-protocol.md §1)."""

    errorCode: int
    message: str
    info: str


class StatusOut(_Out):
    status: str


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    CrmIntegrationIn,
    UserCredentialsIn,
    EventUriMappingIn,
    XelionUserUpdateIn,
    UpdateValueIn,
    XelionEnvironment,
    AdminUsernameUpdateIn,
    AdminPasswordUpdateIn,
    LoginIn,
)
