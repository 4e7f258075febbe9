"""The ``fn:`` functions a template may call: JSTL's string functions and what CRMs need.

These, with the operators of ``semantics``, are the only code a template can reach. Arguments arrive
as EL values and are coerced as EL coerces arguments to a Java ``String``/``int`` parameter (null is
"" or 0). No function reads a clock, a file or the network, with one bounded exception: ``formatDate``
resolves an IANA zone name (checked against a strict pattern first) through ``zoneinfo``, which reads
the system's time-zone database. The date functions parse with ``cti_bridge.events.parse_xelion_time``
(pure), so a template reads a date-time exactly as the rest of the bridge does.

Every string a function builds is bounded by the 64 KiB rule before it is built (``fn:replace``
computes the length of its result first), so nesting functions cannot blow up memory or time.

Deviations from JSTL/Java: ``fn:length`` and ``fn:indexOf`` count Unicode code points (Java counts
UTF-16 units); ``fn:toUpperCase``/``fn:toLowerCase`` use Unicode's locale-independent mapping.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Final
from urllib.parse import quote
from zoneinfo import ZoneInfo

import phonenumbers

from cti_bridge.el.errors import RenderError, TemplateEvalError
from cti_bridge.el.semantics import JAVA_TRIM, describe, empty, to_long, to_str
from cti_bridge.events import parse_xelion_time

MAX_STRING: Final = 65536
VARIADIC: Final = 255

#: Namespace of ``fn:uuid5``: uuid5(NAMESPACE_URL, "https://cti-bridge.invalid/el/fn/uuid5").
#: Fixed forever: changing it would change every id a CRM has upserted by.
UUID5_NAMESPACE: Final = uuid.UUID("9fadc317-1608-556f-ac5d-35db5cf0af5e")


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    impl: Callable[..., object]
    min_args: int
    max_args: int


def _bounded(text: str, name: str) -> str:
    if len(text) > MAX_STRING:
        raise RenderError(f"fn:{name} result longer than 64 KiB")
    return text


def _int_arg(value: object) -> int:
    return to_long(value)


# -- JSTL ---------------------------------------------------------------------------------------------


def fn_length(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, str | list | tuple | Mapping):
        return len(value)
    raise TemplateEvalError(f"fn:length cannot measure {describe(value)}")


def fn_to_upper_case(value: object) -> str:
    return _bounded(to_str(value).upper(), "toUpperCase")


def fn_to_lower_case(value: object) -> str:
    return _bounded(to_str(value).lower(), "toLowerCase")


def fn_trim(value: object) -> str:
    # String.trim removes every character up to U+0020, not Unicode white space.
    return to_str(value).strip(JAVA_TRIM)


def fn_substring(value: object, begin: object, end: object) -> str:
    text = to_str(value)
    b = _int_arg(begin)
    e = _int_arg(end)
    b = max(b, 0)
    if e < 0 or e > len(text):
        e = len(text)
    if e < b:
        return ""
    return text[b:e]


def fn_substring_before(value: object, sub: object) -> str:
    text = to_str(value)
    index = text.find(to_str(sub))
    return "" if index < 0 else text[:index]


def fn_substring_after(value: object, sub: object) -> str:
    text = to_str(value)
    needle = to_str(sub)
    index = text.find(needle)
    return "" if index < 0 else text[index + len(needle) :]


def fn_replace(value: object, before: object, after: object) -> str:
    text = to_str(value)
    old = to_str(before)
    new = to_str(after)
    if not text or not old:  # JSTL: an empty input or an empty search string returns the input
        return text
    count = text.count(old)
    if len(text) + count * (len(new) - len(old)) > MAX_STRING:
        raise RenderError("fn:replace result longer than 64 KiB")
    return text.replace(old, new)


def fn_contains(value: object, sub: object) -> bool:
    return to_str(sub) in to_str(value)


def fn_contains_ignore_case(value: object, sub: object) -> bool:
    return to_str(sub).upper() in to_str(value).upper()


def fn_starts_with(value: object, prefix: object) -> bool:
    return to_str(value).startswith(to_str(prefix))


def fn_ends_with(value: object, suffix: object) -> bool:
    return to_str(value).endswith(to_str(suffix))


def fn_index_of(value: object, sub: object) -> int:
    return to_str(value).find(to_str(sub))


_XML_ESCAPES: Final = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#034;", "'": "&#039;"})


def fn_escape_xml(value: object) -> str:
    return _bounded(to_str(value).translate(_XML_ESCAPES), "escapeXml")


# -- what CRMs need ------------------------------------------------------------------------------------


def _parse_phone(number: object, region: object) -> phonenumbers.PhoneNumber | None:
    text = to_str(number)
    if not text or len(text) > 64:
        return None
    region_code = to_str(region).upper() or None
    try:
        parsed = phonenumbers.parse(text, region_code)
    except phonenumbers.NumberParseException:
        return None
    # An internal extension ("201") parses, but is no possible number: "+31201" would be a false
    # E.164 number for the CRM to match. It stays as it is, like any unparseable input.
    return parsed if phonenumbers.is_possible_number(parsed) else None


def fn_e164(number: object, region: object = None) -> str:
    """``+31612345678`` from ``0612345678`` with region ``NL``; the input unchanged if unparseable."""
    parsed = _parse_phone(number, region)
    if parsed is None:
        return to_str(number)
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def fn_national(number: object, region: object = None) -> str:
    """The national significant number (``612345678``); the input unchanged if unparseable."""
    parsed = _parse_phone(number, region)
    if parsed is None:
        return to_str(number)
    return str(phonenumbers.national_significant_number(parsed))


def fn_digits(value: object) -> str:
    return "".join(c for c in to_str(value) if "0" <= c <= "9")


_ZONE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]{0,30}(?:/[A-Za-z0-9_+\-]{1,30}){0,3}")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _parse_date(value: object, name: str) -> datetime:
    """A Xelion date-time as an aware UTC datetime, fractional seconds kept (to the microsecond).

    ``YYYY-MM-DD HH:MM:SS`` is UTC; ISO-8601 is accepted as well (xelion-protocol.md §1): an offset
    is converted to UTC, no zone means UTC.
    """
    try:
        return parse_xelion_time(to_str(value))
    except ValueError:
        raise TemplateEvalError(
            f"fn:{name}: {describe(value)} is not a date-time (YYYY-MM-DD HH:MM:SS or ISO-8601)"
        ) from None


def _zone(value: object) -> tzinfo:
    name = to_str(value)
    if name in ("", "UTC", "Z"):
        return UTC
    # The pattern keeps the key a plain IANA name: no path, no '..', nothing zoneinfo would read
    # outside its database.
    if not _ZONE_RE.fullmatch(name) or ".." in name:
        raise TemplateEvalError(f"fn:formatDate: {describe(value)} is not an IANA time zone")
    try:
        return ZoneInfo(name)
    except (ValueError, OSError, LookupError):
        raise TemplateEvalError(f"fn:formatDate: unknown time zone {name!r}") from None


# ``%:z`` (Python 3.12's UTC offset with a colon, ``+05:30``, as Zoho and ISO-8601 write it) on 3.11
# too; ``%%`` is matched first so that ``%%:z`` stays the literal text it means.
_COLON_OFFSET: Final = re.compile(r"%%|%:z")


def _colon_offset(local: datetime) -> str:
    offset = local.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(offset) // timedelta(minutes=1)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def fn_format_date(value: object, pattern: object, zone: object = None) -> str:
    when = _parse_date(value, "formatDate")
    fmt = to_str(pattern)
    if len(fmt) > 1024:
        raise TemplateEvalError("fn:formatDate: pattern longer than 1024 characters")
    local = when.astimezone(_zone(zone))
    if "%:z" in fmt:
        fmt = _COLON_OFFSET.sub(lambda m: "%%" if m.group() == "%%" else _colon_offset(local), fmt)
    try:
        out = local.strftime(fmt)
    except (ValueError, OverflowError):
        out = ""
    if not out and fmt:
        # The C library's strftime gives up on what its buffer cannot hold (glibc's width flags,
        # "%99999Y") and Python then returns "" with no error: an empty field sent as if it were
        # the date.
        raise TemplateEvalError(f"fn:formatDate: cannot format with {fmt[:40]!r}")
    return _bounded(out, "formatDate")


def fn_iso_utc(value: object) -> str:
    """``2026-11-24T09:12:33Z``: whole seconds (el-templates.md §5); a fraction is dropped."""
    when = _parse_date(value, "isoUtc")
    # Not strftime's %Y, which does not pad years before 1000 on glibc ("1-01-01T...").
    return f"{when.year:04d}-{when:%m-%dT%H:%M:%S}Z"


# Exact integers, not the float timestamp(): floor division rounds down before 1970 too, as Java's
# Instant.toEpochMilli does, so epochSeconds always names the second isoUtc prints.
def fn_epoch_seconds(value: object) -> int:
    return (_parse_date(value, "epochSeconds") - _EPOCH) // timedelta(seconds=1)


def fn_epoch_millis(value: object) -> int:
    return (_parse_date(value, "epochMillis") - _EPOCH) // timedelta(milliseconds=1)


def fn_add_seconds(value: object, seconds: object) -> str:
    """``value`` moved by ``seconds`` (whole, negative for earlier), in Xelion's own form
    (``YYYY-MM-DD HH:MM:SS``, UTC; a fraction kept as ``.ffffff``), so every date function reads it.
    The call's start from its hang-up: ``fn:addSeconds(date, -duration)`` (Pipedrive's start_time,
    Zoho's Call_Start_Time, Dynamics' actualstart)."""
    when = _parse_date(value, "addSeconds")
    try:
        moved = when + timedelta(seconds=to_long(seconds))
    except OverflowError:
        raise TemplateEvalError("fn:addSeconds: the result is outside years 1 to 9999") from None
    text = f"{moved.year:04d}-{moved:%m-%d %H:%M:%S}"
    return f"{text}.{moved.microsecond:06d}" if moved.microsecond else text


def fn_mmss(value: object) -> str:
    """``01:29`` from 89; minutes beyond two digits are not wrapped (``62:05``)."""
    seconds = to_long(value)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    return f"{sign}{seconds // 60:02d}:{seconds % 60:02d}"


def fn_hhmmss(value: object) -> str:
    """``00:01:29`` from 89; hours beyond two digits are not wrapped."""
    seconds = to_long(value)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    return f"{sign}{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fn_url_encode(value: object) -> str:
    return _bounded(quote(to_str(value), safe=""), "urlEncode")


def fn_coalesce(*values: object) -> object:
    """The first value that is neither null nor empty, else null."""
    for value in values:
        if not empty(value):
            return value
    return None


def fn_uuid5(value: object) -> str:
    return str(uuid.uuid5(UUID5_NAMESPACE, to_str(value)))


FUNCTIONS: Final[Mapping[str, FunctionSpec]] = {
    "length": FunctionSpec(fn_length, 1, 1),
    "toUpperCase": FunctionSpec(fn_to_upper_case, 1, 1),
    "toLowerCase": FunctionSpec(fn_to_lower_case, 1, 1),
    "trim": FunctionSpec(fn_trim, 1, 1),
    "substring": FunctionSpec(fn_substring, 3, 3),
    "substringBefore": FunctionSpec(fn_substring_before, 2, 2),
    "substringAfter": FunctionSpec(fn_substring_after, 2, 2),
    "replace": FunctionSpec(fn_replace, 3, 3),
    "contains": FunctionSpec(fn_contains, 2, 2),
    "containsIgnoreCase": FunctionSpec(fn_contains_ignore_case, 2, 2),
    "startsWith": FunctionSpec(fn_starts_with, 2, 2),
    "endsWith": FunctionSpec(fn_ends_with, 2, 2),
    "indexOf": FunctionSpec(fn_index_of, 2, 2),
    "escapeXml": FunctionSpec(fn_escape_xml, 1, 1),
    "e164": FunctionSpec(fn_e164, 1, 2),
    "national": FunctionSpec(fn_national, 1, 2),
    "digits": FunctionSpec(fn_digits, 1, 1),
    "formatDate": FunctionSpec(fn_format_date, 2, 3),
    "isoUtc": FunctionSpec(fn_iso_utc, 1, 1),
    "epochMillis": FunctionSpec(fn_epoch_millis, 1, 1),
    "epochSeconds": FunctionSpec(fn_epoch_seconds, 1, 1),
    "addSeconds": FunctionSpec(fn_add_seconds, 2, 2),
    "mmss": FunctionSpec(fn_mmss, 1, 1),
    "hhmmss": FunctionSpec(fn_hhmmss, 1, 1),
    "urlEncode": FunctionSpec(fn_url_encode, 1, 1),
    "coalesce": FunctionSpec(fn_coalesce, 1, VARIADIC),
    "uuid5": FunctionSpec(fn_uuid5, 1, 1),
}
