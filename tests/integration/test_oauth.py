"""The token manager (reliability.md §10-§14) against the CRM simulator's token endpoint over real
HTTP on 127.0.0.1, with the token store on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from oauth_helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeClock,
    add_credential,
    operator_sets_device_code,
    operator_sets_refresh_token,
    read_credential,
)
from sqlmodel import Session, update

from cti_bridge.clock import utcnow
from cti_bridge.config import Settings
from cti_bridge.delivery.device_codes import DeviceCodePoller
from cti_bridge.delivery.egress import build_http_client
from cti_bridge.delivery.oauth import (
    DEVICE_CODE_GRANT,
    ReauthRequired,
    TokenEndpointError,
    TokenManager,
    TokenNotReady,
)
from cti_bridge.sim.crm import CrmSimulator, Failure
from cti_bridge.store import integrations, migrate
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database, make_engine
from cti_bridge.store.integrations import delete_credential, update_secret
from cti_bridge.store.models import UserCredentials
from cti_bridge.store.tokens import UserCredentialTokenStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def replicas(db_url: str) -> Iterator[tuple[Database, Database]]:
    """Two replicas' databases (each its own engine and pool) over one migrated PostgreSQL database."""
    if db_url.startswith("sqlite"):
        pytest.skip("one process per SQLite database: there are no replicas to race")
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    replica_a, replica_b = Database(db_url, engine=engine), Database(db_url)
    try:
        yield replica_a, replica_b
    finally:
        replica_b.dispose()
        replica_a.dispose()


def manager(
    database: Database, box: SecretBox, http: httpx.AsyncClient, clock: FakeClock, **kw: object
) -> TokenManager[int]:
    return TokenManager(
        UserCredentialTokenStore(database, box),
        http,
        clock,
        60.0,
        allow_private=True,
        **kw,  # type: ignore[arg-type]
    )


async def crm_status(http: httpx.AsyncClient, sim: CrmSimulator, token: str) -> int:
    response = await http.post(
        f"{sim.url}/services/apexrest/Call", json={"x": 1}, headers={"Authorization": "Bearer " + token}
    )
    return response.status_code


async def test_100_deliveries_on_an_expired_token_make_one_token_request(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    refresh = sim.issue_refresh_token(CLIENT_ID)
    cred = await add_credential(
        database,
        secret_box,
        sim.token_url,
        refresh_token=refresh,
        access_token="expired-access-token",
        expires_at=clock.now() - timedelta(minutes=5),
    )
    tokens = manager(database, secret_box, http, clock)
    results = await asyncio.gather(*(tokens.get(cred.id) for _ in range(100)))
    assert sim.token_counts == {"refresh_token": 1}
    assert len({t.access_token for t in results}) == 1
    assert results[0].access_token != "expired-access-token"
    assert await crm_status(http, sim, results[0].access_token) == 201


async def test_returned_token_is_already_persisted(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    sim.extra_fields = {"instance_url": "https://eu1.example.my.salesforce.com"}
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    token = await manager(database, secret_box, http, clock).get(cred.id)
    row = await read_credential(database, cred.id)
    assert secret_box.decrypt_opt(row.access_token_enc) == token.access_token
    assert row.access_token_expires_at == token.expires_at
    assert row.version == token.version == 2
    assert token.extra["instance_url"] == "https://eu1.example.my.salesforce.com"
    assert token.extra["token_type"] == "Bearer"
    # A fresh manager (a restart) uses the stored token and its extra fields without a request.
    again = await manager(database, secret_box, http, clock).get(cred.id)
    assert again.access_token == token.access_token
    assert again.extra["instance_url"] == "https://eu1.example.my.salesforce.com"
    assert sim.token_counts == {"refresh_token": 1}


async def test_rotated_refresh_token_is_persisted(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    sim.rotate_refresh_tokens = True
    old = sim.issue_refresh_token(CLIENT_ID)
    cred = await add_credential(database, secret_box, sim.token_url, refresh_token=old)
    await manager(database, secret_box, http, clock).get(cred.id)
    (new,) = sim.current_refresh_tokens(CLIENT_ID)
    assert new != old and not sim.refresh_token_valid(old)
    row = await read_credential(database, cred.id)
    assert secret_box.decrypt_opt(row.refresh_token_enc) == new
    # The rotated token works for the next refresh (by a restarted manager, long after).
    clock.advance(7200)
    token = await manager(database, secret_box, http, clock).get(cred.id)
    assert sim.token_counts == {"refresh_token": 2}
    assert await crm_status(http, sim, token.access_token) == 201


async def test_no_token_in_plain_text_in_the_sqlite_file(
    sqlite_database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    sim.rotate_refresh_tokens = True
    sim.extra_fields = {"api_domain": "https://www.zohoapis.eu"}
    old = sim.issue_refresh_token(CLIENT_ID)
    cred = await add_credential(sqlite_database, secret_box, sim.token_url, refresh_token=old)
    token = await manager(sqlite_database, secret_box, http, clock).get(cred.id)
    (new,) = sim.current_refresh_tokens(CLIENT_ID)
    path = Path(sqlite_database.url.split(":///", 1)[1])
    raw = b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    assert b"client-one" in raw  # the file is readable and holds this credential
    for secret in (old, new, token.access_token, CLIENT_SECRET, "www.zohoapis.eu"):
        assert secret.encode() not in raw


async def test_invalid_grant_marks_reauth_required_after_one_attempt(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    cred = await add_credential(database, secret_box, sim.token_url, refresh_token="rt-revoked-by-the-user")
    tokens = manager(database, secret_box, http, clock)
    results = await asyncio.gather(*(tokens.get(cred.id) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, ReauthRequired) for r in results)
    assert sim.token_counts == {"refresh_token": 1}
    row = await read_credential(database, cred.id)
    assert row.state == "reauth_required"
    assert "invalid_grant" in (row.state_reason or "")
    # Parked: later deliveries do not hammer the token endpoint.
    with pytest.raises(ReauthRequired):
        await tokens.get(cred.id)
    assert sim.token_counts == {"refresh_token": 1}
    # An operator sets a new refresh token: the credential works again.
    await operator_sets_refresh_token(database, secret_box, cred.id, sim.issue_refresh_token(CLIENT_ID))
    token = await tokens.get(cred.id)
    assert await crm_status(http, sim, token.access_token) == 201
    assert (await read_credential(database, cred.id)).state == "active"


@pytest.mark.parametrize("style", ["invalid_client", "zoho"])
async def test_other_dead_grants_mark_reauth_required(
    style: str,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    refresh = sim.issue_refresh_token(CLIENT_ID)
    secret = CLIENT_SECRET
    if style == "zoho":
        sim.error_style = "zoho"  # 200 {"error": "invalid_code"}
        sim.revoke_refresh_token(refresh)
    else:
        secret = "a-wrong-client-secret"
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=refresh, client_secret=secret
    )
    with pytest.raises(ReauthRequired) as info:
        await manager(database, secret_box, http, clock).get(cred.id)
    assert ("invalid_code" if style == "zoho" else "invalid_client") in info.value.reason
    assert (await read_credential(database, cred.id)).state == "reauth_required"
    assert sum(sim.token_counts.values()) == 1


async def test_proactive_refresh_when_less_than_a_minute_is_left(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    sim.expires_in = 120
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock)
    assert tokens.peek(cred.id) is None  # peek (the worker's fast path) never fetches
    first = await tokens.get(cred.id)
    assert first.expires_at == clock.now() + timedelta(seconds=120)
    clock.advance(59)  # 61 s left: still used
    assert tokens.peek(cred.id) == first
    assert (await tokens.get(cred.id)).access_token == first.access_token
    assert sim.token_counts == {"refresh_token": 1}
    clock.advance(2)  # 59 s left: refreshed before use, while the old one is still valid
    assert tokens.peek(cred.id) is None  # what get refreshes, peek does not hand out
    second = await tokens.get(cred.id)
    assert second.access_token != first.access_token
    assert sim.access_token_valid(first.access_token)
    assert sim.token_counts == {"refresh_token": 2}


async def test_token_without_expiry_is_refreshed_only_after_a_401(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    sim.expires_in = None  # Salesforce gives no expires_in
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock)
    first = await tokens.get(cred.id)
    assert first.expires_at is None
    clock.advance(30 * 86400)
    assert (await tokens.get(cred.id)).access_token == first.access_token
    assert sim.token_counts == {"refresh_token": 1}

    sim.revoke_access_tokens()  # the session expired on the CRM side
    assert await crm_status(http, sim, first.access_token) == 401
    # Ten deliveries meet the 401 at once: one refresh.
    renewed = await asyncio.gather(
        *(tokens.refresh_after_401(cred.id, first.access_token) for _ in range(10))
    )
    assert len({t.access_token for t in renewed}) == 1
    assert sim.token_counts == {"refresh_token": 2}
    assert await crm_status(http, sim, renewed[0].access_token) == 201
    # A late 401 on the old token: the current one, no new request.
    late = await tokens.refresh_after_401(cred.id, first.access_token)
    assert late.access_token == renewed[0].access_token
    assert sim.token_counts == {"refresh_token": 2}
    assert (await tokens.get(cred.id)).access_token == renewed[0].access_token


async def test_device_code_grant(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    device_code = sim.add_device_code(CLIENT_ID, pending=1, slow_down=1)
    cred = await add_credential(database, secret_box, sim.token_url, device_code=device_code)
    tokens = manager(database, secret_box, http, clock)

    with pytest.raises(TokenNotReady) as info:
        await tokens.get(cred.id)
    assert info.value.retry_after == 10.0  # slow_down: 5 s + 5 s (RFC 8628 §3.5)
    with pytest.raises(TokenNotReady):
        await tokens.get(cred.id)  # too early: no request
    assert sim.token_counts == {DEVICE_CODE_GRANT: 1}

    clock.advance(10)
    with pytest.raises(TokenNotReady) as info:
        await tokens.get(cred.id)  # authorization_pending
    assert sim.token_counts == {DEVICE_CODE_GRANT: 2}

    clock.advance(info.value.retry_after)
    token = await tokens.get(cred.id)
    assert sim.token_counts == {DEVICE_CODE_GRANT: 3}
    assert await crm_status(http, sim, token.access_token) == 201
    row = await read_credential(database, cred.id)
    (issued,) = sim.current_refresh_tokens(CLIENT_ID)
    assert secret_box.decrypt_opt(row.refresh_token_enc) == issued
    assert row.device_code_enc is None  # single-use: consumed
    # From now on the refresh-token grant is used.
    clock.advance(7200)
    await tokens.get(cred.id)
    assert sim.token_counts == {DEVICE_CODE_GRANT: 3, "refresh_token": 1}


async def test_expired_device_code_marks_reauth_required(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    cred = await add_credential(database, secret_box, sim.token_url, device_code="dc-unknown-or-expired")
    with pytest.raises(ReauthRequired):
        await manager(database, secret_box, http, clock).get(cred.id)
    assert (await read_credential(database, cred.id)).state == "reauth_required"


async def test_no_refresh_token_nor_device_code_marks_reauth_required(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    cred = await add_credential(database, secret_box, sim.token_url)
    with pytest.raises(ReauthRequired):
        await manager(database, secret_box, http, clock).get(cred.id)
    assert sim.token_counts == {}
    assert (await read_credential(database, cred.id)).state == "reauth_required"


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
async def test_client_authentication_method(
    method: str,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    cred = await add_credential(
        database,
        secret_box,
        sim.token_url,
        refresh_token=sim.issue_refresh_token(CLIENT_ID),
        auth_method=method,
    )
    await manager(database, secret_box, http, clock).get(cred.id)
    (request,) = sim.token_requests
    assert (request.auth_method, request.client_id, request.status) == (method, CLIENT_ID, 200)


async def test_operator_update_during_a_refresh_is_not_overwritten(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    old = sim.issue_refresh_token(CLIENT_ID)
    operators = sim.issue_refresh_token(CLIENT_ID)
    cred = await add_credential(database, secret_box, sim.token_url, refresh_token=old)
    updated = False

    async def operator_acts(grant_type: str) -> None:
        nonlocal updated
        if not updated:
            updated = True
            await operator_sets_refresh_token(database, secret_box, cred.id, operators)

    sim.token_hook = operator_acts
    token = await manager(database, secret_box, http, clock).get(cred.id)
    row = await read_credential(database, cred.id)
    assert secret_box.decrypt_opt(row.refresh_token_enc) == operators
    assert secret_box.decrypt_opt(row.access_token_enc) == token.access_token
    assert row.version == token.version == 3  # 1, operator 2, our save 3
    assert sim.token_counts == {"refresh_token": 2}  # the first answer was not stored; redone


async def test_invalid_grant_during_an_operator_update_does_not_park_the_new_token(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    old = sim.issue_refresh_token(CLIENT_ID)
    operators = sim.issue_refresh_token(CLIENT_ID)
    cred = await add_credential(database, secret_box, sim.token_url, refresh_token=old)
    updated = False

    async def operator_acts(grant_type: str) -> None:
        nonlocal updated
        if not updated:
            updated = True
            sim.revoke_refresh_token(old)
            await operator_sets_refresh_token(database, secret_box, cred.id, operators)

    sim.token_hook = operator_acts
    token = await manager(database, secret_box, http, clock).get(cred.id)
    assert await crm_status(http, sim, token.access_token) == 201
    row = await read_credential(database, cred.id)
    assert row.state == "active"
    assert secret_box.decrypt_opt(row.refresh_token_enc) == operators


@pytest.mark.parametrize(
    ("failure", "retryable"),
    [
        (Failure.http(503), True),
        (Failure.http(500), True),
        (Failure.retry_after(30), True),
        (Failure.http(400, b'{"error":"invalid_request"}'), False),  # OAuth: the request is wrong
        # No OAuth error code: not the authorization server refusing the grant (a firewall's page,
        # a proxy, a moved URL). Such a 403 for ten seconds was made permanent and killed every
        # delivery that needed a token meanwhile; they retry on the schedule now.
        (Failure.http(404, b"not found"), True),
        (Failure.http(403, b"<html>Access denied</html>"), True),
        (Failure.http(200, b"<html>maintenance</html>"), True),  # was an AssertionError
        (Failure.http(200, b'{"token_type":"Bearer"}'), False),  # no access_token
        (Failure.dropped(), True),
    ],
)
async def test_token_endpoint_failures(
    failure: Failure,
    retryable: bool,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    sim.token_failures.append(failure)
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock)
    with pytest.raises(TokenEndpointError) as info:
        await tokens.get(cred.id)
    assert info.value.retryable is retryable
    row = await read_credential(database, cred.id)
    assert (row.state, row.version) == ("active", 1)
    # The failure was transient: the next attempt succeeds.
    assert await crm_status(http, sim, (await tokens.get(cred.id)).access_token) == 201


async def test_unreachable_token_endpoint_is_retryable(
    database: Database, secret_box: SecretBox, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cred = await add_credential(
        database, secret_box, f"http://127.0.0.1:{port}/oauth2/token", refresh_token="rt-some-refresh-token"
    )
    with pytest.raises(TokenEndpointError) as info:
        await manager(database, secret_box, http, clock).get(cred.id)
    assert info.value.retryable
    assert (await read_credential(database, cred.id)).state == "active"


@pytest.mark.parametrize(
    "uri",
    ["http://127.0.0.1:99999/token", "http://crm..example.org/token", "http://" + "a" * 64 + ".example/t"],
)
async def test_a_stored_token_endpoint_no_client_can_send_to_is_a_permanent_error(
    database: Database, secret_box: SecretBox, clock: FakeClock, uri: str
) -> None:
    """Stored before the admin API refused such URIs: it was a ValueError or UnicodeError out of the
    HTTP client, an "internal error" of every delivery with a traceback on every attempt, retried
    through the whole schedule."""
    cred = await add_credential(database, secret_box, uri, refresh_token="rt-some-refresh-token")
    async with build_http_client(Settings(allow_private_targets=True)) as production_client:
        tokens = TokenManager(
            UserCredentialTokenStore(database, secret_box), production_client, clock, 60.0, allow_private=True
        )
        with pytest.raises(TokenEndpointError) as info:
            await tokens.get(cred.id)
    assert not info.value.retryable
    assert "cannot be used" in str(info.value)
    assert (await read_credential(database, cred.id)).state == "active"


async def test_token_endpoint_goes_through_the_outbound_guard(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, clock: FakeClock
) -> None:
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    async with build_http_client(Settings(allow_private_targets=False)) as guarded:
        tokens = TokenManager(UserCredentialTokenStore(database, secret_box), guarded, clock, 60.0)
        with pytest.raises(TokenEndpointError) as info:
            await tokens.get(cred.id)
    assert not info.value.retryable
    assert sim.token_counts == {}


async def test_cancelled_caller_does_not_lose_a_rotated_refresh_token(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    sim.rotate_refresh_tokens = True
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    answering = asyncio.Event()

    async def slow_answer(grant_type: str) -> None:
        answering.set()
        await asyncio.sleep(0.2)

    sim.token_hook = slow_answer
    tokens = manager(database, secret_box, http, clock)
    caller = asyncio.create_task(tokens.get(cred.id))
    await answering.wait()
    caller.cancel()  # e.g. shutdown while the token endpoint is answering
    with pytest.raises(asyncio.CancelledError):
        await caller
    await tokens.aclose()  # the refresh went on to its commit
    (rotated,) = sim.current_refresh_tokens(CLIENT_ID)
    assert secret_box.decrypt_opt((await read_credential(database, cred.id)).refresh_token_enc) == rotated


async def test_secrets_never_logged_nor_in_exception_texts(
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sim.rotate_refresh_tokens = True
    sim.expires_in = 120
    refresh = sim.issue_refresh_token(CLIENT_ID)
    device_code = sim.add_device_code(CLIENT_ID, pending=1)
    good = await add_credential(database, secret_box, sim.token_url, refresh_token=refresh, username="alice")
    dev = await add_credential(database, secret_box, sim.token_url, device_code=device_code, username="bob")
    dead = await add_credential(
        database, secret_box, sim.token_url, refresh_token="rt-dead-refresh-token-value", username="carol"
    )
    tokens = manager(database, secret_box, http, clock)
    seen: list[str] = []
    first = await tokens.get(good.id)
    seen.append(first.access_token)
    clock.advance(100)
    seen.append((await tokens.get(good.id)).access_token)
    seen.append((await tokens.refresh_after_401(good.id, seen[-1])).access_token)
    errors: list[BaseException] = []
    for key in (dev.id, dead.id):
        try:
            await tokens.get(key)
        except Exception as exc:
            errors.append(exc)
    clock.advance(5)
    seen.append((await tokens.get(dev.id)).access_token)
    sim.token_failures.append(Failure.http(503))
    clock.advance(7200)
    try:
        await tokens.get(good.id)
    except TokenEndpointError as exc:
        errors.append(exc)
    assert len(errors) == 3
    secrets = [CLIENT_SECRET, refresh, device_code, "rt-dead-refresh-token-value", *seen]
    secrets += sim.current_refresh_tokens(CLIENT_ID)
    texts = caplog.text + "\n".join(f"{e!s} {e!r}" for e in errors) + repr(first)
    assert "user credential" in caplog.text  # the log names the credential...
    for secret in secrets:
        assert secret not in texts  # ...never a secret


async def test_a_token_endpoint_quoting_the_refresh_token_in_its_error_code_shows_none_of_it(
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Some providers put what they were sent in ``error`` itself. The code keeps only safe
    characters (``_safe_code``), so the token shows there without its ``:``: masked all the same,
    in the log, in the error's text (lastError, the external call's 502) and in the park reason;
    the code still decides (an unknown code: permanent, an ``invalid_grant`` one: parked)."""
    caplog.set_level(logging.DEBUG)
    refresh = "rt:carol-" + "c9def7ad791b731336c3"
    cred = await add_credential(database, secret_box, sim.token_url, refresh_token=refresh)
    tokens = manager(database, secret_box, http, clock)
    sim.token_failures.append(
        Failure.http(400, json.dumps({"error": f"invalid_refresh_token:{refresh}"}).encode())
    )
    with pytest.raises(TokenEndpointError) as info:
        await tokens.get(cred.id)
    assert "(invalid_refresh_token***)" in str(info.value) and info.value.retryable is False
    stripped = refresh.replace(":", "")
    texts = caplog.text + str(info.value)
    assert "invalid_refresh_token***" in caplog.text
    assert not any(stripped[i : i + 8] in texts for i in range(len(stripped) - 7)), texts


async def test_a_failed_token_request_answers_for_the_next_ones_during_the_pause(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """The delivery worker's manager: in an outage of the token endpoint each delivery that came
    after a failure sent a request of its own (about 200 in 15 s for one credential). Within the
    pause the last failure answers; after it, or once the operator changes the credential, a new
    request is made. A token stored meanwhile (another replica's refresh) is used at once."""
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock, failure_pause=5.0)
    sim.token_failures.append(Failure.http(503))
    with pytest.raises(TokenEndpointError) as first:
        await tokens.get(cred.id)
    for _ in range(10):
        with pytest.raises(TokenEndpointError) as again:
            await tokens.get(cred.id)
        assert (str(again.value), again.value.retryable, again.value.status) == (str(first.value), True, 503)
    assert sim.token_counts == {"refresh_token": 1}
    clock.advance(5.0)
    assert (await tokens.get(cred.id)).access_token
    assert sim.token_counts == {"refresh_token": 2}

    # The operator's change (invalidate) ends the pause at once.
    sim.token_failures.append(Failure.http(503))
    with pytest.raises(TokenEndpointError):
        await tokens.refresh_after_401(cred.id, (await tokens.get(cred.id)).access_token)
    tokens.invalidate(cred.id)
    await database.run(lambda s: s.execute(update(UserCredentials).values(access_token_enc=None)))
    assert (await tokens.get(cred.id)).access_token
    assert sim.token_counts == {"refresh_token": 4}

    # Without a pause (the admin API's manager) every call asks again.
    plain = manager(database, secret_box, http, clock)
    plain.invalidate(cred.id)
    await database.run(lambda s: s.execute(update(UserCredentials).values(access_token_enc=None)))
    sim.token_failures.append(Failure.http(503))
    with pytest.raises(TokenEndpointError):
        await plain.get(cred.id)
    assert (await plain.get(cred.id)).access_token
    assert sim.token_counts == {"refresh_token": 6}


async def test_every_token_endpoint_call_is_reported(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    results: list[str] = []
    good = await add_credential(
        database,
        secret_box,
        sim.token_url,
        refresh_token=sim.issue_refresh_token(CLIENT_ID),
        username="alice",
    )
    dead = await add_credential(
        database, secret_box, sim.token_url, refresh_token="rt-revoked", username="bob"
    )
    tokens = manager(database, secret_box, http, clock, on_refresh=results.append)
    sim.token_failures.append(Failure.http(503))
    with pytest.raises(TokenEndpointError):
        await tokens.get(good.id)
    await tokens.get(good.id)
    with pytest.raises(ReauthRequired):
        await tokens.get(dead.id)
    assert results == ["error", "ok", "reauth_required"]
    assert tokens.refreshes == 3


async def test_two_replicas_refreshing_one_rotating_credential_make_one_token_request(
    replicas: tuple[Database, Database],
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    """PostgreSQL replicas deliver for the same user and both find its token expiring. Each refresh
    with the same rotating refresh token: the second gets invalid_grant, and if its 'reauth required'
    committed before the first one's new tokens, the credential was parked and the freshly rotated
    refresh token thrown away (a dead grant out of a healthy one, at a token expiry)."""
    replica_a, replica_b = replicas
    sim.rotate_refresh_tokens = True
    cred = await add_credential(
        replica_a,
        secret_box,
        sim.token_url,
        refresh_token=sim.issue_refresh_token(CLIENT_ID),
        access_token="expiring-access-token",
        expires_at=clock.now() + timedelta(seconds=10),
    )
    second_arrived = asyncio.Event()

    async def hold_the_first(grant_type: str) -> None:
        # The first refresh waits (up to a second) for a second one to reach the endpoint: two
        # replicas refreshing at once. With the refresh serialised there is none to wait for.
        if sim.token_counts[grant_type] == 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second_arrived.wait(), 1.0)
        else:
            second_arrived.set()

    sim.token_hook = hold_the_first
    a = manager(replica_a, secret_box, http, clock)
    b = manager(replica_b, secret_box, http, clock)
    got_a, got_b = await asyncio.gather(a.get(cred.id), b.get(cred.id))
    assert sim.token_counts == {"refresh_token": 1}
    assert got_a.access_token == got_b.access_token != "expiring-access-token"
    row = await read_credential(replica_a, cred.id)
    assert row.state == "active"
    (current,) = sim.current_refresh_tokens(CLIENT_ID)
    assert secret_box.decrypt_opt(row.refresh_token_enc) == current


async def test_a_cached_token_is_dropped_once_another_replica_changed_its_credential(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Two token managers over one database, as two replicas have. The operator gives the user a
    new grant through replica a's admin API (its own ``invalidate`` is a's alone): replica b keeps
    the old grant's access token cached until ``drop_changed`` (its follow pass) reads the new
    version; then its next token comes from the new refresh token."""
    first_refresh_token = sim.issue_refresh_token(CLIENT_ID)
    cred = await add_credential(database, secret_box, sim.token_url, refresh_token=first_refresh_token)
    a = manager(database, secret_box, http, clock)
    b = manager(database, secret_box, http, clock)
    old = await b.get(cred.id)
    assert await b.drop_changed() == []  # its own refresh saved the stored version
    assert (await a.get(cred.id)).access_token == old.access_token  # read from the store
    assert await a.drop_changed() == []
    assert sim.token_counts == {"refresh_token": 1}

    new_refresh_token = sim.issue_refresh_token(CLIENT_ID)
    sim.revoke_refresh_token(first_refresh_token)  # the old grant is gone at the CRM

    def operator_update(s: Session) -> None:
        assert update_secret(s, secret_box, cred.id, "refreshtoken", new_refresh_token, now=clock.now())

    await database.run(operator_update)
    a.invalidate(cred.id)  # what a's own admin API does (DaemonSupervisor.credentials_changed)
    assert b.peek(cred.id) == old  # b has not heard of it: it would still send the old grant's token
    assert await b.drop_changed() == [cred.id]
    assert b.peek(cred.id) is None
    new = await b.get(cred.id)
    assert new.access_token != old.access_token
    # With the first refresh token (revoked) this would have been invalid_grant: ReauthRequired.
    assert sim.token_counts == {"refresh_token": 2}
    assert (await read_credential(database, cred.id)).state == "active"
    assert await b.drop_changed() == []

    # The user is deleted through a: b forgets its token as well.
    await database.run(lambda s: delete_credential(s, cred.id, now=utcnow()))
    assert await b.drop_changed() == [cred.id]
    assert b.peek(cred.id) is None


async def test_a_replicas_token_save_during_an_operator_update_waits_and_loses(
    replicas: tuple[Database, Database],
    secret_box: SecretBox,
    sim: CrmSimulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator sets a new refresh token through replica a while replica b saves tokens of the
    old grant (its refresh, begun at version 1). Both wrote version 2: b's cached old-grant token
    looked current to ``drop_changed``, and the old access token stayed stored. The update now reads
    the credential locked, so b's compare-and-set save waits for it and then fails (the manager
    reloads and refreshes with the new grant)."""
    replica_a, replica_b = replicas
    cred = await add_credential(replica_a, secret_box, sim.token_url, refresh_token="rt-old")
    await read_credential(replica_b, cred.id)  # b's pool has a connection: its save is quick
    real_row = integrations._credential_row
    saved: dict[str, object] = {}

    def b_saves_the_old_grant() -> None:
        store = UserCredentialTokenStore(replica_b, secret_box)
        saved["version"] = asyncio.run(
            store.save_tokens(
                cred.id, 1, access_token="at-old-grant", expires_at=None, refresh_token="rt-old",
                extra={}, device_code_used=False,
            )
        )  # fmt: skip
        saved["during_the_update"] = not committed.is_set()

    committed = threading.Event()
    saver = threading.Thread(target=b_saves_the_old_grant)

    def read_then_b_saves(session: Session, credential_id: int, **kw: bool) -> object:
        found = real_row(session, credential_id, **kw)  # the operator's transaction has read it
        saver.start()
        saver.join(2.0)  # without the lock, b's save is done by now
        return found

    monkeypatch.setattr(integrations, "_credential_row", read_then_b_saves)

    def operator_update(s: Session) -> None:
        assert update_secret(s, secret_box, cred.id, "refreshtoken", "rt-new", now=utcnow()) is not None

    with Session(replica_a.engine) as session:
        operator_update(session)
        committed.set()
        session.commit()
    saver.join(10)
    assert saved == {"version": None, "during_the_update": False}
    row = await read_credential(replica_a, cred.id)
    assert row.version == 2
    assert secret_box.decrypt_opt(row.refresh_token_enc) == "rt-new"
    assert row.access_token_enc is None


async def test_a_token_request_in_flight_for_a_deleted_credential_serves_nothing_of_its_id_afterwards(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Tenant A's user's token request is in flight when the user is deleted; SQLite gives the id
    to tenant B's next user. B's first ``get`` joined A's request and got, and cached, A's token,
    and A's request could save A's grant into B's row, at the same version (a review's finding).
    After ``forget`` the old request hands nothing to the id's new credential and saves nothing."""
    a_user = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock)
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(grant_type: str) -> None:
        entered.set()
        await release.wait()

    sim.token_hook = held
    issued: list[str] = []
    issue = sim.issue_access_token

    def recording(*args: object, **kwargs: object) -> str:
        token = issue(*args, **kwargs)  # type: ignore[arg-type]
        issued.append(token)
        return token

    sim.issue_access_token = recording  # type: ignore[method-assign]
    a_waiting = asyncio.create_task(tokens.get(a_user.id))
    await asyncio.wait_for(entered.wait(), 5)
    # The operator deletes A's user (DaemonSupervisor.credentials_deleted forgets it), and B's
    # user is created with the same id (SQLite: max(id) + 1).
    await database.run(lambda s: delete_credential(s, a_user.id, now=utcnow()))
    tokens.forget(a_user.id)  # what DaemonSupervisor.credentials_deleted does
    b_refresh = sim.issue_refresh_token(CLIENT_ID)
    b_user = await add_credential(
        database, secret_box, sim.token_url, refresh_token=b_refresh, username="bob"
    )
    sim.token_hook = None
    b_token = asyncio.create_task(tokens.get(b_user.id))
    await asyncio.sleep(0.05)
    release.set()
    a_result = await asyncio.gather(a_waiting, return_exceptions=True)
    b = await asyncio.wait_for(b_token, 5)
    assert isinstance(a_result[0], TokenEndpointError)  # A's callers: retry later, find no credential
    if b_user.id == a_user.id:  # SQLite reused the id: what made the old request reachable
        assert sim.token_counts["refresh_token"] == 2  # B got a token of its own grant
    stored = await read_credential(database, b_user.id)
    assert secret_box.decrypt_opt(stored.access_token_enc) == b.access_token
    assert tokens.peek(b_user.id) == b
    # Two grants were made, one each; B's stored and cached token is its own, not overwritten by
    # A's request finishing after it.
    assert len(issued) == 2 and b.access_token in issued


async def test_deleted_credentials_leave_no_count_behind_once_no_request_is_in_flight(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """``forget`` kept a count per credential ever deleted, for the process's life (a year of
    provisioning scripts deleting users: 8 MB per 100,000). The count only matters to a token
    request that began before the delete; it stands while that request runs, and goes after."""
    tokens = manager(database, secret_box, http, clock)
    for key in range(1, 5001):
        tokens.forget(key)  # nothing in flight: nothing to keep
    assert tokens._generation == {}

    user = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(grant_type: str) -> None:
        entered.set()
        await release.wait()

    sim.token_hook = held
    waiting = asyncio.create_task(tokens.get(user.id))
    await asyncio.wait_for(entered.wait(), 5)
    await database.run(lambda s: delete_credential(s, user.id, now=utcnow()))
    tokens.forget(user.id)
    assert tokens._generation == {user.id: 1}  # the request in flight must see the delete
    # A second caller meanwhile starts a request of its own, which ends first (the credential is
    # gone): its end must not drop the count while the first request still runs (a second
    # reading's finding about this cleanup's first version, which looked at ``_inflight``).
    second = await asyncio.gather(tokens.get(user.id), return_exceptions=True)
    assert isinstance(second[0], Exception)
    await asyncio.sleep(0)
    assert tokens._generation == {user.id: 1}
    release.set()
    (result,) = await asyncio.gather(waiting, return_exceptions=True)
    assert isinstance(result, TokenEndpointError)
    await asyncio.sleep(0)  # the request's done-callback
    assert tokens._generation == {} and tokens._running == {}
    assert tokens.peek(user.id) is None


# --- providers' own answers (a review of the token handling against each CRM's documentation) ---


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # Microsoft Entra ID (Dynamics 365): a refresh that now needs multi-factor sign-in (AADSTS50076)
        # or meets a conditional access policy; OpenID Connect's other two of the kind.
        (b'{"error":"interaction_required","error_description":"AADSTS50076: ..."}', "interaction_required"),
        (b'{"error":"consent_required"}', "consent_required"),
        (b'{"error":"login_required"}', "login_required"),
        # HubSpot: a refresh token revoked (the app uninstalled), answered without an "error" field.
        (b'{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}', "BAD_REFRESH_TOKEN"),
    ],
)
async def test_providers_dead_grants_park_instead_of_killing_deliveries(
    body: bytes,
    reason: str,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    """These answers were a permanent request error (Entra's) or a passing proxy fault (HubSpot's):
    every delivery of the user went dead, or retried for ten hours and then went dead, while the
    credential stayed active and the re-authorisation gauge said nothing."""
    sim.token_failures.append(Failure.http(400, body))
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    with pytest.raises(ReauthRequired) as info:
        await manager(database, secret_box, http, clock).get(cred.id)
    assert reason in info.value.reason
    assert (await read_credential(database, cred.id)).state == "reauth_required"
    assert sum(sim.token_counts.values()) == 1


@pytest.mark.parametrize("error", ["authorization_declined", "bad_verification_code"])
async def test_entra_device_flow_endings_park(
    error: str,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    """Microsoft's device flow ends the polling with these two as well as RFC 8628's."""
    sim.token_failures.append(Failure.http(400, f'{{"error":"{error}"}}'.encode()))
    cred = await add_credential(database, secret_box, sim.token_url, device_code="device-code-1")
    with pytest.raises(ReauthRequired) as info:
        await manager(database, secret_box, http, clock).get(cred.id)
    assert error in info.value.reason
    assert (await read_credential(database, cred.id)).state == "reauth_required"


@pytest.mark.parametrize(
    ("failure", "pause"),
    [
        # Zoho's answer once a refresh token made ten access tokens in ten minutes.
        (
            Failure.http(
                400,
                b'{"error_description":"You have made too many requests continuously. Please try again '
                b'after some time.","error":"Access Denied","status":"failure"}',
            ),
            60.0,
        ),
        (Failure.retry_after(120), 120.0),  # a 429 that says how long
        (
            Failure(status=400, headers={"Retry-After": "90"}, body=b'{"error":"temporarily_unavailable"}'),
            90.0,
        ),
    ],
)
async def test_a_throttled_token_endpoint_is_waited_out(
    failure: Failure,
    pause: float,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    """Zoho's throttle and Entra's temporarily_unavailable were permanent (every delivery of the
    user in the window went dead), and a 429's Retry-After was ignored: a request every 5 s
    prolonged the throttling. The credential's token requests now wait for the pause, and the
    error carries it for the delivery's retry."""
    sim.token_failures.append(failure)
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock, failure_pause=5.0)
    with pytest.raises(TokenEndpointError) as first:
        await tokens.get(cred.id)
    assert first.value.retryable and first.value.retry_after == pause
    clock.advance(pause - 1)
    with pytest.raises(TokenEndpointError) as again:
        await tokens.get(cred.id)
    assert again.value.retryable and again.value.retry_after == pytest.approx(1.0)
    assert sim.token_counts == {"refresh_token": 1}  # nothing asked during the pause
    clock.advance(1)
    assert (await tokens.get(cred.id)).access_token
    assert sim.token_counts == {"refresh_token": 2}
    assert (await read_credential(database, cred.id)).state == "active"


async def test_a_short_lived_token_is_refreshed_after_half_its_life_not_on_every_use(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """A 60 s token met the 60 s margin the moment it arrived: every delivery asked for a new one."""
    sim.expires_in = 60
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock)
    first = await tokens.get(cred.id)
    for _ in range(5):
        assert (await tokens.get(cred.id)).access_token == first.access_token
    clock.advance(29)
    assert tokens.peek(cred.id) == first
    assert sim.token_counts == {"refresh_token": 1}
    clock.advance(2)  # past half its life: refreshed while still valid
    assert tokens.peek(cred.id) is None
    assert (await tokens.get(cred.id)).access_token != first.access_token
    assert sim.token_counts == {"refresh_token": 2}


@pytest.mark.parametrize("grant", ["refresh_token", "device_code"])
async def test_a_crm_contexts_token_request_parameters_go_with_every_token_request(
    grant: str,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    """Entra ID's v2 endpoint refuses a refresh without ``scope`` (Dynamics 365); its v1 endpoint
    may want ``resource``. Neither could be sent. The grant's own parameters stay the grant's."""
    scope = "https://acme.crm4.dynamics.com/.default offline_access"
    params = json.dumps(
        {"scope": scope, "resource": "https://acme.crm4.dynamics.com", "grant_type": "password"}
    )
    if grant == "refresh_token":
        cred = await add_credential(
            database,
            secret_box,
            sim.token_url,
            refresh_token=sim.issue_refresh_token(CLIENT_ID),
            token_parameters=params,
        )
    else:
        code = sim.add_device_code(CLIENT_ID)  # approved already
        cred = await add_credential(
            database, secret_box, sim.token_url, device_code=code, token_parameters=params
        )
    token = await manager(database, secret_box, http, clock).get(cred.id)
    assert await crm_status(http, sim, token.access_token) == 201
    [request] = sim.token_requests
    assert request.grant_type == ("refresh_token" if grant == "refresh_token" else DEVICE_CODE_GRANT)
    assert request.params == {"scope": scope, "resource": "https://acme.crm4.dynamics.com"}


async def test_approved_device_codes_become_refresh_tokens_without_a_call(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """The device code was polled only when a delivery needed a token: a user who approved and
    made no call within the code's life (15 minutes at Entra ID) met ``expired_token`` at the first
    call, parked, the device flow to be done again. The poller asks for every credential waiting on
    one, at the server's interval, and leaves the others alone."""
    waiting = await add_credential(
        database,
        secret_box,
        sim.token_url,
        device_code=sim.add_device_code(CLIENT_ID, pending=1),
        username="wes",
    )
    await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID), username="rita"
    )
    parked = await add_credential(
        database, secret_box, sim.token_url, device_code=sim.add_device_code(CLIENT_ID), username="pat"
    )
    await database.run(
        lambda s: s.execute(
            update(UserCredentials).where(UserCredentials.id == parked.id).values(state="reauth_required")
        )
    )
    poller = DeviceCodePoller(database, manager(database, secret_box, http, clock))

    assert await poller.poll_once() == 0  # authorization_pending
    assert sim.token_counts == {DEVICE_CODE_GRANT: 1}
    assert await poller.poll_once() == 0  # within the interval: not asked again
    assert sim.token_counts == {DEVICE_CODE_GRANT: 1}
    clock.advance(5)
    assert await poller.poll_once() == 1
    row = await read_credential(database, waiting.id)
    assert row.refresh_token_enc is not None and row.device_code_enc is None
    assert await poller.poll_once() == 0  # nobody waits any more
    assert sim.token_counts == {DEVICE_CODE_GRANT: 2}  # never for rita (a refresh token) nor pat (parked)


async def test_the_device_code_poller_runs_until_stopped(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    cred = await add_credential(
        database, secret_box, sim.token_url, device_code=sim.add_device_code(CLIENT_ID)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        DeviceCodePoller(database, manager(database, secret_box, http, clock), 0.05).run(stop)
    )
    for _ in range(100):
        if (await read_credential(database, cred.id)).refresh_token_enc is not None:
            break
        await asyncio.sleep(0.05)
    assert (await read_credential(database, cred.id)).refresh_token_enc is not None
    stop.set()
    await asyncio.wait_for(task, 2)


@pytest.mark.parametrize("status", [{"code": 200}, ["ok"]])
async def test_a_token_answer_with_a_status_object_is_read_as_any_other(
    status: object,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    """HubSpot's ``status`` is a string; another provider's may be an object, which the check for
    HubSpot's codes could not hash: a TypeError after the endpoint answered and before the save,
    losing a rotated refresh token (a review's finding)."""
    sim.rotate_refresh_tokens = True
    sim.extra_fields = {"status": status}
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock)
    assert (await tokens.get(cred.id)).access_token
    (rotated,) = sim.current_refresh_tokens(CLIENT_ID)
    assert secret_box.decrypt_opt((await read_credential(database, cred.id)).refresh_token_enc) == rotated
    sim.token_failures.append(Failure.http(503, b'{"status": {"code": 503, "message": "maintenance"}}'))
    tokens.invalidate(cred.id)
    await database.run(lambda s: s.execute(update(UserCredentials).values(access_token_enc=None)))
    with pytest.raises(TokenEndpointError) as info:
        await tokens.get(cred.id)
    assert info.value.retryable


async def test_a_short_lived_stored_token_serves_every_manager_until_half_its_life(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Another replica, a restart or a dropped cache read the stored token with the full margin:
    a 60 s token was never fresh there, and each of them asked for a new one (a review's finding)."""
    sim.expires_in = 60
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    replica_a, replica_b = (
        manager(database, secret_box, http, clock),
        manager(database, secret_box, http, clock),
    )
    first = await replica_a.get(cred.id)
    clock.advance(1)
    assert (await replica_b.get(cred.id)).access_token == first.access_token
    replica_a.invalidate(cred.id)
    assert (await replica_a.get(cred.id)).access_token == first.access_token
    assert sim.token_counts == {"refresh_token": 1}
    clock.advance(30)  # past half its life: refreshed, once
    assert (await replica_b.get(cred.id)).access_token != first.access_token
    assert sim.token_counts == {"refresh_token": 2}


async def test_the_device_code_poller_backs_off_after_failures_and_polls_only_its_own(
    database: Database, secret_box: SecretBox, sim: CrmSimulator, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """A request the endpoint refuses for good (a parameter Entra ID does not take) left the
    credential active, asked every 5 s for ever with a warning each time; each PostgreSQL replica
    polled every code at its own interval (a review's findings). Failures double the pause, up to
    5 minutes; a new device code starts afresh; a replica polls only the integrations it owns."""
    for _ in range(50):
        sim.token_failures.append(Failure.http(400, b'{"error":"invalid_request"}'))
    cred = await add_credential(
        database, secret_box, sim.token_url, device_code=sim.add_device_code(CLIENT_ID)
    )
    tokens = manager(database, secret_box, http, clock)
    poller = DeviceCodePoller(database, tokens, clock=clock.monotonic)
    for _ in range(12):  # a minute of 5 s rounds
        await poller.poll_once()
        clock.advance(5)
    # Asked at 0, 5 (pause 5), 15 (10), 35 (20); next at 75.
    assert sim.token_counts == {DEVICE_CODE_GRANT: 4}
    for _ in range(60):  # five more minutes: the pause stops growing at 300 s
        await poller.poll_once()
        clock.advance(5)
    assert sim.token_counts == {DEVICE_CODE_GRANT: 7}  # at 75, 155 and 315; then every 300 s
    # A new device code (a new version of the credential) is asked for at the next round.
    sim.token_failures.clear()
    await operator_sets_device_code(database, secret_box, cred.id, sim.add_device_code(CLIENT_ID))
    tokens.invalidate(cred.id)
    assert await poller.poll_once() == 1

    other = await add_credential(
        database, secret_box, sim.token_url, device_code=sim.add_device_code(CLIENT_ID), username="otto"
    )
    standby = DeviceCodePoller(database, tokens, owned=lambda _x: False, clock=clock.monotonic)
    assert await standby.poll_once() == 0
    assert sim.token_counts == {DEVICE_CODE_GRANT: 8}  # the new code's one request, none for otto
    assert await DeviceCodePoller(database, tokens, clock=clock.monotonic).poll_once() == 1
    assert (await read_credential(database, other.id)).refresh_token_enc is not None


@pytest.mark.parametrize("expires_in", [1e20, "inf", "1e300", 10**30])
async def test_a_lifetime_beyond_the_calendar_is_read_as_ten_years_not_an_error(
    expires_in: object,
    database: Database,
    secret_box: SecretBox,
    sim: CrmSimulator,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    """An ``expires_in`` past year 9999 overflowed the date arithmetic after the endpoint had
    answered and before the save: the rotated refresh token was lost (a review's finding)."""
    sim.rotate_refresh_tokens = True
    sim.extra_fields = {"expires_in": expires_in}
    cred = await add_credential(
        database, secret_box, sim.token_url, refresh_token=sim.issue_refresh_token(CLIENT_ID)
    )
    token = await manager(database, secret_box, http, clock).get(cred.id)
    assert token.expires_at == clock.now() + timedelta(days=3650)
    (rotated,) = sim.current_refresh_tokens(CLIENT_ID)
    assert secret_box.decrypt_opt((await read_credential(database, cred.id)).refresh_token_enc) == rotated
