"""A dead grant's log line names whose credential it is (an operator review's finding): the
repair (``POST api/users/{id}/refreshtoken/update``, or a new ``POST api/cti-app-context``) needs
the id, and the operator thinks in Xelion user names and integrations. The line said only
``user credential 3 needs re-authorisation: ...``. The token store reads the row anyway when it
loads the credential; what it read names the credential in every later line. Never a secret."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from cti_bridge.delivery.oauth import ReauthRequired, TokenManager
from cti_bridge.sim.crm import CrmSimulator
from cti_bridge.store.app_contexts import AppContextInput, AppContextKey, AppContextTokenStore
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database
from cti_bridge.store.models import CrmContext
from cti_bridge.store.tokens import UserCredentialTokenStore
from tests.integration.oauth_helpers import CLIENT_ID, CLIENT_SECRET, FakeClock, add_credential

OAUTH = "cti_bridge.delivery.oauth"
REVOKED = "rt-revoked-by-the-user-0123456789"
ACCESS = "at-stored-access-token-0123456789"


def _oauth_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == OAUTH]


async def test_a_user_credentials_dead_grant_names_the_user_and_the_integration(
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger=OAUTH)
    cred = await add_credential(database, secret_box, sim.token_url, refresh_token=REVOKED, username="anne")
    crm = await database.run(lambda s: s.get(CrmContext, cred.crm_context_id))
    assert crm is not None
    store = UserCredentialTokenStore(database, secret_box)
    assert store.describe(cred.id) == f"user credential {cred.id}"  # not read yet: the id alone
    tokens = TokenManager(store, http, FakeClock(), 60.0, allow_private=True)
    with pytest.raises(ReauthRequired):
        await tokens.get(cred.id)
    who = f"user credential {cred.id} (Xelion user anne, integration {crm.xelion_context_id})"
    lines = _oauth_lines(caplog)
    assert f"{who} needs re-authorisation: the token endpoint answered invalid_grant" in lines
    assert f"token refresh_token grant for {who} at 127.0.0.1: HTTP 400, error invalid_grant" in lines
    for secret in (REVOKED, CLIENT_SECRET):
        assert secret not in caplog.text


async def test_an_app_contexts_dead_grant_names_the_user_host_and_tenant(
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger=OAUTH)
    store = AppContextTokenStore(database, secret_box)
    key = AppContextKey("Xelion.Example.com", "master", "anne", sim.token_url)
    data = AppContextInput(
        key=key,
        authorization_header_prefix="Bearer ",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=REVOKED,
        access_token=ACCESS,
    )
    context_id, _ = await store.save(data, datetime.now(UTC))
    tokens = TokenManager(store, http, FakeClock(), 60.0, allow_private=True)
    # The stored access token has no expiry: used until a 401, then refreshed (and refused).
    assert (await tokens.get(context_id)).access_token == ACCESS
    with pytest.raises(ReauthRequired):
        await tokens.refresh_after_401(context_id, ACCESS)
    who = f"app context {context_id} (Xelion user anne, xelion.example.com tenant master)"
    assert f"{who} needs re-authorisation: the token endpoint answered invalid_grant" in _oauth_lines(caplog)
    for secret in (REVOKED, CLIENT_SECRET, ACCESS):
        assert secret not in caplog.text
