"""The Xelion REST session and directory against the simulator (xelion-protocol.md §1-§2)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import httpx
import pytest
from xelion_helpers import (
    ADMIN_PASSWORD,
    RecordingHooks,
    client,
    config_for,
    fast_options,
    hooks,
    sim,
    wait_for,
)

from cti_bridge.logs import redact
from cti_bridge.ports import SourceState, XelionCheckError, XelionTarget
from cti_bridge.sim.xelion import XelionSimulator
from cti_bridge.xelion.directory import HttpXelionDirectory
from cti_bridge.xelion.rest import XelionApiError, XelionSession, XelionUnreachable
from cti_bridge.xelion.source import SourceManager
from tests.integration.oauth_helpers import FakeClock

__all__ = ["client", "hooks", "sim"]  # fixtures


def admin_session(
    sim: XelionSimulator, client: httpx.AsyncClient, user_space: str = "cti-bridge-1", **kwargs: object
) -> XelionSession:
    return XelionSession(client, sim.target("master"), "admin", ADMIN_PASSWORD, user_space, **kwargs)  # type: ignore[arg-type]


async def test_login_gives_a_session_in_the_fixed_user_space(
    sim: XelionSimulator, client: httpx.AsyncClient
) -> None:
    saved: list[str | None] = []

    async def on_token(token: str | None) -> None:
        saved.append(token)

    session = admin_session(sim, client, on_token=on_token)
    await session.login()
    assert session.logged_in
    assert sim.stats.logins == 1
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1}
    assert saved == [session.token]
    info = await session.me_info()
    assert info["userName"] == "admin"


async def test_wrong_password_is_a_credentials_error(sim: XelionSimulator, client: httpx.AsyncClient) -> None:
    session = XelionSession(client, sim.target("master"), "admin", "wrong", "cti-bridge-1")
    with pytest.raises(XelionApiError) as caught:
        await session.login()
    assert (caught.value.kind, caught.value.status, caught.value.error_code) == ("credentials", 401, 10004)
    assert caught.value.permanent
    assert sim.stats.login_attempts == 1


async def test_disabled_account_is_permanent(sim: XelionSimulator, client: httpx.AsyncClient) -> None:
    sim.add_user("master", "gone", "gone-password", admin=True, active=False)
    session = XelionSession(client, sim.target("master"), "gone", "gone-password", "cti-bridge-1")
    with pytest.raises(XelionApiError) as caught:
        await session.login()
    assert (caught.value.kind, caught.value.error_code, caught.value.permanent) == ("disabled", 10006, True)


async def test_the_log_lines_of_a_login_name_the_host_after_redaction(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The redaction of a bare "xelion <token>" took "Xelion <host>/<tenant>" for one: every line
    of every integration read "logged in to Xelion ***" and could not be told apart."""
    async with XelionSimulator() as sim:
        sim.add_user("master", "admin", ADMIN_PASSWORD, admin=True)
        session = admin_session(sim, client)
        with caplog.at_level(logging.INFO, logger="cti_bridge.xelion"):
            await session.login()
            await session.logout()
    lines = [redact(r.getMessage()) for r in caplog.records if r.name.startswith("cti_bridge.xelion")]
    host = sim.target("master").host
    assert f"logged in to Xelion at {host}/master" in lines, lines
    assert f"logged out of Xelion at {host}/master" in lines, lines


async def test_unreachable_server() -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        # Port 1 on loopback: nothing listens, the connection is refused at once.
        session = XelionSession(
            http, XelionTarget("http", "127.0.0.1:1", "master"), "admin", "pw", "cti-bridge-1", timeout=2
        )
        with pytest.raises(XelionUnreachable) as caught:
            await session.login()
    assert caught.value.kind == "unreachable"


@pytest.mark.parametrize("host", ["[1:2]", "pbx..example.com", "127.0.0.1:99999"])
async def test_a_stored_host_no_client_can_reach_is_unreachable_not_a_crash(host: str) -> None:
    """Stored before the admin API refused such hosts: httpx raised InvalidURL or a ValueError,
    which the source logged with a traceback on every reconnect and the admin API answered 500."""
    async with httpx.AsyncClient(trust_env=False) as http:
        session = XelionSession(
            http, XelionTarget("http", host, "master"), "admin", "pw", "cti-bridge-1", timeout=2
        )
        with pytest.raises(XelionUnreachable) as caught:
            await session.login()
    assert caught.value.kind == "unreachable"


async def test_renews_before_expiry_with_the_rotating_renewal_token(client: httpx.AsyncClient) -> None:
    async with XelionSimulator(token_lifetime=3.0) as sim:
        sim.add_user("master", "admin", ADMIN_PASSWORD, admin=True)
        session = admin_session(sim, client)
        await session.login()
        first = session.token
        keeper = asyncio.create_task(session.keep_alive(retry_delay=0.2))
        try:
            started = time.monotonic()
            # The second renewal can only succeed with the rotated renewal token of the first. Wait
            # until the client holds the token that renewal issued: the simulator counts a renewal
            # before its answer reaches the client, and a request sent with the replaced token in
            # between would need a re-login (on a loaded machine it did).
            await wait_for(
                lambda: sim.stats.renews >= 2 and sim.session_is_live(session.token),
                timeout=6.0,
                what="two renewals, the second one's token held by the client",
            )
            # Go past the first token's lifetime: only the renewals keep the session alive.
            await asyncio.sleep(max(0.0, 3.3 - (time.monotonic() - started)))
            assert sim.stats.logins == 1
            assert session.token != first
            assert (await session.me_info())["userName"] == "admin"
            assert sim.stats.logins == 1  # me_info did not need a re-login
        finally:
            keeper.cancel()


async def test_relogin_after_401(sim: XelionSimulator, client: httpx.AsyncClient) -> None:
    session = admin_session(sim, client)
    await session.login()
    await sim.expire_all_sessions()
    info = await session.me_info()
    assert info["userName"] == "admin"
    assert sim.stats.logins == 2
    assert sim.active_sessions() == 1


async def test_renew_after_expiry_logs_in_again(sim: XelionSimulator, client: httpx.AsyncClient) -> None:
    session = admin_session(sim, client)
    await session.login()
    await sim.expire_all_sessions()
    await session.renew()
    assert sim.stats.logins == 2
    assert sim.stats.renews == 0
    assert (await session.me_info())["userName"] == "admin"


async def test_10005_stored_token_ends_the_old_session(
    sim: XelionSimulator, client: httpx.AsyncClient
) -> None:
    crashed = admin_session(sim, client)
    await crashed.login()  # a previous run that died without logging out
    old_token = crashed.token
    session = admin_session(sim, client, stored_token=old_token)
    await session.login()
    assert session.active_user_space == "cti-bridge-1"
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1}
    # The old session is gone: its token no longer works.
    response = await client.get(
        sim.base_url("master") + "me/info", headers={"Authorization": f"xelion {old_token}"}
    )
    assert response.status_code == 401
    assert response.json()["errorCode"] == 10000


async def test_10005_without_token_tries_suffixes_then_fails_clearly(
    sim: XelionSimulator, client: httpx.AsyncClient
) -> None:
    holders = [admin_session(sim, client) for _ in range(6)]
    for holder in holders:
        await holder.login()
    assert [h.active_user_space for h in holders] == ["cti-bridge-1"] + [
        f"cti-bridge-1-{i}" for i in range(1, 6)
    ]
    attempts_before = sim.stats.login_attempts
    late = admin_session(sim, client)
    with pytest.raises(XelionApiError) as caught:
        await late.login()
    assert caught.value.kind == "already_logged_in"
    assert caught.value.error_code == 10005
    assert "cti-bridge-1" in caught.value.message
    assert sim.stats.login_attempts - attempts_before == 6  # base + five suffixes, no more


async def test_relogin_on_a_suffixed_space_stays_there(
    sim: XelionSimulator, client: httpx.AsyncClient
) -> None:
    other = admin_session(sim, client)
    await other.login()
    session = admin_session(sim, client)
    await session.login()
    assert session.active_user_space == "cti-bridge-1-1"
    await session.login()  # presents its own token on its own space: ends and replaces it
    assert session.active_user_space == "cti-bridge-1-1"
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1, "cti-bridge-1-1": 1}


async def test_logout(sim: XelionSimulator, client: httpx.AsyncClient) -> None:
    saved: list[str | None] = []

    async def on_token(token: str | None) -> None:
        saved.append(token)

    session = admin_session(sim, client, on_token=on_token)
    await session.login()
    await session.logout()
    assert not session.logged_in
    assert sim.stats.logouts == 1
    assert sim.active_sessions() == 0
    assert saved[-1] is None


async def test_users_lookup_and_paging(sim: XelionSimulator, client: httpx.AsyncClient) -> None:
    session = admin_session(sim, client)
    await session.login()
    anne = sim.tenants["master"].users["anne"]
    found = await session.find_users("anne", page_size=1)
    assert [(u.oid, u.user_name, u.common_name) for u in found] == [(anne.oid, "anne", "Anne Hunter")]
    assert await session.find_users("nobody") == []
    # The simulator pages with limit/after=nextId as §1 describes.
    seen: list[str] = []
    after: str | None = None
    while True:
        params = {"limit": "2", **({"after": after} if after else {})}
        body = (await session.request("GET", "users", params=params)).json()
        seen += [item["object"]["userName"] for item in body["data"]]
        after = body["meta"]["paging"].get("nextId")
        if not after:
            break
    assert sorted(seen) == ["admin", "anne", "bob", "carol"]


async def test_users_needs_an_admin(sim: XelionSimulator, client: httpx.AsyncClient) -> None:
    session = XelionSession(client, sim.target("master"), "anne", "anne-password", "x")
    with pytest.raises(XelionApiError) as caught:
        await session.find_users("bob")
    assert (caught.value.kind, caught.value.status, caught.value.error_code) == ("forbidden", 403, 10101)


async def test_directory_checks(sim: XelionSimulator, client: httpx.AsyncClient) -> None:
    directory = HttpXelionDirectory(client)
    target = sim.target("master")
    await directory.check_admin(target, "admin", ADMIN_PASSWORD)
    assert sim.stats.logins == 1 and sim.stats.logouts == 1
    assert sim.active_sessions() == 0
    with pytest.raises(XelionCheckError) as caught:
        await directory.check_admin(target, "admin", "wrong")
    assert caught.value.kind == "credentials"
    user = await directory.find_user(target, "admin", ADMIN_PASSWORD, "bob")
    assert user is not None and user.user_name == "bob" and user.oid == sim.tenants["master"].users["bob"].oid
    assert await directory.find_user(target, "admin", ADMIN_PASSWORD, "nobody") is None
    assert sim.active_sessions() == 0  # every check logged out
    # The check sessions use their own userSpaces, so they never collide with a source's session.
    anne = XelionSession(client, target, "anne", "anne-password", "webchat")
    await anne.login()
    assert anne.token is not None
    assert await directory.whoami(target, anne.token) == "anne"
    with pytest.raises(XelionCheckError) as caught:
        await directory.whoami(target, "not-a-token")
    assert caught.value.kind == "credentials"
    with pytest.raises(XelionCheckError) as caught:
        await directory.check_admin(XelionTarget("http", "127.0.0.1:1", "master"), "admin", "pw")
    assert caught.value.kind == "unreachable"


async def test_check_does_not_collide_with_the_source_session(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    manager = SourceManager(hooks, client, fast_options())
    await manager.start(config_for(sim))
    await wait_for(lambda: manager.status(1).state is SourceState.SUBSCRIBED, what="subscribed")
    await HttpXelionDirectory(client).check_admin(sim.target("master"), "admin", ADMIN_PASSWORD)
    assert manager.status(1).state is SourceState.SUBSCRIBED
    assert sim.stats.websocket_connects == 1
    await manager.stop_all()


async def test_secrets_never_logged(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    manager = SourceManager(hooks, client, fast_options())
    await manager.start(config_for(sim))
    await wait_for(lambda: manager.status(1).state is SourceState.SUBSCRIBED, what="subscribed")
    await sim.place_call("incoming", callee="anne")
    await wait_for(lambda: len(hooks.events) == 3, what="events")
    await sim.drop_all_sockets()  # a reconnect: a second URL, more log lines
    await wait_for(
        lambda: sim.stats.websocket_connects == 2 and manager.status(1).state is SourceState.SUBSCRIBED
    )
    await manager.stop_all()
    directory = HttpXelionDirectory(client)
    await directory.check_admin(sim.target("master"), "admin", ADMIN_PASSWORD)
    with pytest.raises(XelionCheckError):
        await directory.check_admin(sim.target("master"), "admin", "wrong-password-secret")

    tokens = [t for _, t in hooks.token_saves if t]
    assert tokens, "the source saved its session token"
    url_secrets = [url.rsplit("/", 1)[1] for url in sim.stats.issued_urls]
    assert len(url_secrets) == 2
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records, "something was logged"
    assert "127.0.0.1" in text  # the host is named ...
    for secret in [ADMIN_PASSWORD, "wrong-password-secret", *tokens, *url_secrets]:
        assert secret not in text  # ... the secrets never are


@pytest.mark.parametrize(
    ("valid_until", "expected_every"),
    [
        (None, 600.0),  # left out
        ("2026-11-24 11:08:51 UTC", 600.0),  # a shape no parser here reads
        ("2001-01-01 00:00:00", 60.0),  # in the past: the clocks differ
        ("changing", 600.0),  # unreadable, and different in every answer: still said once
    ],
)
async def test_a_valid_until_that_tells_nothing_renews_unhurried_and_says_so_once(
    valid_until: str | None, expected_every: float, caplog: pytest.LogCaptureFixture
) -> None:
    """keep_alive renews when nothing is due: with validUntil missing, unreadable or past, that was
    a renew, a token write and a warning every retry delay (5 s), or every second, for as long as
    the daemon ran (a protocol review's finding: 19 renews in a second with a 0.05 s delay). Such
    a session renews every 10 minutes (1 minute when validUntil is past) and says why once."""
    calls = {"login": 0, "renew": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        kind = "login" if request.url.path.endswith("me/login") else "renew"
        calls[kind] += 1
        n = sum(calls.values())
        body: dict[str, str] = {"authentication": f"token-{n}", "renewalToken": f"renewal-{n}"}
        if valid_until == "changing":
            body["validUntil"] = f"not a date ({n})"
        elif valid_until is not None:
            body["validUntil"] = valid_until
        return httpx.Response(200, json=body)

    saved: list[str | None] = []

    async def on_token(token: str | None) -> None:
        saved.append(token)

    caplog.set_level(logging.WARNING, logger="cti_bridge.xelion.rest")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
        target = XelionTarget(protocol="http", host="pbx.example", tenant="master")
        session = XelionSession(c, target, "admin", "pw", "cti-bridge-1", on_token=on_token)
        await session.login()
        delay = session.renew_delay()
        assert delay is not None and expected_every - 1 <= delay <= expected_every
        task = asyncio.create_task(session.keep_alive(retry_delay=0.05))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await session.renew()  # a renew answered the same way: the warning is not repeated
    assert calls == {"login": 1, "renew": 1} and len(saved) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"renewing the session every {expected_every:.0f} s" in warnings[0], (
        warnings
    )


async def test_a_crash_in_a_suffixed_user_space_does_not_take_another_suffix(
    sim: XelionSimulator, client: httpx.AsyncClient
) -> None:
    """Someone else holds the base userSpace; each run logs in on ``-1`` and dies without logging
    out, leaving its token stored. The stored token went only with the first try (the base), so
    each crash took one more suffix: after five, no login at all until sessions expired (a
    protocol review's finding). It goes with every try now, and ends our own old session on -1."""
    foreign = admin_session(sim, client)
    await foreign.login()
    stored: str | None = None
    spaces: list[str | None] = []
    for _ in range(7):
        run = admin_session(sim, client, stored_token=stored)
        await run.login()
        spaces.append(run.active_user_space)
        stored = run.token  # what save_session_token persisted; then the run is killed
    assert spaces == ["cti-bridge-1-1"] * 7
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1, "cti-bridge-1-1": 1}


@pytest.mark.parametrize(
    ("host_hour", "date_header", "expected", "skewed"),
    [
        (11, "Sun, 06 Dec 2026 12:00:00 GMT", 80.0, True),  # host an hour behind: Xelion's Date
        (11, None, 0.8 * 3700, False),  # no Date: this host's clock, as before
        (11, "not a date", 0.8 * 3700, False),
        (12, "Sat, 05 Dec 2026 12:00:00 GMT", 80.0, True),  # a proxy's Date a day behind: not later
        (13, "Sun, 06 Dec 2026 12:00:00 GMT", 80.0, True),  # host an hour ahead: not "in the past"
    ],
)
async def test_the_session_is_renewed_by_the_clock_that_says_it_ends_sooner(
    host_hour: int, date_header: str | None, expected: float, skewed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """validUntil is Xelion's time: a host whose clock is an hour behind measured 100 s of session
    against its own clock as an hour and 100 s, renewed long after Xelion had ended it, and every
    session ended in a gap (a clock-step review's finding). The answer's Date header says when the
    server answered; a proxy's own Date must not postpone the renewal either (a second reading's
    finding), so the sooner of the two ends counts. A difference over a minute is said once."""

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Date": date_header} if date_header else {}
        body = {"authentication": "token-1", "renewalToken": "renewal-1", "validUntil": "2026-12-06 12:01:40"}
        return httpx.Response(200, json=body, headers=headers)

    caplog.set_level(logging.WARNING, logger="cti_bridge.xelion.rest")
    host = FakeClock(datetime(2026, 12, 6, host_hour, 0, 0, tzinfo=UTC))
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
        target = XelionTarget(protocol="http", host="pbx.example", tenant="master")
        session = XelionSession(c, target, "admin", "pw", "cti-bridge-1", clock=host)
        await session.login()
        await session.renew()
        delay = session.renew_delay()
        assert delay is not None and abs(delay - expected) < 1.0, delay
    messages = [r.getMessage() for r in caplog.records]
    skew = [m for m in messages if "this host's clock" in m]
    assert len(skew) == (1 if skewed else 0), messages
    assert not [m for m in messages if "in the past" in m]


async def test_a_xelion_answer_quoting_the_login_request_shows_no_password() -> None:
    """Xelion's own messages are fixed texts, but a server or a proxy before it may quote the
    request it could not process; the error (its text is logged, stored as the source's error and
    answered by the admin API) masks the password in it, raw or as a JSON string holds it, and
    whole before the message is cut to 200 characters."""
    password = 'Xel"Pw-' + "fc353ccc06e90c65" * 12  # a quote: JSON escapes it; longer than 200

    def xelion(request: httpx.Request) -> httpx.Response:
        message = "could not process login request " + request.content.decode()
        return httpx.Response(500, json={"errorCode": 11000, "message": message})

    transport = httpx.MockTransport(xelion)
    async with httpx.AsyncClient(transport=transport) as mock:
        session = XelionSession(mock, XelionTarget("http", "127.0.0.1:9", "master"), "admin", password, "s-1")
        with pytest.raises(XelionApiError) as caught:
            await session.login()
    text = caught.value.message
    assert text.startswith("login: Xelion answered 500/11000 (could not process login request {")
    assert '"password": "***"' in text or '"password":"***"' in text, text
    assert not any(password[i : i + 8] in text for i in range(len(password) - 7)), text

    # A message that quotes the password cut short, as error texts do ("...").
    password = "Correct-Horse-Battery-Staple-0123456789"

    def cut_short(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"errorCode": 10004, "message": f'bad login ("{password[:18]}...")'})

    async with httpx.AsyncClient(transport=httpx.MockTransport(cut_short)) as mock:
        session = XelionSession(mock, XelionTarget("http", "127.0.0.1:9", "master"), "admin", password, "s-1")
        with pytest.raises(XelionApiError) as caught:
            await session.login()
    assert caught.value.message.endswith('(bad login ("***..."))'), caught.value.message
