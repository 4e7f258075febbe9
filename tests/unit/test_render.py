"""Rendering mappings into requests: the manual's mappings, the output rules of el-templates.md §6,
limits, secrets, the preview and the ``cti-bridge render`` command."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cti_bridge.el import TemplateEvalError, TemplateSyntaxError
from cti_bridge.render import (
    CompiledMapping,
    MappingFileError,
    MappingSpec,
    RenderContext,
    RenderError,
    _quote_component,
    compile_mapping,
    context_names,
    mapping_spec_from_json,
    render_command,
    request_preview,
)

NOW = "2026-11-24 09:14:03"
HUNG_UP = {
    "callId": "1732443153.1021",
    "initiation": "incoming",
    "date": "2026-11-24 09:14:02",
    "callerPhoneNumber": "+31612345678",
    "calleePhoneNumber": "+31152511411",
    "callerUser": None,
    "calleeUser": "anne",
    "calleeFlowId": "f-77812",
    "duration": 89,
}


def ctx(event: dict[str, object] | None = None, **kw: object) -> RenderContext:
    return RenderContext(
        event=HUNG_UP if event is None else event,
        xelion_event=str(kw.pop("xelion_event", "callHungUpEvent")),
        now=NOW,
        **kw,  # type: ignore[arg-type]
    )


def spec(uri: str = "https://crm.example.org/calls", payload: object = None, **kw: object) -> MappingSpec:
    return MappingSpec(
        xelion_event=str(kw.pop("xelion_event", "callHungUpEvent")),
        crm_resource_uri=uri,
        crm_resource_payload=payload,
        **kw,  # type: ignore[arg-type]
    )


# -- the manual's mappings ------------------------------------------------------------------------------


def test_manual_new_call_event_mapping() -> None:
    # xelion-cti-server-api.txt, POST api/crm-integrations, eventUriMappings[0], after JSON decoding.
    mapping = json.loads(
        r"""{"xelionEvent": "newCallEvent",
             "crmResourceUri": "https://example.org/services/apexrest/Call",
             "crmResourcePayload": {
                 "initiation" : "${(initiation==\"outgoing\")?\"calldialed\":\"callreceived\"}",
                 "to" : "${calleePhoneNumber}", "callId" : "${callId}", "eventType" : "newCallEvent"}}"""
    )
    compiled = compile_mapping(mapping_spec_from_json(mapping))
    request = compiled.render(ctx(xelion_event="newCallEvent"))
    assert request.method == "POST"
    assert request.url == "https://example.org/services/apexrest/Call"
    assert request.headers == {"Content-Type": "application/json"}
    assert json.loads(request.body or b"") == {
        "initiation": "callreceived",
        "to": "+31152511411",
        "callId": "1732443153.1021",
        "eventType": "newCallEvent",
    }
    outgoing = compiled.render(ctx({**HUNG_UP, "initiation": "outgoing"}))
    assert json.loads(outgoing.body or b"")["initiation"] == "calldialed"


def test_manual_conditional_inside_the_uri() -> None:
    compiled = compile_mapping(
        spec(
            'https://example.org/services/apexrest/Call?initiation=${(initiation=="outgoing")?"calldialed":"callreceived"}',
            {"to": "${calleePhoneNumber}", "callId": "${callId}", "eventType": "callHungUpEvent"},
        )
    )
    assert compiled.render(ctx()).url == "https://example.org/services/apexrest/Call?initiation=callreceived"


def test_manual_zoho_uri_is_percent_encoded_and_has_no_body() -> None:
    # PUT event-uri-mappings example; crmResourcePayload null sends no body.
    uri = json.loads(
        r'"https://example.org/cti-server-stub/api/zoho/services/crm/v2/phonebridge/callhungup?callrefid=${callId}&fromnumber=${callerPhoneNumber}&tonumber=${calleePhoneNumber}&callstarttime=${date}&direction=${(initiation==\"outgoing\")?\"outbound\":\"inbound\"}&duration=30"'
    )
    request = compile_mapping(spec(uri, None)).render(ctx())
    assert request.url == (
        "https://example.org/cti-server-stub/api/zoho/services/crm/v2/phonebridge/callhungup"
        "?callrefid=1732443153.1021&fromnumber=%2B31612345678&tonumber=%2B31152511411"
        "&callstarttime=2026-11-24%2009%3A14%3A02&direction=inbound&duration=30"
    )
    assert request.body is None
    assert "Content-Type" not in request.headers


def test_manual_nested_payload_object() -> None:
    payload = {
        "fromNumber": "${callerPhoneNumber}",
        "callerUser": "${callerUser}",
        "calleeUser": "${calleeUser}",
        "myObject": {"callId": "${callId}"},
        "calleeFlowId": "${calleeFlowId}",
        "toNumber": "${calleePhoneNumber}",
        "callerFlowId": "${callerFlowId}",
    }
    request = compile_mapping(spec(payload=payload)).render(ctx())
    body = json.loads(request.body or b"")
    assert body["myObject"] == {"callId": "1732443153.1021"}
    assert body["callerUser"] is None  # a leaf that is one expression keeps null
    assert body["callerFlowId"] is None
    assert request.warnings == ("unknown name 'callerFlowId' in crmResourcePayload/callerFlowId",)


def test_manual_unescaped_quotes_are_refused_with_line_and_column(tmp_path: Path) -> None:
    # The manual's callHungUpEvent mapping has bare '"' inside a JSON string: never guessed at.
    text = (
        "{\n"
        '    "xelionEvent": "callHungUpEvent",\n'
        '    "crmResourceUri": "https://example.org/services/apexrest/Call?initiation=${(initiation=="outgoing")?"calldialed":"callreceived"}",\n'
        '    "crmResourcePayload": {"to" : "${calleePhoneNumber}"}\n'
        "}\n"
    )
    mapping = tmp_path / "hungup.json"
    mapping.write_text(text)
    event = tmp_path / "event.json"
    event.write_text(json.dumps(HUNG_UP))
    with pytest.raises(MappingFileError) as info:
        render_command(str(mapping), str(event), None, None)
    assert isinstance(info.value, ValueError)
    assert "hungup.json" in str(info.value)
    assert "line 3, column 94" in str(info.value)  # the "o" of outgoing, after the bare quote


# -- payload ------------------------------------------------------------------------------------------


def test_payload_types_and_strings() -> None:
    payload = {
        "n": "${duration}",
        "s": "${duration}s",
        "f": "${duration / 2}",
        "b": "${duration > 0}",
        "lit": "plain",
        "num": 5,
        "nul": None,
        "arr": ["${callId}", 1, {"k": "${initiation}"}],
        "${notAKey}": "keys are literal",
    }
    body = json.loads(compile_mapping(spec(payload=payload)).render(ctx()).body or b"")
    assert body == {
        "n": 89,
        "s": "89s",
        "f": 44.5,
        "b": True,
        "lit": "plain",
        "num": 5,
        "nul": None,
        "arr": ["1732443153.1021", 1, {"k": "incoming"}],
        "${notAKey}": "keys are literal",
    }


def test_values_never_break_json() -> None:
    nasty = 'quote " backslash \\ newline \n tab \t unicode é 😀 </script>'
    request = compile_mapping(spec(payload={"a": "${x}", "b": "x=${x}"})).render(ctx({"x": nasty}))
    assert request.body is not None
    assert json.loads(request.body) == {"a": nasty, "b": "x=" + nasty}
    assert "é".encode() in request.body  # UTF-8, not \u escapes
    compact = json.dumps(json.loads(request.body), separators=(",", ":"), ensure_ascii=False)
    assert request.body == compact.encode()


def test_a_value_json_cannot_carry_is_refused_not_sent_as_null() -> None:
    # A token answer's extra field of NaN (json reads the literal): the body must not say null.
    compiled = compile_mapping(spec(payload={"a": "${token.odd}", "b": "${token.small}", "c": None}))
    with pytest.raises(RenderError, match="a value JSON cannot carry"):
        compiled.render(ctx(token={"accessToken": "t", "odd": float("nan"), "small": 1.0}))
    request = compiled.render(ctx(token={"accessToken": "t", "odd": 2.5, "small": 1e-05}))
    assert request.body == b'{"a":2.5,"b":1e-05,"c":null}'  # json's own text of a small float


def test_scalar_payload() -> None:
    request = compile_mapping(spec(payload="${duration}")).render(ctx())
    assert request.body == b"89"


def test_payload_syntax_error_names_the_leaf_and_event() -> None:
    payload = {"myObject": {"callId": "${callId +}"}}
    with pytest.raises(TemplateSyntaxError) as info:
        compile_mapping(spec(payload=payload, xelion_event="newCallEvent"))
    err = info.value
    assert err.where == "crmResourcePayload/myObject/callId"
    assert err.xelion_event == "newCallEvent"
    assert err.column == 11
    assert (
        str(err)
        == "newCallEvent: crmResourcePayload/myObject/callId: column 11: unexpected end of expression"
    )


def test_json_pointer_escapes_keys() -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        compile_mapping(spec(payload={"a/b": [{"c~d": "${)}"}]}))
    assert info.value.where == "crmResourcePayload/a~1b/0/c~0d"


def test_evaluation_error_is_located() -> None:
    compiled = compile_mapping(spec(payload={"x": "${'a' + 1}"}, xelion_event="newCallEvent"))
    with pytest.raises(TemplateEvalError) as info:
        compiled.render(ctx(xelion_event="newCallEvent"))
    assert (
        str(info.value)
        == "newCallEvent: crmResourcePayload/x: column 7: cannot coerce the string 'a' to a number"
    )


# -- URI ----------------------------------------------------------------------------------------------


def test_substituted_uri_values_are_encoded_as_components() -> None:
    compiled = compile_mapping(spec("https://crm.example/p/${a}?q=${b}&r=${c}"))
    request = compiled.render(ctx({"a": "x/y", "b": "+31 6?&=#", "c": "é"}))
    assert request.url == "https://crm.example/p/x%2Fy?q=%2B31%206%3F%26%3D%23&r=%C3%A9"


def test_base_url_from_an_expression_at_position_zero() -> None:
    compiled = compile_mapping(spec("${token.instance_url}/services/data/v60.0/sobjects/Task?x=${callId}"))
    token = {"accessToken": "at-secret", "instance_url": "https://eu1.example.my"}
    request = compiled.render(ctx(token=token))
    assert request.url == "https://eu1.example.my/services/data/v60.0/sobjects/Task?x=1732443153.1021"


@pytest.mark.parametrize(
    "base", ["eu1.example.my", "/relative", "ftp://x.example", "javascript:alert(1)", "https://", ""]
)
def test_uri_must_be_absolute_http(base: str) -> None:
    compiled = compile_mapping(spec("${base}/path"))
    with pytest.raises(RenderError) as info:
        compiled.render(ctx({"base": base}))
    assert info.value.where == "crmResourceUri"
    assert "absolute http or https" in info.value.message


def test_uri_base_may_not_smuggle_white_space() -> None:
    with pytest.raises(RenderError, match="white space or a control"):
        compile_mapping(spec("${base}/p")).render(ctx({"base": "https://a.example/\r\nX-Evil: 1"}))


def test_uri_text_a_request_line_cannot_carry_is_refused() -> None:
    """A space or a non-ASCII character in the URI's literal text was saved, rendered (after a
    literal base the URL is not parsed again) and refused only by the CRM request; in the text an
    expression supplies, it is refused when rendered."""
    for uri, column in (
        ("https://crm.example/a b?x=${duration}", 22),
        ("https://crm.example/m\u00fcnchen/${callId}", 22),
        ("https://crm.example/calls/${callId}/ x", 37),
    ):
        with pytest.raises(TemplateSyntaxError, match="percent-encode") as info:
            compile_mapping(spec(uri))
        assert (info.value.where, info.value.column) == ("crmResourceUri", column), uri
    compile_mapping(spec("https://crm.example/a%20b?q=${fn:toUpperCase(callId) == 'X' ? 1 : 2}"))
    with pytest.raises(RenderError, match="non-ASCII"):
        compile_mapping(spec("${base}/p")).render(ctx({"base": "https://a.example/m\u00fcnchen"}))


def test_constant_uri_is_checked_when_compiled() -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        compile_mapping(spec("crm.example.org/calls"))
    assert info.value.where == "crmResourceUri"
    with pytest.raises(TemplateSyntaxError, match="control character"):
        compile_mapping(spec("https://crm.example.org/\ncalls"))


# -- form, method, headers, condition -----------------------------------------------------------------


def test_form_encoding() -> None:
    compiled = compile_mapping(
        spec(
            "https://www.zohoapis.eu/phonebridge/v3/callhungup",
            {
                "from": "${callerPhoneNumber}",
                "user": "${callerUser}",
                "ok": "${duration > 0}",
                "n": "${duration}",
            },
            content_type="application/x-www-form-urlencoded",
        )
    )
    request = compiled.render(ctx())
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.body == b"from=%2B31612345678&user=&ok=true&n=89"


def test_form_payload_must_be_flat() -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        compile_mapping(spec(payload={"a": {"b": "c"}}, content_type="application/x-www-form-urlencoded"))
    assert info.value.where == "crmResourcePayload/a"
    compiled = compile_mapping(
        spec(payload={"a": "${list}"}, content_type="application/x-www-form-urlencoded")
    )
    with pytest.raises(RenderError, match="flat"):
        compiled.render(ctx({"list": [1, 2]}))


@pytest.mark.parametrize(
    ("given", "expected"), [("put", "PUT"), ("PATCH", "PATCH"), (" get ", "GET"), ("DELETE", "DELETE")]
)
def test_method(given: str, expected: str) -> None:
    assert compile_mapping(spec(method=given)).render(ctx()).method == expected


@pytest.mark.parametrize("field", [{"method": "TRACE"}, {"content_type": "text/xml"}])
def test_invalid_method_or_content_type(field: dict[str, str]) -> None:
    with pytest.raises(TemplateSyntaxError):
        compile_mapping(spec(**field))


def test_headers_are_templates_and_refuse_crlf() -> None:
    compiled = compile_mapping(
        spec(payload={}, headers={"X-Call": "call ${callId}", "X-Dir": "${initiation}"})
    )
    request = compiled.render(ctx())
    assert request.headers == {
        "X-Call": "call 1732443153.1021",
        "X-Dir": "incoming",
        "Content-Type": "application/json",
    }
    with pytest.raises(RenderError) as info:
        compiled.render(ctx({**HUNG_UP, "callId": "1\r\nX-Evil: yes"}))
    assert info.value.where == "headers/X-Call"


@pytest.mark.parametrize("headers", [{"Bad Name": "x"}, {"Content-Type": "text/plain"}, {"X-A": "${(}"}])
def test_invalid_headers_refused_at_compile_time(headers: dict[str, str]) -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        compile_mapping(spec(headers=headers))
    assert info.value.where == f"headers/{next(iter(headers))}"


@pytest.mark.parametrize(
    "condition", ["${duration > 0}", "duration > 0", "#{duration gt 0 and initiation == 'incoming'}"]
)
def test_condition(condition: str) -> None:
    compiled = compile_mapping(spec(condition=condition))
    assert compiled.condition_holds(ctx()) is True
    assert compiled.condition_holds(ctx({**HUNG_UP, "duration": 0})) is False
    assert "duration" in compiled.names


def test_no_condition_always_holds_and_bad_condition_is_located() -> None:
    assert compile_mapping(spec()).condition_holds(ctx()) is True
    with pytest.raises(TemplateSyntaxError) as info:
        compile_mapping(spec(condition="duration >"))
    assert info.value.where == "condition"
    compiled = compile_mapping(spec(condition="duration"))
    with pytest.raises(TemplateEvalError) as err:
        compiled.condition_holds(ctx())
    assert (err.value.where, err.value.xelion_event) == ("condition", "callHungUpEvent")


# -- limits --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("place", "mapping"),
    [
        ("crmResourcePayload/a", spec(payload={"a": "${big}"})),
        ("crmResourcePayload/a", spec(payload={"a": "x${big}"})),
        ("crmResourceUri", spec("https://crm.example/${big}")),
        ("headers/X-Big", spec(headers={"X-Big": "${big}"})),
    ],
)
def test_rendered_strings_are_at_most_64_kib(place: str, mapping: MappingSpec) -> None:
    compiled = compile_mapping(mapping)
    compiled.render(ctx({"big": "é" * 5000}))  # 10,000 bytes (30,000 percent-encoded): fine
    with pytest.raises(RenderError) as info:
        compiled.render(ctx({"big": "é" * 40000}))  # 80,000 bytes
    assert info.value.where == place


# -- names, warnings, now ------------------------------------------------------------------------------


def test_names_and_warnings() -> None:
    compiled = compile_mapping(
        spec(
            "https://crm.example/${foo}",
            {
                "a": "${callId}",
                "u": "${user.role}",
                "e": "${xelionEvent}",
                "d": "${deliveryId}",
                "t": "${now}",
            },
            headers={"X-Bar": "${bar}"},
            condition="duration > 0",
        )
    )
    assert compiled.names == frozenset(
        {"foo", "callId", "user", "xelionEvent", "deliveryId", "now", "bar", "duration"}
    )
    request = compiled.render(ctx(user={"role": "callee"}, delivery_id="d-1"))
    assert request.warnings == ("unknown name 'foo' in crmResourceUri", "unknown name 'bar' in headers/X-Bar")
    # The worker shows warnings nowhere and asks for none: the request is the same.
    quiet = compiled.render(ctx(user={"role": "callee"}, delivery_id="d-1"), warnings=False)
    assert quiet.warnings == () and (quiet.url, quiet.headers, quiet.body) == (
        request.url,
        request.headers,
        request.body,
    )
    assert json.loads(request.body or b"") == {
        "a": "1732443153.1021",
        "u": "callee",
        "e": "callHungUpEvent",
        "d": "d-1",
        "t": NOW,
    }
    assert compiled.warnings_for(ctx(user={"role": "callee"})) == (
        "unknown name 'foo' in crmResourceUri",
        "unknown name 'bar' in headers/X-Bar",
        "unknown name 'deliveryId' in crmResourcePayload/d",
    )


def test_now_defaults_to_the_current_utc_time() -> None:
    context = RenderContext(event={}, xelion_event="newCallEvent")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", context.now)


# -- secrets and preview -------------------------------------------------------------------------------


def test_token_values_are_secret_and_masked_in_the_preview() -> None:
    token = {"accessToken": "s3cr3t+/tok", "api_domain": "https://www.zohoapis.eu", "expires_in": 3600}
    compiled = compile_mapping(
        spec(
            "${token.api_domain}/crm/v2/calls?token=${token.accessToken}",
            {"token": "${token.accessToken}", "also": "Bearer ${token.accessToken}", "n": "${callId}"},
            headers={"X-Token": "${token.accessToken}"},
        )
    )
    request = compiled.render(ctx(token=token))
    assert "s3cr3t+/tok" in request.secret_values
    assert "s3cr3t%2B%2Ftok" in request.secret_values  # the form it has in the URL
    assert "https://www.zohoapis.eu" in request.secret_values
    assert "s3cr3t%2B%2Ftok" in request.url
    preview = request_preview(request)
    text = json.dumps(preview)
    assert "s3cr3t" not in text and "zohoapis" not in text
    assert preview == {
        "method": "POST",
        "url": "***/crm/v2/calls?token=***",
        "headers": {"X-Token": "***", "Content-Type": "application/json"},
        "body": {"token": "***", "also": "Bearer ***", "n": "1732443153.1021"},
        "warnings": [],
    }


def test_no_token_no_secrets() -> None:
    request = compile_mapping(spec(payload={"a": "${callId}"})).render(ctx(token={"accessToken": "x"}))
    assert request.secret_values == ()


# -- cti-bridge render ---------------------------------------------------------------------------------


def test_render_command(tmp_path: Path) -> None:
    mapping = tmp_path / "mapping.json"
    mapping.write_text(
        json.dumps(
            {
                "xelionEvent": "callHungUpEvent",
                "crmResourceUri": "https://crm.example/calls/${callId}?role=${user.role}&oid=${user.xelionOid}",
                "crmResourcePayload": {"duration": "${fn:mmss(duration)}", "auth": "${token.accessToken}"},
                "method": "PUT",
                "condition": "${duration > 0}",
            }
        )
    )
    event = tmp_path / "event.json"
    event.write_text(
        json.dumps(
            {
                "notificationType": "callHungUpEvent",
                "notification": {
                    **HUNG_UP,
                    "calleeUser": {"commonName": "anne", "oid": "1001", "objectType": "User"},
                },
            }
        )
    )
    token = tmp_path / "token.json"
    token.write_text(json.dumps({"access_token": "AT-123", "token_type": "Bearer", "expires_in": 3600}))
    out = render_command(str(mapping), str(event), "anne", str(token))
    assert out == {
        "method": "PUT",
        "url": "https://crm.example/calls/1732443153.1021?role=callee&oid=1001",
        "headers": {"Content-Type": "application/json"},
        "body": {"duration": "01:29", "auth": "***"},
        "warnings": [],
        "condition": True,
    }
    json.dumps(out)  # JSON-able

    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({**HUNG_UP, "duration": 0, "callerUser": "bob"}))
    out = render_command(str(mapping), str(bare), "bob", None)
    assert out["condition"] is False
    assert out["url"] == "https://crm.example/calls/1732443153.1021?role=caller&oid="
    assert out["warnings"] == ["unknown name 'token' in crmResourcePayload/auth"]


def test_render_command_reports_bad_files(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text('{\n  "callId": 1,\n  oops\n}')
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"xelionEvent": "newCallEvent", "crmResourceUri": "https://x.example/"}))
    with pytest.raises(MappingFileError, match=r"event\.json: line 3, column 3"):
        render_command(str(mapping), str(event), None, None)
    with pytest.raises(MappingFileError, match="missing.json"):
        render_command(str(tmp_path / "missing.json"), str(event), None, None)
    mapping.write_text(json.dumps({"crmResourceUri": "https://x.example/"}))
    with pytest.raises(MappingFileError, match="xelionEvent"):
        render_command(str(mapping), str(event), None, None)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.from_regex(r"[A-Za-z0-9_.~+ -]{0,20}\Z")
)
def test_uri_component_quoting_is_urllibs(text: str) -> None:
    # The fast path for values that need no escaping must not change any value's encoding.
    assert _quote_component(text) == quote(text, safe="")


def test_a_condition_is_evaluated_without_token_and_delivery_id_in_the_preview_too() -> None:
    """The pipeline evaluates conditions when the event is stored, before any token exists; the
    previews evaluated them with the token, so ``${not empty token.instance_url}`` held in the
    preview and never in production. Both now agree, and the preview says why."""
    compiled = compile_mapping(spec(condition="${not empty token.instance_url}"))
    with_token = ctx(
        token={"accessToken": "at", "instance_url": "https://x.my.salesforce.com"}, delivery_id="d"
    )
    assert compiled.condition_holds(with_token) is False
    assert (
        compiled.condition_holds_in(context_names(replace(with_token, token=None, delivery_id=None))) is False
    )
    warnings = compiled.render(with_token).warnings
    assert any("conditions are evaluated when the event arrives" in w for w in warnings), warnings
    plain = compile_mapping(spec(condition="${duration > 0}"))
    assert plain.condition_holds(with_token) is True
    assert not plain.render(with_token).warnings


def _lone_surrogate_mapping(content_type: str) -> CompiledMapping:
    return compile_mapping(
        MappingSpec(
            xelion_event="newCallEvent",
            crm_resource_uri="https://crm.example.com/calls",
            crm_resource_payload={"callId": "${callId}", "name": "é"},
            content_type=content_type,
        )
    )


def test_a_lone_surrogate_in_a_json_payload_is_escaped_not_sent_as_broken_utf8() -> None:
    """An event's ``"\\ud800"`` (JSON allows the escape alone) went out as the bytes ED A0 80, which
    are not UTF-8; the CRM saw a malformed body. Escaped, the body is the same JSON string."""
    mapping = _lone_surrogate_mapping("application/json")
    req = mapping.render(RenderContext(event={"callId": "a\ud800b"}, xelion_event="newCallEvent"))
    assert req.body is not None
    assert req.body.decode("utf-8") == '{"callId":"a\\ud800b","name":"\\u00e9"}'
    assert json.loads(req.body) == {"callId": "a\ud800b", "name": "é"}
    # Without one, the body stays plain UTF-8.
    plain = mapping.render(RenderContext(event={"callId": "c-1"}, xelion_event="newCallEvent"))
    assert plain.body == '{"callId":"c-1","name":"é"}'.encode()


def test_a_lone_surrogate_in_a_form_payload_is_a_render_error_naming_the_field() -> None:
    """A form has no way to carry it (percent-encoding needs UTF-8 bytes): it failed as an
    "internal evaluation error (UnicodeEncodeError)"; it names the field now."""
    mapping = _lone_surrogate_mapping("application/x-www-form-urlencoded")
    with pytest.raises(RenderError) as caught:
        mapping.render(RenderContext(event={"callId": "a\ud800b"}, xelion_event="newCallEvent"))
    assert "crmResourcePayload/callId" in str(caught.value) and "lone surrogate" in str(caught.value)
    ok = mapping.render(RenderContext(event={"callId": "c-1"}, xelion_event="newCallEvent"))
    assert ok.body == b"callId=c-1&name=%C3%A9"


# --- an integrator review's findings ---------------------------------------------------------------

BIG_LEAF = (
    "${fn:replace(fn:replace(fn:replace('aaaaaaaaaaaaaaaa','a','aaaaaaaaaaaaaaaa'),"
    "'a','aaaaaaaaaaaaaaaa'),'a','aaaaaaaaaaaaaaaa')}"
)


def test_a_request_is_bounded_as_a_whole_not_only_string_by_string() -> None:
    """Each leaf within its 64 KiB made a 459 MB body from a 1 MB mapping (7,000 leaves): the
    strings of a request together are held to 1 MiB, refused at the leaf that passes it."""
    one = compile_mapping(spec(payload={"a": BIG_LEAF})).render(ctx())
    assert one.body is not None and len(one.body) > 65536  # a leaf of exactly 64 KiB renders
    many = compile_mapping(spec(payload={f"k{i}": BIG_LEAF for i in range(40)}))
    with pytest.raises(RenderError) as info:
        many.render(ctx())
    assert "larger than 1 MiB" in info.value.message and info.value.where == "crmResourcePayload/k16"
    headers = compile_mapping(spec(headers={f"X-H{i}": BIG_LEAF for i in range(20)}, payload={"a": 1}))
    with pytest.raises(RenderError) as info:
        headers.render(ctx())
    assert info.value.where == "headers/X-H16"  # 16 x 64 KiB is 1 MiB exactly
    # A list an event carries, named whole by each of five leaves, counted as the JSON it becomes.
    event = {**HUNG_UP, "items": ["x" * 60000] * 5}
    lists = compile_mapping(spec(payload=["${items}"] * 5))
    with pytest.raises(RenderError) as info:
        lists.render(ctx(event))
    assert info.value.where == "crmResourcePayload/3"


def test_an_escaped_dollar_is_unescaped_in_a_payload_with_no_expression_too() -> None:
    """``\\${`` stayed ``\\${`` (backslash sent) in a subtree of constants only."""
    for payload in ({"m": "12", "e": "\\${literal}"}, ["\\#{x}"], {"a": {"b": ["\\${y}", 1]}}):
        body = compile_mapping(spec(payload=payload)).render(ctx()).body
        assert body is not None
        text = body.decode()
        assert "\\\\" not in text and ("${" in text or "#{" in text), text
    assert json.loads(compile_mapping(spec(payload={"e": "\\${literal}"})).render(ctx()).body or b"") == {
        "e": "${literal}"
    }


@pytest.mark.parametrize(
    ("uri", "headers", "where"),
    [
        ("crm.example.org/x?to=${calleePhoneNumber}", None, "crmResourceUri"),
        ("ftp://crm.example.org/${callId}", None, "crmResourceUri"),
        ("https://crm.example.org/x", {"X-A": "a\r\nInjected: 1"}, "headers/X-A"),
        ("https://crm.example.org/x", {"authorization": "Custom abc"}, "headers/authorization"),
        ("https://crm.example.org/x", {"Idempotency-Key": "${callId}"}, "headers/Idempotency-Key"),
        ("https://crm.example.org/x", {"content-length": "5"}, "headers/content-length"),
    ],
)
def test_mistakes_that_could_only_end_deliveries_dead_are_refused_when_saved(
    uri: str, headers: dict[str, str] | None, where: str
) -> None:
    compiled = compile_mapping(spec(uri, payload={"a": 1}, headers=headers))  # a stored one loads
    with pytest.raises(TemplateSyntaxError) as info:
        compiled.check_for_saving()
    assert info.value.where == where


@pytest.mark.parametrize(
    "uri", ["https://crm.example.org/${callId}", "${token.instance_url}/x", "http${'s'}://x.example/a"]
)
def test_a_uri_that_can_become_absolute_is_saved(uri: str) -> None:
    # A Host header is sent (it replaces the URL's: a CRM reached by address may need it).
    headers = {"X-Call": "${callId}", "Host": "crm.internal"}
    compile_mapping(spec(uri, payload={"a": 1}, headers=headers)).check_for_saving()


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:99999/m6",
        "http://127.0.0.1:99999/m6?c=${callId}",
        "https://crm.example:443000/calls/${callId}",
        "http://[::1/x/${callId}",
    ],
)
def test_a_port_out_of_range_is_refused_when_saved_and_a_stored_one_still_compiles(uri: str) -> None:
    """Refused when compiling (this check's first version), a stored mapping with such a base
    failed the routing of its integration, and with it the ingest of every event (a second
    reading's finding): the transport refuses the request, that mapping's deliveries go dead, and
    the integration's other mappings go on. Saving one is refused."""
    compiled = compile_mapping(spec(uri, payload={"a": "${callId}"}))
    with pytest.raises(TemplateSyntaxError) as info:
        compiled.check_for_saving()
    assert info.value.where == "crmResourceUri" and "not valid" in info.value.message
    assert compiled.render(ctx()).url.startswith(uri.split("/x")[0].split("/calls")[0].split("/m6")[0])
