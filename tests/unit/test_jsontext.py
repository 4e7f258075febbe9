"""jsontext.py against the standard library it stands in for: every function gives exactly what
``json`` gives (the same objects read, the same text written), including where orjson alone would
not (integers beyond 64 bits, small floats, NaN, lone surrogates, keys that are not strings)."""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import math
import random
import struct
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as settings_h
from hypothesis import strategies as st

from cti_bridge import jsontext
from cti_bridge.events import _finite_or_text, dedupe_key, parse_notification, read_json

COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
STRICT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)

# Where orjson alone differs from json: each of these takes the standard library's path.
EDGE_TEXTS = [
    "12345678901234567890123",  # an integer beyond 64 bits: orjson reads a float
    "-9223372036854775809",  # one below int64: orjson reads a float
    '{"a": 18446744073709551616}',
    "NaN",
    '{"a": Infinity, "b": -Infinity}',
    "1e400",
    '{"a": "\\ud800"}',  # a lone surrogate: orjson refuses it
    '{"callId": "1732443153.1021", "n": 1.5e-7, "m": 1e-05}',
    '{"a": 1, "a": 2, "b": [1.0, -0.0, 0, 1E5]}',
    '"\\ud83d\\ude00"',
    "[]",
]
BAD_TEXTS = ["", "{", '{"a": 1} x', "\ufeff{}", '{"a": "x\ny"}', "01", "[1,]", "nul"]


# Python values JSON text becomes, floats across their whole range, and (for writing) NaN and
# infinities, which json writes as NaN and Infinity.
def json_values(*, finite: bool) -> st.SearchStrategy[object]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**80), max_value=2**80)
        | st.floats(allow_nan=not finite, allow_infinity=not finite)
        | st.text()
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.tuples(inner, inner)
            | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        ),
        max_leaves=12,
    )


def same(a: object, b: object) -> bool:
    """Equal, of the same types throughout (1 == 1.0 == True would hide a changed type), in the
    same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    if isinstance(a, float):
        return struct.pack("d", a) == struct.pack("d", b)  # type: ignore[arg-type]  # -0.0, NaN
    return a == b


def stdlib_read_json(text: str) -> object:
    return json.loads(text, parse_float=_finite_or_text, parse_constant=str)


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_loads_and_read_json_read_what_json_reads(text: str) -> None:
    assert same(jsontext.loads(text), json.loads(text))
    assert same(read_json(text), stdlib_read_json(text))


def test_a_long_integer_stays_an_integer() -> None:
    # orjson alone would make it a float, and the event would carry another number.
    assert isinstance(orjson.loads("12345678901234567890123"), float)
    assert jsontext.loads("12345678901234567890123") == 12345678901234567890123
    assert read_json('{"n": -9223372036854775809}') == {"n": -9223372036854775809}


@pytest.mark.parametrize("text", BAD_TEXTS)
def test_what_json_refuses_is_refused_with_its_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        jsontext.loads(text)
    assert (got.value.msg, got.value.lineno, got.value.colno) == (
        expected.value.msg,
        expected.value.lineno,
        expected.value.colno,
    )
    with pytest.raises(ValueError):
        read_json(text)


@settings_h(max_examples=400, deadline=None)
@given(json_values(finite=True))
def test_text_of_any_value_reads_back_as_json_reads_it(value: object) -> None:
    text = json.dumps(value)
    assert same(jsontext.loads(text), json.loads(text))
    assert same(read_json(text), stdlib_read_json(text))


@settings_h(max_examples=400, deadline=None)
@given(json_values(finite=False))
def test_compact_and_canonical_write_what_json_writes(value: object) -> None:
    assert jsontext.compact(value) == COMPACT.encode(value)
    try:
        strict: str | None = STRICT.encode(value)
    except ValueError:
        strict = None
    if strict is None:
        with pytest.raises(ValueError):
            jsontext.compact(value, allow_nan=False)
    else:
        assert jsontext.compact(value, allow_nan=False) == strict
    assert jsontext.canonical(value) == CANONICAL.encode(value)


def test_floats_of_every_magnitude_are_written_as_json_writes_them() -> None:
    rng = random.Random(7)
    values: list[float] = []
    while len(values) < 20_000:
        f = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
        if math.isfinite(f):
            values.append(f)
    values += [k * 10.0**e for k in (1, 15, 99) for e in range(-30, 30)]
    values += [1e-4, 9.999e-5, 1e16, 1e15, 0.1, -0.0, 5e-324]
    for f in values:
        assert jsontext.compact([f]) == COMPACT.encode([f]), f
    # The guard is what makes it so: orjson's own text differs for small floats.
    assert orjson.dumps(1e-05) != json.dumps(1e-05).encode()
    assert jsontext.compact({"a": 1e-05, "b": 1.5e-07}) == '{"a":1e-05,"b":1.5e-07}'


def test_words_in_strings_keep_orjson_s_path() -> None:
    # "large-5", "e-mail": no float, so orjson's text stands (the slower path only for a digit
    # before "e-", as in 1.5e-7, or for 0.0000).
    for text in (b'{"callId":"large-5","a":"e-mail","b":null}', b'["e-","x e-1"]'):
        assert not jsontext._small_float(text)
    for text in (b"[1.5e-7]", b'["5e-3"]', b"[0.00001]", b'{"a":0.0000}'):
        assert jsontext._small_float(text)
    assert jsontext._as_json_would(b'{"callId":"large-5","b":null}', {"callId": "large-5", "b": None})
    assert not jsontext._as_json_would(b'{"b":null}', {"b": math.nan})


def test_nan_and_infinities_are_written_as_json_writes_them() -> None:
    # orjson alone writes null for each, and the stored payload would say another thing.
    assert orjson.dumps([math.nan]) == b"[null]"
    value = {"a": None, "b": [1, {"c": math.inf}], "d": (-math.inf, math.nan)}
    assert jsontext.compact(value) == '{"a":null,"b":[1,{"c":Infinity}],"d":[-Infinity,NaN]}'
    with pytest.raises(ValueError, match="not JSON compliant"):  # as json's allow_nan=False
        jsontext.compact(value, allow_nan=False)
    with pytest.raises(ValueError, match="not JSON compliant"):
        jsontext.compact([math.nan], allow_nan=False)
    assert jsontext.compact({"a": None}, allow_nan=False) == '{"a":null}'
    assert jsontext.canonical(value) == CANONICAL.encode(value)
    assert jsontext.compact({"a": None, "b": 1.5}) == '{"a":null,"b":1.5}'


class Float(float):
    pass


class Number(enum.IntEnum):
    ONE = 1


class Word(enum.StrEnum):
    A = "a"


class Shown(list[int]):
    def __iter__(self) -> Iterator[int]:
        return iter([9])


def test_subclasses_and_other_types_are_written_as_json_writes_them() -> None:
    """A review's findings: orjson hands a float subclass and a namedtuple to ``default`` (str()
    of it in a dedupe key), writes an OrderedDict in its storage order, not its own, and a list
    subclass without its ``__iter__``: each now goes the standard library's way."""
    moved = collections.OrderedDict(a=1, b=2)
    moved.move_to_end("a")
    point = collections.namedtuple("point", "x y")(1, 2)
    values: list[object] = [
        [Float(math.nan), Float(2.5), True, {"k": Float(1e-07)}],
        Float(2.5),
        point,
        moved,
        {"n": Number.ONE, "w": Word.A},
        Shown([1, 2]),
    ]
    for value in values:
        assert jsontext.compact(value) == COMPACT.encode(value), value
        assert jsontext.canonical(value) == CANONICAL.encode(value), value
    assert jsontext.canonical(Float(2.5)) == "2.5" and jsontext.canonical(point) == "[1,2]"
    assert jsontext.compact(moved) == '{"b":2,"a":1}'
    at = datetime(2026, 12, 6, 13, 0, tzinfo=UTC)
    assert jsontext.canonical([at]) == CANONICAL.encode([at])  # str(at), not orjson's RFC 3339
    with pytest.raises(TypeError):
        jsontext.compact([at])


def test_text_nested_deeper_than_json_reads_is_not_json_to_read_json() -> None:
    # A frame nested 5,000 deep raised RecursionError out of parse_notification, which ended the
    # websocket's session; now it is a frame that is not JSON, and ignored.
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(deep)
    assert parse_notification('{"notificationType": "newCallEvent", "notification": ' + deep + "}") is None
    assert read_json("[" * 500 + "]" * 500) == json.loads("[" * 500 + "]" * 500)


def test_what_orjson_refuses_is_written_by_json() -> None:
    surrogate = {"a": "\ud800"}
    assert jsontext.compact(surrogate) == COMPACT.encode(surrogate)
    assert jsontext.compact({1: 2, None: 3}) == '{"1":2,"null":3}'
    assert jsontext.compact([2**70]) == f"[{2**70}]"
    assert jsontext.canonical({"b": object, "a": 2**70}) == CANONICAL.encode({"b": object, "a": 2**70})
    with pytest.raises(TypeError):
        jsontext.compact({"a": object()})


def test_the_dedupe_key_is_the_one_every_version_made() -> None:
    """Keys of stored events must still match: the digest over exactly json's canonical text."""
    fields = {"callId": "1732443153.1021", "callerPhoneNumber": "+31 6 1", "calleePhoneNumber": 1e-05}
    text = CANONICAL.encode([7, "newCallEvent", "1732443153.1021", "+31 6 1", 1e-05])
    assert dedupe_key(7, "newCallEvent", fields) == (
        "1732443153.1021|" + hashlib.sha256(text.encode()).hexdigest()[:32]
    )
