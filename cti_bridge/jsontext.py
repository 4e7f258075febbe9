"""JSON text on the delivery path: orjson where its result is exactly the standard library's, the
standard library where it might not be.

Every event is read from its websocket frame, stored as compact JSON, hashed for its dedupe key,
read back when its deliveries are claimed, and every delivery's payload is written as JSON: five
times per event, the standard library took about 8 % of the daemon's CPU (``make bench``,
py-spy). orjson does the same work in a fifth of the time, but differs from ``json`` in a few
places, so each function here says what it is exactly equal to and takes the standard library's
path wherever orjson could differ:

- reading: orjson reads an integer beyond 64 bits as a float (``json`` keeps it exact). Text with
  a run of 19 or more digits (any such integer has one; a long number in a string too, which costs
  only the slower path) is read by ``json``. What orjson refuses (``NaN``, ``1e400``, a lone
  surrogate) goes to ``json`` too, which decides as before.
- writing: orjson prints a float below 1e-4 differently (``1e-05`` is ``0.00001``, ``1.5e-07`` is
  ``1.5e-7``); such text always holds a digit before ``e-``, or ``0.0000``, and then ``json``
  writes it (a string holding either costs only the slower path). What orjson refuses (a key
  that is not a string, an integer beyond 64 bits, a lone surrogate) is written by ``json``, and so
  is every value of a type other than the plain ones (``_OPTIONS``: a subclass, a date-time, a
  dataclass). orjson writes NaN and infinities as ``null`` (``json`` writes ``NaN``): text with a
  ``null`` in it is written by orjson only once a look through the value found no such float.

Two differences are left. orjson writes a UUID, and an Enum that is not also an int or a str, by
itself, where ``json`` refuses them (or, with ``default=str``, writes their ``str()``): no caller
passes either, since the values come from ``events.read_json`` and from templates. And nesting:
orjson reads 1,024 levels, ``json`` as many as the stack allows (about 990), so text nested
between the two is read where ``json`` raised ``RecursionError``; ``read_json`` raises
``ValueError`` for text nested deeper than either reads.

tests/unit/test_jsontext.py holds every function here to the standard library's result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson

#: Digits to "0", every other byte to a space: a run of 19 digits is then one ``in`` away.
_DIGITS: Final = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_RUN: Final = b"0" * 19

_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_COMPACT_STRICT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_CANONICAL: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)


def _has_long_number(text: str) -> bool:
    """Whether ``text`` holds a run of 19 or more ASCII digits (where orjson might read an integer
    as a float)."""
    return _LONG_RUN in text.encode("utf-8", "surrogatepass").translate(_DIGITS)


def loads(text: str, fallback: Callable[[str], Any] = json.loads) -> Any:
    """Exactly ``fallback(text)`` (``text`` a ``str``): ``json.loads``, or ``json.loads`` with hooks
    that read every number orjson reads as the same float (``events.read_json``'s)."""
    if not _has_long_number(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # json decides: it reads NaN, refuses what is not JSON with its own message
    return fallback(text)


#: orjson writes only the plain types itself: a subclass (an OrderedDict, whose order orjson does
#: not follow; a namedtuple, a float subclass, which it hands to ``default``), a date-time and a
#: dataclass go to ``_not_plain``, and so to ``json``, which writes them as it always did.
_OPTIONS: Final = (
    orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _not_plain(_obj: object) -> object:
    raise TypeError("not a plain JSON type: json writes it")


#: Types that hold no float: skipped by ``_finite`` without a call (an event's fields are mostly
#: these; the look takes 0.4 µs for the benchmark's eleven instead of 1.4 with a call each).
_NO_FLOAT: Final = frozenset({str, int, bool, type(None)})


def _finite(obj: object) -> bool:
    """Whether no float in ``obj`` is NaN or infinite (orjson writes those as ``null``)."""
    values: Iterable[object]
    if isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, list | tuple):
        values = obj
    elif isinstance(obj, float):
        return math.isfinite(obj)
    else:
        return True
    for v in values:  # noqa: SIM110 (a loop: all()'s generator cost as much as the look itself)
        if type(v) not in _NO_FLOAT and not _finite(v):
            return False
    return True


def _small_float(out: bytes) -> bool:
    """Whether orjson's text ``out`` may hold a float below 1e-4: a digit before ``e-``
    (``1.5e-7``; a word in a string, ``large-5`` or ``e-mail``, is not one), or ``0.0000``."""
    at = out.find(b"e-")
    while at > 0:
        if 48 <= out[at - 1] <= 57:
            return True
        at = out.find(b"e-", at + 2)
    return b"0.0000" in out


def _as_json_would(out: bytes, obj: object) -> bool:
    """Whether orjson's text ``out`` of ``obj`` is certainly what ``json`` writes: no small float
    in it, and no NaN or infinity behind a ``null``."""
    return not _small_float(out) and (b"null" not in out or _finite(obj))


def _dumps(obj: object, option: int, encoder: json.JSONEncoder) -> str:
    """Exactly ``encoder.encode(obj)``, through orjson (with ``option``) where that is the same."""
    try:
        out: bytes | None = orjson.dumps(obj, default=_not_plain, option=option)
    except orjson.JSONEncodeError:
        out = None  # json decides, outside this block: its error is not chained to orjson's
    if out is not None and _as_json_would(out, obj):
        return out.decode("utf-8")
    return encoder.encode(obj)


def compact(obj: object, *, allow_nan: bool = True) -> str:
    """Exactly ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)``
    (which raises ``ValueError`` for NaN or an infinity when ``allow_nan`` is false)."""
    return _dumps(obj, _OPTIONS, _COMPACT if allow_nan else _COMPACT_STRICT)


def canonical(obj: object) -> str:
    """Exactly ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=True,
    default=str)`` (``default=str`` for what json does not know, as ever)."""
    return _dumps(obj, _OPTIONS | orjson.OPT_SORT_KEYS, _CANONICAL)
