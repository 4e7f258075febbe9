"""Edge cases of the template language found by a review of cti_bridge/el against el-templates.md:
numbers beyond a double in an event, a coercion that took quadratic time, a rendering that grew to
gigabytes before its 64 KiB check, a conditional the parser misread, and two functions' outputs."""

from __future__ import annotations

import re
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cti_bridge.el import RenderError, TemplateError, TemplateEvalError, compile_template
from cti_bridge.el.functions import fn_e164, fn_iso_utc, fn_national
from cti_bridge.el.semantics import _DOUBLE_RE, java_double, to_double, to_str
from cti_bridge.events import parse_notification
from cti_bridge.render import MappingSpec, RenderContext, compile_mapping

NOW = "2026-11-24 09:15:00"


def ctx(event: dict[str, object]) -> RenderContext:
    return RenderContext(event=event, xelion_event="callHungUpEvent", now=NOW)


def mapping(uri: str, payload: object = None, condition: str | None = None) -> object:
    return compile_mapping(
        MappingSpec(
            xelion_event="callHungUpEvent",
            crm_resource_uri=uri,
            crm_resource_payload=payload,
            condition=condition,
        )
    )


def test_numbers_beyond_a_double_in_an_event_stay_text_and_never_crash_a_render() -> None:
    """``1e400`` is valid JSON and Python read it as infinity (``NaN`` and ``Infinity`` too), which
    made printing it an AssertionError: an internal error per attempt, and in a condition, the
    whole event's ingest failed."""
    frame = (
        '{"notificationType":"callHungUpEvent",'
        '"notification":{"callId":"1","duration":1e400,"x":NaN,"y":1.5}}'
    )
    parsed = parse_notification(frame)
    assert parsed is not None
    fields = parsed.fields
    assert (fields["duration"], fields["x"], fields["y"]) == ("1e400", "NaN", 1.5)
    m = mapping(
        "https://crm.example/calls/${callId}?d=${duration}", {"d": "${duration}", "t": "took ${duration} s"}
    )
    request = m.render(ctx(fields))  # type: ignore[attr-defined]
    assert request.url == "https://crm.example/calls/1?d=1e400"
    with pytest.raises(TemplateEvalError, match="finite"):
        mapping("https://crm.example/c", {"minutes": "${duration / 60}"}).render(ctx(fields))  # type: ignore[attr-defined]
    cond = mapping("https://crm.example/c", condition="${fn:startsWith(duration, '1')}")
    assert cond.condition_holds(ctx(fields))  # type: ignore[attr-defined]
    # An infinity that reaches the language some other way is an evaluation error, not a crash.
    for value in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(TemplateEvalError):
            java_double(value)
        with pytest.raises(TemplateEvalError):
            to_double(value)
        with pytest.raises(TemplateError):
            compile_template("took ${d} s").render({"d": value})


_OLD_DOUBLE_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fFdD]?")


@given(st.text(alphabet="0123456789.eE+-fFdDx ", max_size=24))
def test_the_double_pattern_accepts_exactly_what_it_did(text: str) -> None:
    """The pattern was rewritten so that each digit has one place to go (the old one tried every
    split of a digit run: 16,000 digits and an 'x' took 6 s; the new one takes milliseconds)."""
    assert bool(_DOUBLE_RE.fullmatch(text)) == bool(_OLD_DOUBLE_RE.fullmatch(text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 1.5 ", 1.5),
        ("\t2e3\n", 2000.0),
        ("\x011.5\x1f", 1.5),  # String.trim takes control characters as well
        ("\u00a01.5", None),  # and no Unicode space: Double.valueOf refuses these
        ("1.5\u2003", None),
        ("\u30001", None),
    ],
)
def test_a_number_in_a_string_is_trimmed_as_java_trims(text: str, expected: float | None) -> None:
    if expected is None:
        with pytest.raises(TemplateEvalError, match="cannot coerce"):
            to_double(text)
    else:
        assert to_double(text) == expected


def test_a_long_numeric_looking_string_is_refused_as_a_number() -> None:
    with pytest.raises(TemplateEvalError, match="cannot coerce"):
        to_double("1" * 100_000 + "x")
    with pytest.raises(TemplateEvalError, match="cannot coerce"):
        to_double("1" * 401)  # no double tells 401 digits apart: text, not a number
    assert to_double("1" * 300) == float("1" * 300)


def test_a_rendering_too_long_fails_before_it_is_built() -> None:
    """One 64 KiB event value in many parts of a template: the whole string (and its UTF-8 copy)
    was built before the 64 KiB check: 500 MB for 4,000 parts."""
    event = {"callId": "1", "x": "y" * 65536}
    payload_template = "a" + "${x}" * 2000
    uri_template = "https://crm.example/c?q=" + "${x}" * 2000
    for m in (mapping("https://crm.example/c", {"v": payload_template}), mapping(uri_template)):
        tracemalloc.start()
        try:
            with pytest.raises((TemplateEvalError, RenderError), match="longer than"):
                m.render(ctx(event))  # type: ignore[attr-defined]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 30_000_000, f"peak {peak / 1e6:.0f} MB"  # the joined string alone was 131 MB


def test_a_reserved_word_after_a_conditionals_colon_is_not_a_function_namespace() -> None:
    for text, names, expected in (
        ("${c ? a : empty(b)}", {"c": False, "a": 1, "b": ""}, True),
        ("${c ? a : not(b)}", {"c": False, "a": 1, "b": True}, False),
        ("${c ? a : empty(b)}", {"c": True, "a": 1, "b": ""}, 1),
    ):
        assert compile_template(text).evaluate(names) == expected, text


def test_iso_utc_pads_the_year_to_four_digits() -> None:
    assert fn_iso_utc("0001-01-01 00:00:00") == "0001-01-01T00:00:00Z"
    assert fn_iso_utc("0999-12-31 23:59:59") == "0999-12-31T23:59:59Z"
    assert fn_iso_utc("2026-11-24 09:12:33") == "2026-11-24T09:12:33Z"


def test_an_internal_extension_is_no_e164_number() -> None:
    """``201`` parsed for NL as +31201: a false number for a CRM to match callers against."""
    assert fn_e164("201", "NL") == "201"
    assert fn_national("201", "NL") == "201"
    assert fn_e164("0612345678", "NL") == "+31612345678"
    assert to_str(fn_national("0612345678", "NL")) == "612345678"
