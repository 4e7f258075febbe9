"""The date functions of el-templates.md §5 (``fn:formatDate``, ``fn:isoUtc``, ``fn:epochSeconds``,
``fn:epochMillis``) on every date-time form Xelion may send (xelion-protocol.md §1): ``YYYY-MM-DD
HH:MM:SS`` in UTC, and ISO-8601 as well (an offset converted to UTC, no zone meaning UTC, fractional
seconds kept), through both engines.

Expectations are derived from the instant with other means than the functions use (``isoformat``,
``calendar.timegm``), so a table row states only the input and the instant it names.
"""

from __future__ import annotations

import calendar
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cti_bridge.el import TemplateEvalError, compile_template
from cti_bridge.render import MappingSpec, RenderContext, compile_mapping

ENGINES = ["closures", "simpleeval"]

#: Every ``fn:`` function that takes a date-time string, with a template that calls it on ``d``.
DATE_TEMPLATES = {
    "formatDate": "${fn:formatDate(d, '%Y-%m-%d %H:%M:%S.%f')}",
    "isoUtc": "${fn:isoUtc(d)}",
    "epochSeconds": "${fn:epochSeconds(d)}",
    "epochMillis": "${fn:epochMillis(d)}",
    "addSeconds": "${fn:addSeconds(d, 0)}",
}


def _utc(year: int, month: int, day: int, hour: int, minute: int, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


#: (what the event carries, the instant it names)
INSTANTS = [
    pytest.param("2026-11-24 09:12:33", _utc(2026, 11, 24, 9, 12, 33), id="xelion"),
    pytest.param("2026-11-24T09:12:33", _utc(2026, 11, 24, 9, 12, 33), id="iso-no-zone-is-utc"),
    pytest.param("2026-11-24T09:12:33Z", _utc(2026, 11, 24, 9, 12, 33), id="iso-Z"),
    pytest.param("2026-11-24T10:12:33+01:00", _utc(2026, 11, 24, 9, 12, 33), id="offset+01:00"),
    pytest.param("2026-11-24T03:42:33-05:30", _utc(2026, 11, 24, 9, 12, 33), id="offset-05:30"),
    pytest.param("2026-11-24T09:12:33+0000", _utc(2026, 11, 24, 9, 12, 33), id="offset+0000"),
    pytest.param("2026-11-24T09:12:33.250Z", _utc(2026, 11, 24, 9, 12, 33, 250000), id="fraction-Z"),
    pytest.param("2026-11-24 09:12:33.5", _utc(2026, 11, 24, 9, 12, 33, 500000), id="xelion-fraction"),
    pytest.param(  # Java's Instant.toString: nanoseconds, kept to the microsecond
        "2026-11-24T10:12:33.123456789+01:00", _utc(2026, 11, 24, 9, 12, 33, 123456), id="nanos-offset"
    ),
    pytest.param("2026-11-25T00:30:00+01:00", _utc(2026, 11, 24, 23, 30), id="offset-crosses-day"),
    pytest.param("2026-12-31T20:00:00-05:00", _utc(2027, 1, 1, 1, 0), id="offset-crosses-year"),
    pytest.param("1969-12-31T23:59:59.999Z", _utc(1969, 12, 31, 23, 59, 59, 999000), id="pre-1970-fraction"),
]

#: Not a date-time: each must fail the delivery with a TemplateEvalError, as before.
INVALID = [
    "nope",
    "",
    None,
    89,
    "24-11-2026 09:12",
    "2026-13-01 00:00:00",
    "2026-02-30 10:00:00",
    "2026-11-24 23:59:60",
    "2026-11-24 24:00:00",
    "2026-11-24 9:12:33",
    "2026-11-24 09:12:33 UTC",
    "2026-11-24T09:12:33+24:00",
    "2026-11-24T09:12:33+01:00[Europe/Amsterdam]",
    "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
]


def _evaluate(template: str, date: object, engine: str) -> object:
    return compile_template(template, engine=engine).evaluate({"d": date})  # type: ignore[arg-type]


def _expected(name: str, instant: datetime) -> object:
    whole = calendar.timegm(instant.timetuple())  # drops the fraction: the floor, also before 1970
    return {
        "formatDate": instant.isoformat(sep=" ", timespec="microseconds").removesuffix("+00:00"),
        "isoUtc": instant.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "epochSeconds": whole,
        "epochMillis": whole * 1000 + instant.microsecond // 1000,
        # Xelion's own form, UTC, the fraction only when there is one.
        "addSeconds": instant.isoformat(
            sep=" ", timespec="microseconds" if instant.microsecond else "seconds"
        ).removesuffix("+00:00"),
    }[name]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(DATE_TEMPLATES))
@pytest.mark.parametrize(("text", "instant"), INSTANTS)
def test_date_functions_read_xelion_and_iso(text: str, instant: datetime, name: str, engine: str) -> None:
    got = _evaluate(DATE_TEMPLATES[name], text, engine)
    expected = _expected(name, instant)
    assert type(got) is type(expected)
    assert got == expected


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(DATE_TEMPLATES))
@pytest.mark.parametrize("value", INVALID, ids=repr)
def test_date_functions_refuse_what_is_not_a_date_time(value: object, name: str, engine: str) -> None:
    with pytest.raises(TemplateEvalError) as info:
        _evaluate(DATE_TEMPLATES[name], value, engine)
    assert type(info.value) is TemplateEvalError
    assert f"fn:{name}:" in info.value.message


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("text", "zone", "expected"),
    [
        ("2026-11-24 09:12:33", "Europe/Amsterdam", "2026-11-24 10:12"),
        ("2026-11-24T10:12:33+01:00", "Europe/Amsterdam", "2026-11-24 10:12"),
        ("2026-11-24T03:42:33-05:30", "America/New_York", "2026-11-24 04:12"),
        ("2026-11-24T23:30:00-01:00", "Asia/Tokyo", "2026-11-25 09:30"),
    ],
)
def test_format_date_converts_an_offset_to_the_zone(text: str, zone: str, expected: str, engine: str) -> None:
    template = f"${{fn:formatDate(d, '%Y-%m-%d %H:%M', '{zone}')}}"
    assert _evaluate(template, text, engine) == expected


_OFFSETS = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


@given(
    local=st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9998, 12, 30), timezones=_OFFSETS),
    xelion=st.booleans(),
)
def test_any_instant_reads_the_same_in_every_form(local: datetime, xelion: bool) -> None:
    # isoformat() writes an offset and up to six fractional digits; the Xelion form writes UTC.
    instant = local.astimezone(UTC)
    text = instant.strftime("%Y-%m-%d %H:%M:%S.%f") if xelion else local.isoformat()
    for name, template in DATE_TEMPLATES.items():
        assert _evaluate(template, text, "closures") == _expected(name, instant), (name, text)


def test_a_delivery_with_an_iso_date_renders() -> None:
    mapping = compile_mapping(
        MappingSpec(
            xelion_event="callHungUpEvent",
            crm_resource_uri="https://crm.example.org/calls?start=${fn:epochSeconds(date)}",
            crm_resource_payload={"start": "${fn:isoUtc(date)}", "startMillis": "${fn:epochMillis(date)}"},
        )
    )
    ctx = RenderContext(event={"date": "2026-11-24T10:12:33.250+01:00"}, xelion_event="callHungUpEvent")
    request = mapping.render(ctx)
    assert request.url == "https://crm.example.org/calls?start=1795511553"
    assert request.body is not None
    assert json.loads(request.body) == {"start": "2026-11-24T09:12:33Z", "startMillis": 1795511553250}


def test_a_pattern_the_c_library_cannot_format_is_an_error_not_an_empty_field() -> None:
    """glibc's strftime gives up on what its buffer cannot hold (``%99999Y``) and Python returned
    "" with no error: the CRM got an empty date. It is an evaluation error naming the pattern."""
    with pytest.raises(TemplateEvalError, match="cannot format with '%99999Y'"):
        compile_template("${fn:formatDate(d, '%99999Y')}").render({"d": "2026-11-24 09:14:02"})
    assert compile_template("${fn:formatDate(d, '')}").render({"d": "2026-11-24 09:14:02"}) == ""
    assert compile_template("${fn:formatDate(d, '%Y')}").render({"d": "2026-11-24 09:14:02"}) == "2026"


@pytest.mark.parametrize("engine", ENGINES)
def test_add_seconds_gives_the_calls_start_from_its_hang_up(engine: str) -> None:
    """What CRMs ask for and Xelion does not send (Pipedrive's start_time, Zoho's Call_Start_Time,
    Dynamics' actualstart): the hang-up's ``date`` less its ``duration``, in any date function."""
    event = {"date": "2026-01-05 09:14:02", "duration": 89}

    def render(template: str) -> object:
        return compile_template(template, engine=engine).evaluate(event)  # type: ignore[arg-type]

    assert render("${fn:addSeconds(date, -duration)}") == "2026-01-05 09:12:33"
    assert render("${fn:isoUtc(fn:addSeconds(date, -duration))}") == "2026-01-05T09:12:33Z"
    assert render("${fn:epochMillis(fn:addSeconds(date, -duration))}") == 1767604353000
    assert render("${fn:formatDate(fn:addSeconds(date, 3600), '%H:%M', 'Europe/Amsterdam')}") == "11:14"
    assert render("${fn:addSeconds('2026-12-31 23:59:59', 1)}") == "2027-01-01 00:00:00"
    with pytest.raises(TemplateEvalError, match="fn:addSeconds: the result is outside years 1 to 9999"):
        render("${fn:addSeconds('0001-01-01 00:00:10', -duration)}")
    with pytest.raises(TemplateEvalError, match="fn:addSeconds: .* is not a date-time"):
        render("${fn:addSeconds(duration, 1)}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("pattern", "zone", "expected"),
    [
        ("%Y-%m-%dT%H:%M:%S%:z", "Asia/Kolkata", "2026-01-05T14:44:02+05:30"),  # Zoho's form
        ("%Y-%m-%dT%H:%M:%S%:z", "UTC", "2026-01-05T09:14:02+00:00"),
        ("%H:%M%:z", "America/St_Johns", "05:44-03:30"),
        ("%H:%M %:z %z", "Europe/Amsterdam", "10:14 +01:00 +0100"),
        ("100%%:z", "UTC", "100%:z"),  # an escaped percent sign stays one
    ],
)
def test_format_date_writes_the_offset_with_a_colon(
    pattern: str, zone: str, expected: str, engine: str
) -> None:
    """``%:z`` is Python 3.12's; on 3.11 strftime printed it as it stood ("%:z")."""
    template = f"${{fn:formatDate(d, '{pattern}', '{zone}')}}"
    assert _evaluate(template, "2026-01-05 09:14:02", engine) == expected
