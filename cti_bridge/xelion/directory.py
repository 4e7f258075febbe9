"""The checks the admin API makes with Xelion, over HTTP: ``ports.XelionDirectory``.

Every check that needs an admin session logs in with its own short-lived userSpace,
``cti-bridge-check-<random>``, and logs out at once, so it never collides with the source's session
(xelion-protocol.md §2). Failures become ``ports.XelionCheckError`` with a ``kind`` and a message that
carries no secret.
"""

from __future__ import annotations

import secrets

import httpx

from cti_bridge.ports import XelionCheckError, XelionTarget, XelionUser
from cti_bridge.xelion.rest import XelionError, XelionSession

CHECK_USER_SPACE_PREFIX = "cti-bridge-check-"


def _check_error(exc: XelionError) -> XelionCheckError:
    kind = exc.kind
    if kind == "not_authenticated":
        kind = "credentials"  # a 401 on a check means the credentials did not do
    elif kind == "forbidden":
        kind = "not_admin"  # 403/10101 on an admin-only request: the user may log in, but no more
    elif kind not in ("credentials", "disabled", "unreachable", "protocol", "not_found"):
        # busy, server, already_logged_in, http: Xelion answered but would not say yes.
        kind = "protocol"
    return XelionCheckError(kind, exc.message)


class HttpXelionDirectory:
    """``ports.XelionDirectory`` over Xelion's REST API, sharing the application's httpx client."""

    def __init__(
        self, client: httpx.AsyncClient, *, app_key: str | None = None, timeout: float = 15.0
    ) -> None:
        self._client = client
        self._app_key = app_key
        self._timeout = timeout

    def _session(self, target: XelionTarget, username: str, password: str) -> XelionSession:
        return XelionSession(
            self._client,
            target,
            username,
            password,
            CHECK_USER_SPACE_PREFIX + secrets.token_hex(6),
            app_key=self._app_key,
            timeout=self._timeout,
        )

    async def check_admin(self, target: XelionTarget, username: str, password: str) -> None:
        """Log in with a one-off userSpace, make one admin-only request, and log out again; raise
        XelionCheckError if refused (``not_admin`` when the login works but the request does not).

        Call events come only to an admin's socket (xelion-protocol.md §3.5): a user who may log in
        but is no admin was accepted, and its source was "subscribed" and heard nothing, ever.
        ``GET users`` is admin only (§2); one item of the user's own name is enough to ask.

        Cancellation: if cancelled after login, the logout is still attempted on the way out.
        """
        session = self._session(target, username, password)
        try:
            await session.login()
            await session.find_users(username, page_size=1, max_pages=1)
        except XelionError as exc:
            raise _check_error(exc) from None
        finally:
            await session.logout()

    async def find_user(
        self, target: XelionTarget, admin_username: str, admin_password: str, user_name: str
    ) -> XelionUser | None:
        """Look a user up by ``userName`` with the admin's credentials; None when unknown.

        Cancellation: the check session is logged out on the way out, as in :meth:`check_admin`.
        """
        session = self._session(target, admin_username, admin_password)
        try:
            await session.login()
            users = await session.find_users(user_name)
        except XelionError as exc:
            raise _check_error(exc) from None
        finally:
            await session.logout()
        return users[0] if users else None

    async def whoami(self, target: XelionTarget, user_token: str) -> str:
        """The ``userName`` a Xelion user token belongs to (``GET me/info``, §2 chosen).

        Uses the token as it is: no login, no logout (it is the user's session, not ours).
        """
        session = XelionSession.borrowed(self._client, target, user_token, timeout=self._timeout)
        try:
            info = await session.request("GET", "me/info", relogin=False)
        except XelionError as exc:
            raise _check_error(exc) from None
        try:
            body = info.json()
        except ValueError:
            raise XelionCheckError("protocol", "me/info: answer is not JSON") from None
        obj = body.get("object") if isinstance(body, dict) else None
        user_name = obj.get("userName") if isinstance(obj, dict) else None
        if not isinstance(user_name, str) or not user_name:
            raise XelionCheckError("protocol", "me/info: answer has no userName")
        return user_name
