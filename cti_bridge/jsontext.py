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
  that is not a string, an integer beyond 64 bits, a lone surrogate, a date-time or dataclass) is
  written by ``json``.
  orjson writes NaN and infinities as ``null`` (``json`` writes ``NaN``): text with a ``null`` in
  it is written by orjson only once a look through the value found no such float.

The values are JSON's own types and their subclasses (dict, list, tuple, str, int, float, bool,
None), as every caller's are; orjson would also write a UUID or an Enum, which ``json`` refuses.

Both are pinned by tests/unit/test_jsontext.py against the standard library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any, Final

import orjson

#: Digits to "0", every other byte to a space: a run of 19 digits is then one ``in`` away.
_DIGITS: Final = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_RUN: Final = b"0" * 19

_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_COMPACT_STRICT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_CANONICAL: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)


def has_long_number(text: str) -> bool:
    """Whether ``text`` holds a run of 19 or more ASCII digits (where orjson might read an integer
    as a float)."""
    return _LONG_RUN in text.encode("utf-8", "surrogatepass").translate(_DIGITS)


def loads(text: str) -> Any:
    """Exactly ``json.loads(text)``."""
    if not has_long_number(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # json decides: it reads NaN, refuses what is not JSON with its own message
    return json.loads(text)


#: Date-times and dataclasses go to ``default`` (or fail), as with ``json``.
_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


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


def compact(obj: object, *, allow_nan: bool = True) -> str:
    """Exactly ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)``
    (which raises ``ValueError`` for NaN or an infinity when ``allow_nan`` is false)."""
    encoder = _COMPACT if allow_nan else _COMPACT_STRICT
    try:
        out = orjson.dumps(obj, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return encoder.encode(obj)
    return out.decode("utf-8") if _as_json_would(out, obj) else encoder.encode(obj)


def canonical(obj: object) -> str:
    """Exactly ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=True,
    default=str)``."""
    try:
        out = orjson.dumps(obj, default=str, option=_OPTIONS | orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return _CANONICAL.encode(obj)
    return out.decode("utf-8") if _as_json_would(out, obj) else _CANONICAL.encode(obj)
