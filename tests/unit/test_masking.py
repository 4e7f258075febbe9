"""Token values in render errors (el-templates.md §4, reliability.md §14): every string of the token
view is a secret, masked in the text of an error raised while rendering or evaluating a condition,
in each form it takes there (percent-encoded in a URI, escaped by ``repr``) and when the message cuts
it short; a value under four characters is not masked. The end-to-end counterpart, through the
worker's attempt records and log lines and the preview's answer, is tests/e2e/test_token_secrets.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from urllib.parse import quote

import pytest

from cti_bridge.el import TemplateError
from cti_bridge.render import (
    MappingSpec,
    RenderContext,
    compile_mapping,
    mask_message,
    render_command,
    request_preview,
    token_secrets,
)

ACCESS = "00D5g!AQ4AQFk.SECRET-0123456789abcdefghijklmnopqrstuvwxyz"  # '!' is '%21' in a URI
TOKEN: dict[str, object] = {
    "accessToken": ACCESS,
    "instance_url": "eu12.my.salesforce.com",  # no scheme: unusable as a base URL
    "id_token": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIwMDVxMDAwMDAwMDAwMDBBQUEifQ.c2lnbmF0dXJl",
    "sfdc": {"keys": ["nested-key-value", {"deeper": "deeper-secret"}]},
    "quoted": 'it\'s "odd" \\ too',
    "scope": "api",
    "expires_in": 3600,
    "is_admin": True,
}

#: Pieces of the token's values that no error text may show.
PIECES = (ACCESS[:8], quote(ACCESS, safe="")[:8], "eu12.my", "eyJhbGciOiJS", "nested-key", "deeper-s", "odd")


def render_error(uri: str, payload: object = None, **kw: object) -> TemplateError:
    compiled = compile_mapping(MappingSpec("newCallEvent", uri, payload, **kw))  # type: ignore[arg-type]
    context = RenderContext(event={"callId": "1"}, xelion_event="newCallEvent", token=TOKEN)
    with pytest.raises(TemplateError) as info:
        if compiled.condition is not None:
            compiled.condition_holds(context)
        compiled.render(context)
    return info.value


def test_every_string_of_the_token_is_a_secret_in_each_of_its_forms() -> None:
    found = token_secrets(TOKEN)
    for raw in (ACCESS, "eu12.my.salesforce.com", TOKEN["id_token"], "nested-key-value", "deeper-secret"):
        assert raw in found
    assert quote(ACCESS, safe="") in found  # a URI component
    assert quote(quote(ACCESS, safe=""), safe="") in found  # fn:urlEncode, then a URI component
    assert "00D5g%21AQ4AQFk.SECRET-0123456789abcdefghijklmnopqrstuvwxyz" in found
    assert json.dumps(TOKEN["quoted"])[1:-1] in found  # a JSON string
    assert repr(TOKEN["quoted"])[1:-1] in found  # a value quoted in an error message
    # Under four characters, numbers and booleans: not secrets.
    assert not [s for s in found if s in ("api", "3600", "True", "true")]
    assert token_secrets(None) == ()


@pytest.mark.parametrize(
    ("uri", "payload", "shown"),
    [
        # The whole URL quoted: the token in it percent-encoded.
        (
            "${token.instance_url}/x?t=${token.accessToken}",
            None,
            "crmResourceUri: the URI must be an absolute http or https URL, not '***/x?t=***'",
        ),
        # The URL cut at 80 characters, in the middle of the encoded token.
        (
            "${token.instance_url}/services/apexrest/calls/v2?token=${token.accessToken}",
            None,
            "crmResourceUri: the URI must be an absolute http or https URL, not "
            "'***/services/apexrest/calls/v2?token=***'",
        ),
        # A string cut at 37 characters.
        (
            "https://crm.example.org/calls",
            {"n": "${token.id_token * 1}"},
            "crmResourcePayload/n: column 18: cannot coerce the string '***...' to a number",
        ),
        # Nested in lists and maps.
        (
            "https://crm.example.org/calls",
            {"n": "${token.sfdc.keys[1].deeper * 1}"},
            "crmResourcePayload/n: column 29: cannot coerce the string '***' to a number",
        ),
        # Escaped by repr.
        (
            "https://crm.example.org/calls",
            {"n": "${-token.quoted}"},
            "crmResourcePayload/n: column 3: cannot coerce the string '***' to a number",
        ),
        # A value in a composite template.
        (
            "https://crm.example.org/calls/${token.sfdc.keys[0] * 2}",
            None,
            "crmResourceUri: column 52: cannot coerce the string '***' to a number",
        ),
    ],
)
def test_a_render_error_masks_the_token_value_it_quotes(uri: str, payload: object, shown: str) -> None:
    err = render_error(uri, payload)
    assert str(err) == "newCallEvent: " + shown
    for text in (str(err), repr(err), str(err.args), str(pickle.loads(pickle.dumps(err)))):
        assert not [piece for piece in PIECES if piece in text]


def test_a_header_error_is_masked_too_and_a_condition_never_sees_the_token() -> None:
    err = render_error("https://crm.example.org/calls", headers={"X-Key": "${token.sfdc.keys[0] * 2}"})
    assert str(err) == "newCallEvent: headers/X-Key: column 22: cannot coerce the string '***' to a number"
    # A condition is evaluated when the event is stored, before any token (the pipeline): token is
    # null there, in the preview too, so no token value can reach a condition's error.
    compiled = compile_mapping(
        MappingSpec(
            "newCallEvent", "https://crm.example.org/calls", None, condition="${token.instance_url > 1}"
        )
    )
    context = RenderContext(event={"callId": "1"}, xelion_event="newCallEvent", token=TOKEN)
    assert compiled.condition_holds(context) is False


def test_a_value_under_four_characters_is_not_masked() -> None:
    # One to three characters give nothing away, and masking them would star out pieces of any text.
    err = render_error("https://crm.example.org/calls", {"n": "${token.scope * 1}"})
    assert str(err).endswith("cannot coerce the string 'api' to a number")
    assert mask_message("the string 'api' and 'ap'", ["api", "ap"]) == "the string 'api' and 'ap'"


def test_mask_message_masks_the_start_of_a_secret_that_ends_a_quoted_value() -> None:
    secret = "abcdefghijklmnop"
    assert mask_message("not 'https://x/?t=abcdefgh'", [secret]) == "not 'https://x/?t=***'"
    assert mask_message("the string 'abcdefgh...'", [secret]) == "the string '***...'"
    assert mask_message('the string "it\'s abcd"', [secret]) == 'the string "it\'s ***"'
    # Fewer than four characters of it, or not at the end of the quoted value: left alone.
    assert mask_message("not 'https://x/?t=abc'", [secret]) == "not 'https://x/?t=abc'"
    assert mask_message("the string 'abcdefgh-x'", [secret]) == "the string 'abcdefgh-x'"


def test_a_token_value_url_encoded_twice_is_masked_in_the_preview() -> None:
    compiled = compile_mapping(
        MappingSpec(
            "newCallEvent", "https://crm.example.org/calls?t=${fn:urlEncode(token.accessToken)}", None
        )
    )
    context = RenderContext(event={}, xelion_event="newCallEvent", token=TOKEN)
    request = compiled.render(context)
    assert quote(quote(ACCESS, safe=""), safe="") in request.url
    assert request_preview(request)["url"] == "https://crm.example.org/calls?t=***"


def test_cti_bridge_render_reports_a_masked_error(tmp_path: Path) -> None:
    mapping = {
        "xelionEvent": "newCallEvent",
        "crmResourceUri": "${token.instance_url}/x?t=${token.accessToken}",
    }
    (tmp_path / "m.json").write_text(json.dumps(mapping))
    (tmp_path / "e.json").write_text(json.dumps({"callId": "1"}))
    (tmp_path / "t.json").write_text(json.dumps({"access_token": ACCESS, "instance_url": "eu12.my.example"}))
    with pytest.raises(TemplateError) as info:
        render_command(str(tmp_path / "m.json"), str(tmp_path / "e.json"), None, str(tmp_path / "t.json"))
    assert str(info.value) == (
        "newCallEvent: crmResourceUri: the URI must be an absolute http or https URL, not '***/x?t=***'"
    )


# -- values made from the token (a template review's finding) ------------------------------------------


def test_a_value_made_from_the_token_is_a_secret_too() -> None:
    """``fn:toUpperCase(token.accessToken)`` or a substring from the token's middle was sent, and
    shown unmasked in the preview and the attempt log: only strings read from the token counted.
    The value of every expression that reads the token counts now."""
    compiled = compile_mapping(
        MappingSpec(
            "newCallEvent",
            "https://crm.example.org/calls/${fn:substring(token.accessToken, 9, 30)}",
            {
                "upper": "${fn:toUpperCase(token.accessToken)}",
                "call": "${callId}",
                "n": "${token.expires_in}",
            },
            headers={"X-Key": "k=${fn:replace(token.sfdc.keys[0], '-', '')}"},
        )
    )
    context = RenderContext(event={"callId": "call-17"}, xelion_event="newCallEvent", token=TOKEN)
    request = compiled.render(context)
    upper, middle, joined = ACCESS.upper(), ACCESS[9:30], "nestedkeyvalue"
    assert request.body is not None and upper in request.body.decode()  # sent as rendered
    assert request.url.endswith(quote(middle, safe="")) and request.headers["X-Key"] == "k=" + joined
    for made in (upper, middle, joined):
        assert made in request.secret_values
    shown = json.dumps(request_preview(request))
    for made in (upper, middle, quote(middle, safe=""), joined):
        assert made not in shown
    # What does not read the token stays as it is; a number made from it is not a secret.
    preview = request_preview(request)
    assert preview["body"] == {"upper": "***", "call": "call-17", "n": 3600}
    assert preview["url"] == "https://crm.example.org/calls/***"


def test_an_error_in_an_expression_reading_the_token_quotes_no_value_made_from_it() -> None:
    # The message quoted the upper-cased token, cut at 37 characters: no mask of the token's own
    # text finds that.
    err = render_error("https://crm.example.org/calls", {"n": "${fn:toUpperCase(token.accessToken) * 2}"})
    assert str(err).endswith("cannot coerce the string '***...' to a number"), str(err)
    err = render_error("https://crm.example.org/calls", {"n": "${fn:substring(token.id_token, 5, 25) + 1}"})
    assert str(err).endswith("cannot coerce the string '***' to a number"), str(err)
    for text in (str(err), repr(err), str(err.args)):
        assert str(TOKEN["id_token"])[5:25] not in text
    # A short value is still shown (it gives nothing away), and an expression that does not read
    # the token keeps its message.
    err = render_error("https://crm.example.org/calls", {"n": "${fn:substring(token.scope, 0, 2) * 1}"})
    assert str(err).endswith("cannot coerce the string 'ap' to a number"), str(err)
    err = render_error("https://crm.example.org/calls", {"n": "${callId + 'x'}"})
    assert "'x'" in str(err), str(err)


def test_a_short_value_made_from_the_token_is_not_starred_out_of_the_preview() -> None:
    """Every string an expression makes from the token is recorded, a choice like 'y' too; the
    preview masked them all, starring every 'y' out of the URL and body (a review's finding). It
    masks as the attempt log does: from four characters."""
    compiled = compile_mapping(
        MappingSpec(
            "newCallEvent",
            "https://crm.example.org/y/v2/calls",
            {
                "party": "caller Harry Royley",
                "authorised": "${empty token.accessToken ? 'n' : 'y'}",
                "upper": "${fn:toUpperCase(token.accessToken)}",
            },
        )
    )
    request = compiled.render(RenderContext(event={"callId": "1"}, xelion_event="newCallEvent", token=TOKEN))
    preview = request_preview(request)
    assert preview["url"] == "https://crm.example.org/y/v2/calls"
    assert preview["body"] == {"party": "caller Harry Royley", "authorised": "y", "upper": "***"}


@pytest.mark.parametrize(
    "raw",
    [
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln-_~",  # a JWT: base64url and dots
        "at-0123456789abcdef",
        "00D5g!AQ4AQFk/SECRET+x=",  # Salesforce's '!', and '/', '+', '='
        'it\'s "odd" \\ <too> & é',
    ],
)
def test_the_forms_a_crm_may_quote_a_token_back_in(raw: str) -> None:
    """A token of URL-safe characters has no other form (found by one match, not built: building
    them for every delivery of a 1,000-user tenant cost 12 % more CPU per event); any other has
    each form a server may quote it in."""
    import html
    import re
    from urllib.parse import quote_plus

    from cti_bridge.render import echo_forms

    def lower_hex(text: str) -> str:
        return re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)

    expected = {
        raw,
        quote(raw, safe=""),
        lower_hex(quote(raw, safe="")),
        quote(raw),
        lower_hex(quote(raw)),
        quote_plus(raw),
        json.dumps(raw, ensure_ascii=False)[1:-1],
        json.dumps(raw, ensure_ascii=False)[1:-1].replace("/", "\\/"),
        json.dumps(raw)[1:-1],
        html.escape(raw),
    }
    assert expected <= set(echo_forms(raw))
    if all(c.isalnum() or c in "-._~" for c in raw):
        assert echo_forms(raw) == (raw,)
