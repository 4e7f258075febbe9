"""Values drawn from ``token`` stay secret when a mapping fails to render (el-templates.md §4,
reliability.md §14), end to end on SQLite and PostgreSQL.

A template error quotes the value it failed on: a URL that is not absolute (with the access token
percent-encoded in its query), a string that is not a number. The token here is Salesforce's shape:
an access token holding ``!`` (``%21`` in a URI, so its URI form is not the token itself), an
``instance_url`` unusable as a base URL, a long ``id_token`` and nested extra fields. Neither the
delivery's ``lastError``, nor its attempt records, nor the worker's log lines, nor the preview's
answer may show any of them, raw, percent-encoded or cut short; they still say which field failed.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable
from html import escape
from typing import Any
from urllib.parse import quote

import pytest

from cti_bridge.sim.crm import Failure
from tests.e2e.stack import Stack, running_stack

URL_ERROR = "newCallEvent: crmResourceUri: the URI must be an absolute http or https URL, not "
NUMBER_ERROR = "newCallEvent: crmResourcePayload/n: column {}: cannot coerce the string {} to a number"
#: What each stored mapping's render error reads, masked.
EXPECTED = [
    URL_ERROR + "'***?t=***'",  # the whole URL quoted: the token whole, percent-encoded
    URL_ERROR + "'***/services/apexrest/calls?token=***'",  # the URL cut at 80: the token cut short
    NUMBER_ERROR.format(18, "'***...'"),  # a string cut at 37 characters
    NUMBER_ERROR.format(32, "'***'"),  # a value in a list in a map
]


def _salesforce_token(st: Stack, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the CRM simulator answer tokens in Salesforce's shape; the extra values it returns."""
    issue = st.crm.issue_access_token

    def salesforce_access_token(client_id: str = "", expires_in: float | None = None) -> str:
        issue(client_id, expires_in)  # counted and tracked as the simulator's own
        token = "00D5g!AQ" + secrets.token_urlsafe(18)  # Salesforce's '!': '%21' in a URI
        st.crm.issued_tokens.append(token)
        return token

    monkeypatch.setattr(st.crm, "issue_access_token", salesforce_access_token)
    extras = {
        "instance_url": f"eu12-{secrets.token_hex(4)}.my.salesforce.com",  # no scheme
        "id_token": "eyJ" + ".".join(secrets.token_urlsafe(n) for n in (30, 60, 40)),
        "sfdc": {"community": {"keys": ["key-" + secrets.token_urlsafe(12)]}},
    }
    st.crm.extra_fields = extras
    return [extras["instance_url"], extras["id_token"], extras["sfdc"]["community"]["keys"][0]]


def _mappings(st: Stack) -> list[dict[str, Any]]:
    """Four mappings of one event, each failing to render on a value drawn from the token."""
    return [
        st.mapping("newCallEvent", crmResourceUri="${token.instance_url}?t=${token.accessToken}"),
        st.mapping(
            "newCallEvent",
            crmResourceUri="${token.instance_url}/services/apexrest/calls?token=${token.accessToken}",
        ),
        st.mapping("newCallEvent", payload={"n": "${token.id_token * 1}"}),
        st.mapping("newCallEvent", payload={"n": "${token.sfdc.community.keys[0] * 1}"}),
    ]


async def _dead_deliveries(st: Stack) -> list[dict[str, Any]]:
    await st.configure(users=("anne",), mappings=_mappings(st))
    await st.xelion.place_call("incoming", callee="anne")
    items = await st.wait_settled(4)
    assert [d["state"] for d in items] == ["dead"] * 4, items
    return items


def _leaks(texts: Iterable[str], secret_values: Iterable[str], piece: int = 8) -> set[str]:
    """Every ``piece`` characters of a secret, raw or percent-encoded, that one of ``texts`` holds."""
    text = "\n".join(texts)
    found: set[str] = set()
    for secret in secret_values:
        for form in {secret, quote(secret, safe="")}:
            pieces = {form[i : i + piece] for i in range(len(form) - piece + 1)}
            found |= {p for p in pieces if p in text}
    return found


async def test_a_render_error_never_shows_a_token_value(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    async with running_stack(db_url) as st:
        extras = _salesforce_token(st, monkeypatch)
        items = await _dead_deliveries(st)
        access_tokens = [t for t in st.crm.issued_tokens if t.startswith("00D5g!")]
        assert access_tokens
        assert quote(access_tokens[0], safe="") != access_tokens[0]

        answers = [(await st.api.get("/api/deliveries", params={"limit": 100})).text]
        details = [await st.delivery(d["id"]) for d in items]
        answers += [json.dumps(detail) for detail in details]
        logged = [r.getMessage() for r in caplog.records]
        assert len([line for line in logged if " dead: render: " in line]) == 4, logged
        secret_values = [*st.crm.issued_tokens, *extras]
        assert not _leaks(answers, secret_values), answers
        assert not _leaks(logged, secret_values), logged

        # The operator reads which field failed and how, never the value.
        assert sorted(d["lastError"] for d in items) == sorted("render: " + e for e in EXPECTED)
        for d, detail in zip(items, details, strict=True):
            assert [a["error"] for a in detail["attemptLog"]] == [d["lastError"]]


async def test_the_preview_masks_a_token_value_in_a_render_error(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_stack(db_url) as st:
        extras = _salesforce_token(st, monkeypatch)
        await _dead_deliveries(st)  # the token answer, extra fields and all, is now stored
        base = f"/api/crm-integrations/{st.xelion_context_id}/crm-contexts/{st.crm_context_id}"
        path = base + "/event-uri-mappings/preview"
        event = {"callId": "1732443153.1021", "calleeUser": "anne", "initiation": "incoming"}

        stored = await st.api.post(
            path, json={"xelionEvent": "newCallEvent", "event": event, "xelionUsername": "anne"}
        )
        condition = st.mapping("newCallEvent", condition="${token.id_token > 1}")
        adhoc = await st.api.post(path, json={"mapping": condition, "event": event, "xelionUsername": "anne"})
        assert not _leaks([stored.text, adhoc.text], extras), (stored.text, adhoc.text)

        # One answer per mapping, a failed one holding its error (several mappings are previewed
        # at once; one failing must not hide the others).
        assert stored.status_code == 200, stored.text
        assert sorted(r["error"] for r in stored.json()["requests"]) == sorted(EXPECTED)
        assert adhoc.status_code == 200, adhoc.text
        [shown] = adhoc.json()["requests"]
        # A condition never sees the token (evaluated when the event is stored, before any token):
        # it does not hold, and the preview says why; nothing of the token shows (checked above).
        assert shown["condition"] is False and "error" not in shown, shown
        assert any("conditions are evaluated when the event arrives" in w for w in shown["warnings"])


async def test_a_crm_answer_quoting_the_token_shows_none_of_it(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRM's error answer may quote the request back: its Authorization header, a URL with the
    token in it (percent-encoded, as a redirect page), a JSON string as PHP writes it (``\\/``), an
    HTML page. And a body is stored only to 4 KiB: a token that the cut goes through used to
    keep its first characters in both excerpts. None of it may show in the attempt record."""
    caplog.set_level(logging.INFO)
    access = "AT/" + secrets.token_urlsafe(18) + "+x!" + secrets.token_hex(4)  # '/', '+', '!' encode
    async with running_stack(db_url) as st:
        issue = st.crm.issue_access_token

        def fixed_access_token(client_id: str = "", expires_in: float | None = None) -> str:
            issue(client_id, expires_in)
            st.crm.issued_tokens.append(access)
            return access

        monkeypatch.setattr(st.crm, "issue_access_token", fixed_access_token)
        # The request body: the token starts 11 (compact JSON) or 8 (with spaces) bytes before 4 KiB.
        mapping = st.mapping("newCallEvent", payload={"pad": "x" * 4068, "tok": "${token.accessToken}"})
        quoted = [
            quote(access, safe=""),
            quote(access, safe="").replace("%2F", "%2f").replace("%2B", "%2b"),  # .NET's lower case
            quote(access),
            json.dumps(access)[1:-1].replace("/", "\\/"),
            escape(access),
        ]
        echo = " ".join(quoted).encode()
        echo += b" " + b"p" * (4096 - 12 - len(echo) - 14) + b" auth=Bearer " + access.encode()
        assert echo.index(access.encode(), 4000) == 4096 - 12  # 12 characters before the cut
        st.crm.script(Failure.http(400, echo))
        await st.configure(users=("anne",), mappings=[mapping])
        await st.xelion.place_call("incoming", callee="anne")
        [item] = await st.wait_settled(1)
        assert item["state"] == "dead" and item["lastError"] == "HTTP 400", item
        [attempt] = (await st.delivery(item["id"]))["attemptLog"]
        request, response = attempt["request"]["bodyExcerpt"], attempt["responseExcerpt"]
        assert request.startswith('{"pad"') and response.startswith("***")
        forms = [access, *quoted]
        assert not _leaks([request, response], forms), (request[-40:], response)
        assert not _leaks([r.getMessage() for r in caplog.records], forms)
