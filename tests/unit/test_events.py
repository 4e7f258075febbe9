"""Parsing Xelion notifications (xelion-protocol.md §3.4, §4): tolerance, parties, dedupe keys."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cti_bridge import jsontext
from cti_bridge.events import (
    CALL_EVENT_TYPES,
    Party,
    dedupe_key,
    normalise_fields,
    parse_notification,
    parse_xelion_time,
    parties,
)
from cti_bridge.store.deliveries import payload_text

NEW_CALL = {
    "notificationType": "newCallEvent",
    "notification": {
        "callId": "1732443153.1021",
        "initiation": "incoming",
        "date": "2026-11-24 09:12:33",
        "callerPhoneNumber": "+31612345678",
        "calleePhoneNumber": "+31152511411",
        "callerUser": None,
        "calleeUser": "anne",
        "callerFlowId": None,
        "calleeFlowId": "f-77812",
    },
}


def test_call_event_types() -> None:
    assert CALL_EVENT_TYPES == {
        "newCallEvent",
        "callConnectedEvent",
        "callHungUpEvent",
        "missedCallEvent",
        "channelHungUpEvent",
    }


def test_the_protocol_example_parses_with_every_field() -> None:
    parsed = parse_notification(json.dumps(NEW_CALL))
    assert parsed is not None
    assert parsed.notification_type == "newCallEvent"
    assert parsed.is_call_event
    assert parsed.call_id == "1732443153.1021"
    assert parsed.fields == NEW_CALL["notification"]


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        ("not json", "not JSON"),
        (b"\xff\xfe", "binary, not UTF-8"),
        ("[1, 2]", "JSON but not an object"),
        ('"newCallEvent"', "a bare string"),
        ('{"messageType": "test", "id": 7}', "a test echo"),
        ('{"notification": {"callId": "1"}}', "no notificationType"),
        ('{"notificationType": "", "notification": {"callId": "1"}}', "empty notificationType"),
        ('{"notificationType": 5, "notification": {"callId": "1"}}', "notificationType not a string"),
        ('{"notificationType": "newCallEvent", "notification": {"date": "x"}}', "call event without callId"),
        ('{"notificationType": "callHungUpEvent", "notification": {"callId": ""}}', "empty callId"),
        ('{"notificationType": "callHungUpEvent", "notification": {"callId": null}}', "null callId"),
        ('{"notificationType": "missedCallEvent", "notification": {"callId": true}}', "boolean callId"),
        ('{"notificationType": "newCallEvent", "notification": "text"}', "notification not an object"),
        ('{"notificationType": "newCallEvent"}', "call event without a notification"),
    ],
)
def test_frames_of_other_shapes_are_ignored(frame: str | bytes, why: str) -> None:
    assert parse_notification(frame) is None, why


@pytest.mark.parametrize(
    ("frame", "expected_type", "expected_fields"),
    [
        (
            json.dumps(NEW_CALL).encode(),
            "newCallEvent",
            NEW_CALL["notification"],
        ),
        (
            '{"notificationType": "callHungUpEvent", "notification": {"callId": "c", "duration": 89,'
            ' "brandNewField": {"nested": [1, 2]}, "x": null}}',
            "callHungUpEvent",
            {"callId": "c", "duration": 89, "brandNewField": {"nested": [1, 2]}, "x": None},
        ),
        (
            '{"notificationType": "newCallEvent", "notification": {"callId": 1732443153},'
            ' "extraTopLevel": true}',
            "newCallEvent",
            {"callId": 1732443153},
        ),
        ('{"notificationType": "presenceEvent"}', "presenceEvent", {}),
        (
            '{"notificationType": "callConnectedEvent", "notification": {"callId": "c", "calleeUser":'
            ' {"commonName": "Anne Hunter", "oid": "1556377", "objectType": "User"}}}',
            "callConnectedEvent",
            {
                "callId": "c",
                "calleeUser": {"commonName": "Anne Hunter", "oid": "1556377", "objectType": "User"},
            },
        ),
    ],
)
def test_usable_frames_keep_every_field(
    frame: str | bytes, expected_type: str, expected_fields: dict[str, object]
) -> None:
    parsed = parse_notification(frame)
    assert parsed is not None
    assert parsed.notification_type == expected_type
    assert parsed.fields == expected_fields


def test_numeric_call_id_is_read_as_text() -> None:
    parsed = parse_notification('{"notificationType": "newCallEvent", "notification": {"callId": 42}}')
    assert parsed is not None and parsed.call_id == "42" and parsed.fields["callId"] == 42


def test_non_call_notifications_are_not_call_events() -> None:
    parsed = parse_notification('{"notificationType": "presenceEvent", "notification": {"user": "anne"}}')
    assert parsed is not None and not parsed.is_call_event and parsed.call_id is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"callerUser": None, "calleeUser": "anne"}, [Party("callee", "anne", None, None)]),
        (
            {"callerUser": "bob", "calleeUser": "anne"},
            [Party("caller", "bob", None, None), Party("callee", "anne", None, None)],
        ),
        ({"callerUser": None, "calleeUser": None}, []),
        ({}, []),
        ({"callerUser": "", "calleeUser": 7}, []),
        (
            {"callerUser": {"commonName": "Anne Hunter", "oid": "1556377", "objectType": "User"}},
            [Party("caller", None, "1556377", "Anne Hunter")],
        ),
        (
            {"calleeUser": {"commonName": "Bob", "oid": 1650938, "userName": "bob"}},
            [Party("callee", "bob", "1650938", "Bob")],
        ),
        ({"calleeUser": {"objectType": "User"}}, []),
    ],
)
def test_parties(fields: dict[str, object], expected: list[Party]) -> None:
    assert parties(fields) == expected


def test_dedupe_key_is_the_call_and_the_sha256_of_the_canonical_tuple() -> None:
    fields = {
        "callId": "1732443153.1021",
        "callerPhoneNumber": "+31612345678",
        "calleePhoneNumber": "+31152511411",
        "date": "2026-11-24 09:14:02",
        "duration": 89,
    }
    canonical = '[7,"callHungUpEvent","1732443153.1021","+31612345678","+31152511411"]'
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    assert dedupe_key(7, "callHungUpEvent", fields) == "1732443153.1021|" + digest[:32]


def test_dedupe_keys_of_calls_started_one_after_another_sort_together() -> None:
    """The key leads with the callId (which leads with the call's start time), cut to fit the
    64-character column; keys made in call order are in index order."""
    call_ids = [f"17324431{n:02d}.{1000 + n}" for n in range(40)]
    keys = [dedupe_key(1, "newCallEvent", {"callId": c}) for c in call_ids]
    assert keys == sorted(keys)
    long_id = "x" * 100
    key = dedupe_key(1, "newCallEvent", {"callId": long_id})
    assert key.startswith("x" * 31 + "|") and len(key) == 64
    # The digest still covers the whole callId: two long ids with the same start differ.
    assert key != dedupe_key(1, "newCallEvent", {"callId": long_id + "y"})
    assert dedupe_key(1, "newCallEvent", {}).startswith("|")  # no callId: an empty prefix


def test_dedupe_key_stability_and_what_it_covers() -> None:
    base = {
        "callId": "c1",
        "callerPhoneNumber": "+1",
        "calleePhoneNumber": "+2",
        "date": "2026-11-24 09:00:00",
    }
    key = dedupe_key(1, "callHungUpEvent", base)
    # The attended transfer's second hang-up differs only in fields outside the key: same key.
    assert dedupe_key(1, "callHungUpEvent", {**base, "date": "2026-11-24 09:00:01", "duration": 3}) == key
    # Order of fields does not matter.
    assert dedupe_key(1, "callHungUpEvent", dict(reversed(list(base.items())))) == key
    # Every element of the key matters.
    assert dedupe_key(2, "callHungUpEvent", base) != key
    assert dedupe_key(1, "newCallEvent", base) != key
    assert dedupe_key(1, "callHungUpEvent", {**base, "callId": "c2"}) != key
    assert dedupe_key(1, "callHungUpEvent", {**base, "callerPhoneNumber": "+3"}) != key
    assert dedupe_key(1, "callHungUpEvent", {**base, "calleePhoneNumber": "+3"}) != key
    # Absent numbers count as null, and are not the same as empty strings.
    no_numbers = {"callId": "c1"}
    assert dedupe_key(1, "missedCallEvent", no_numbers) == dedupe_key(
        1, "missedCallEvent", {"callId": "c1", "x": 1}
    )
    assert dedupe_key(1, "missedCallEvent", no_numbers) != dedupe_key(
        1, "missedCallEvent", {"callId": "c1", "callerPhoneNumber": "", "calleePhoneNumber": ""}
    )
    prefix, _, digest = key.partition("|")
    assert prefix == "c1" and len(digest) == 32 and int(digest, 16) >= 0


def test_normalise_fields_keeps_everything_and_copies() -> None:
    ref = {"commonName": "Anne Hunter", "oid": "1556377", "objectType": "User"}
    fields: dict[str, object] = {"callId": "c", "calleeUser": ref, "unknown": [1]}
    normalised = normalise_fields(fields)
    assert normalised == fields
    ref["oid"] = "changed"
    assert normalised["calleeUser"] == {"commonName": "Anne Hunter", "oid": "1556377", "objectType": "User"}
    fields["unknown"].append(2)  # type: ignore[attr-defined]
    assert normalised["unknown"] == [1]  # lists are copied too; scalars need not be


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-24 09:12:33", datetime(2026, 11, 24, 9, 12, 33, tzinfo=UTC)),
        ("2026-11-24T09:12:33", datetime(2026, 11, 24, 9, 12, 33, tzinfo=UTC)),
        ("2026-11-24T09:12:33Z", datetime(2026, 11, 24, 9, 12, 33, tzinfo=UTC)),
        ("2026-11-24T10:12:33+01:00", datetime(2026, 11, 24, 9, 12, 33, tzinfo=UTC)),
        ("2026-11-24T09:12:33.250Z", datetime(2026, 11, 24, 9, 12, 33, 250000, tzinfo=UTC)),
    ],
)
def test_parse_xelion_time(text: str, expected: datetime) -> None:
    parsed = parse_xelion_time(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2026-13-01 00:00:00",
        "24-11-2026 09:12",
        # Out of range once in UTC: a ValueError too (rest.py's validUntil catches only that).
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00+01:00",
    ],
)
def test_parse_xelion_time_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_xelion_time(text)


def test_parse_xelion_time_converts_other_zones() -> None:
    local = datetime(2026, 11, 24, 4, 12, 33, tzinfo=timezone(timedelta(hours=-5)))
    assert parse_xelion_time(local.isoformat()) == datetime(2026, 11, 24, 9, 12, 33, tzinfo=UTC)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500)
@given(fields=st.dictionaries(st.text(), _JSON, max_size=8))
def test_the_shared_encoders_write_what_json_dumps_wrote(fields: dict[str, object]) -> None:
    """Dedupe keys must stay the same across versions (a key written by the previous version must
    match the same event received again), and stored payloads as they were: the encoders kept
    for every event write exactly what ``json.dumps`` with the same options did."""
    canonical = [7, "callHungUpEvent", fields.get("callId"), fields, None]
    assert jsontext.canonical(canonical) == json.dumps(
        canonical, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str
    )
    assert payload_text(fields) == json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
