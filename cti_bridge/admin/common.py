"""Small helpers shared by the admin API's route modules: paging, query strings, Xelion failures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from fastapi.responses import JSONResponse

from cti_bridge.errors import ApiError, ErrorCode
from cti_bridge.ports import XelionCheckError, XelionTarget
from cti_bridge.store.integrations import INT_MAX

MAX_OFFSET = 2**31 - 1
# Row ids are positive 32-bit integers (``store.integrations.valid_id``): a larger number given as a
# filter would be an error from the database (PostgreSQL's ``integer``, SQLite beyond 64 bits).
MAX_ID = INT_MAX

# The manual's lists have no paging: without ``limit`` a list is whole. A default of 1,000 cut a
# larger tenant's users short, and a script doing what the manual says (GET the mappings, edit,
# PUT them back) deleted every mapping past the 1,000th.
Limit = Annotated[
    int | None, Query(ge=1, le=MAX_OFFSET, description="at most this many items (default: all)")
]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="skip this many items")]


def paged(items: list[dict[str, object]], total: int) -> JSONResponse:
    """A bare JSON array, as the manual shows its lists, with the total in ``X-Total-Count``."""
    return JSONResponse(items, headers={"X-Total-Count": str(total)})


def query_text(value: str | None, name: str, max_length: int = 255) -> str | None:
    """A query-string value checked for what the database cannot compare (NUL) or need not see."""
    if value is None:
        return None
    if "\x00" in value or len(value) > max_length:
        raise ApiError(
            422,
            ErrorCode.INVALID_REQUEST,
            f"Invalid request: query.{name}: must be at most {max_length} characters without NUL",
            f"query.{name}",
        )
    return value


def query_filter(value: str | None, name: str, max_length: int = 255) -> str | None:
    """A list filter from the query string (``query_text``); an empty one filters nothing, as if
    it were left out: a script that always sends ``?username=...&oid=`` and fills in one of them
    means the one it filled in, not the users whose oid is empty (none)."""
    return query_text(value, name, max_length) or None


def xelion_failure(exc: XelionCheckError, target: XelionTarget, *, what: str = "admin") -> ApiError:
    """A failed Xelion check as an API error (xelion-protocol.md §1 codes)."""
    where = f"{target.host} tenant {target.tenant}"
    if exc.kind in ("credentials", "disabled", "not_admin"):
        reason = {
            "disabled": "the account is disabled",
            "not_admin": "the user is not an admin (Xelion refused an admin-only request); "
            "call events reach only an admin's websocket",
        }.get(exc.kind, "wrong user name, password or tenant")
        return ApiError(
            401, ErrorCode.WRONG_CREDENTIALS, f"Xelion refused the {what} credentials", f"{where}: {reason}"
        )
    if exc.kind == "unreachable":
        return ApiError(502, ErrorCode.XELION_UNREACHABLE, "Xelion did not answer", f"{where}: {exc.message}")
    return ApiError(
        502,
        ErrorCode.UPSTREAM_FAILED,
        "Xelion gave an answer that could not be used",
        f"{where}: {exc.message}",
    )
