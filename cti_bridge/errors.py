"""One error tree. Every error the admin API can answer has a stable numeric code and an HTTP status.

The body is Xelion's own error shape, ``{"errorCode": <int>, "message": "...", "info": "..."}``
(xelion-protocol.md §1), so scripts written against Xelion's CTI server read ours the same way.
Messages and info never carry a secret or a stack trace.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Stable error codes; README.md lists each with its meaning."""

    NOT_AUTHENTICATED = 10000  # 401: no, malformed, unknown or expired token
    WRONG_CREDENTIALS = 10004  # 401: admin user name, password or tenant refused
    FORBIDDEN = 10101  # 403: the token may not do this
    NOT_FOUND = 10100  # 404: unknown id, or another integration's id
    MALFORMED_JSON = 10200  # 400: the body is not JSON (line and column in info)
    INVALID_REQUEST = 10201  # 422: a field is missing or of the wrong type (named in info)
    INVALID_TEMPLATE = 10202  # 422: a template does not compile (mapping, place and column in info)
    HOST_NOT_ALLOWED = 10203  # 403: the Xelion host is not in CTI_BRIDGE_ALLOWED_XELION_HOSTS
    UNKNOWN_XELION_USER = 10204  # 422: the Xelion user does not exist on the phone system
    BODY_TOO_LARGE = 10205  # 413: the request body exceeds the admin API's limit
    METHOD_NOT_ALLOWED = 10206  # 405: the path exists but not with this HTTP method
    CONFLICT = 10300  # 409: already exists (integration for host+tenant, user in a CRM context)
    TOO_MANY_REQUESTS = 10400  # 429: slowed down after failed logins
    XELION_UNREACHABLE = 10500  # 502: Xelion did not answer the check
    UPSTREAM_FAILED = 10501  # 502: an external service failed
    UPSTREAM_TIMEOUT = 10502  # 504: an external service did not answer in time
    UPSTREAM_REAUTH = 10503  # 401: the authorization server refused a stored grant; POST a new one
    INTERNAL = 11000  # 500: a bug; details only in the log
    DATABASE_UNAVAILABLE = 11001  # 503: the database did not answer (a dropped connection); try again


class CtiBridgeError(Exception):
    """Root of every error of ours."""


class ApiError(CtiBridgeError):
    """An error answered to an admin API client in Xelion's error shape."""

    def __init__(self, status: int, code: ErrorCode, message: str, info: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.info = info

    def body(self) -> dict[str, object]:
        return {"errorCode": int(self.code), "message": self.message, "info": self.info}


def not_found(what: str, ident: object) -> ApiError:
    return ApiError(404, ErrorCode.NOT_FOUND, f"{what} not found", f"{what} {ident} does not exist")


def not_authenticated(info: str = "") -> ApiError:
    return ApiError(401, ErrorCode.NOT_AUTHENTICATED, "Not authenticated", info)


def invalid_request(message: str, info: str = "") -> ApiError:
    return ApiError(422, ErrorCode.INVALID_REQUEST, message, info)


def conflict(message: str, info: str = "") -> ApiError:
    return ApiError(409, ErrorCode.CONFLICT, message, info)


class ConfigError(CtiBridgeError):
    """A setting is invalid; the message names it. The CLI exits with ``ExitCode.CONFIG``."""


class StoreLockedError(CtiBridgeError):
    """Another cti-bridge process already runs on this SQLite database."""


class SchemaTooNewError(CtiBridgeError):
    """The database's schema is at a revision this release does not know: a newer release migrated
    it. Nothing is changed; the CLI exits with ``ExitCode.DATABASE``."""


class ExitCode(IntEnum):
    """Process exit codes of ``cti-bridge``; README.md documents them."""

    OK = 0
    FAILURE = 1  # an unexpected error (details in the log)
    USAGE = 2  # bad command line (argparse)
    CONFIG = 3  # an invalid setting (one line names it)
    DATABASE = 4  # cannot be opened, locked by another instance, a newer schema, or migration failed


# --- the token manager's (delivery/oauth.py) --------------------------------------------------


class TokenError(CtiBridgeError):
    """Root of the token manager's errors. Texts name the credential, never a secret."""


class ReauthRequired(TokenError):
    """The credential needs a new refresh token or device code; it is marked ``reauth_required``."""

    def __init__(self, key: object, reason: str) -> None:
        super().__init__(f"credential {key} needs re-authorisation: {reason}")
        self.key = key
        self.reason = reason


class TokenNotReady(TokenError):
    """The device-code grant is still waiting for the user (``authorization_pending``/``slow_down``).
    Retryable: ask again after ``retry_after`` seconds; not a failed attempt."""

    def __init__(self, key: object, retry_after: float) -> None:
        super().__init__(f"credential {key}: device authorisation pending, retry in {retry_after:g} s")
        self.key = key
        self.retry_after = retry_after


class TokenEndpointError(TokenError):
    """The token endpoint failed: ``retryable`` for 5xx, 408/425/429, timeouts, connection errors
    and answers that are not OAuth (a 4xx without an OAuth error code, a 2xx that is not JSON); not
    for OAuth errors other than the re-authorisation ones, a 2xx without an access token, a URI no
    client can send to, or a token endpoint refused by the outbound guard."""

    def __init__(
        self, message: str, *, retryable: bool, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        #: Seconds the endpoint asked us to wait (``Retry-After``, or a throttling answer's own pause).
        self.retry_after = retry_after


class CredentialNotFound(TokenEndpointError):
    """The credential no longer exists (deleted meanwhile). Not retryable."""

    def __init__(self, key: object) -> None:
        super().__init__(f"credential {key} does not exist", retryable=False)
        self.key = key
