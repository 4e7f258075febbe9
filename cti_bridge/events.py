"""Xelion call notifications as data: parsing, parties, deduplication keys. Pure, no I/O.

The websocket source hands every frame it reads to :func:`parse_notification`; the pipeline uses
:func:`parties` to find the Xelion users an event belongs to and :func:`dedupe_key` to record the
attended-transfer double hang-up once (xelion-protocol.md §4).

Parsing is tolerant on purpose (xelion-protocol.md §3.4): a frame of any other shape (a ``test``
echo, non-JSON, no ``notificationType``, a call event without ``callId``) yields ``None`` and a debug
log line, never an exception. Every field the server sent is kept, known or not, because mapping
templates may name any of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cti_bridge.jsontext import canonical, loads

logger = logging.getLogger(__name__)

#: The notification types that describe a call; all of them carry a ``callId`` (xelion-protocol.md §4).
CALL_EVENT_TYPES: frozenset[str] = frozenset(
    {"newCallEvent", "callConnectedEvent", "callHungUpEvent", "missedCallEvent", "channelHungUpEvent"}
)

#: The fields a call event is documented to carry (xelion-protocol.md §4); Xelion may send more.
KNOWN_FIELDS: frozenset[str] = frozenset(
    {
        "callId",
        "initiation",
        "date",
        "callerPhoneNumber",
        "calleePhoneNumber",
        "callerUser",
        "calleeUser",
        "callerFlowId",
        "calleeFlowId",
        "duration",
    }
)

#: The fields of a call event that name an internal party, and the role each one gives.
_PARTY_FIELDS: tuple[tuple[str, str], ...] = (("caller", "callerUser"), ("callee", "calleeUser"))


@dataclass(frozen=True)
class ParsedNotification:
    """One ``{"notificationType": ..., "notification": {...}}`` frame (xelion-protocol.md §3.4).

    ``fields`` is the ``notification`` object exactly as the server sent it.
    """

    notification_type: str
    fields: dict[str, object] = field(default_factory=dict)

    @property
    def is_call_event(self) -> bool:
        return self.notification_type in CALL_EVENT_TYPES

    @property
    def call_id(self) -> str | None:
        value = self.fields.get("callId")
        if value is None:
            return None
        return str(value)


@dataclass(frozen=True)
class Party:
    """An internal party of a call: a Xelion user named by ``callerUser`` or ``calleeUser``.

    Xelion sends the user either as a user name string or as an object reference
    ``{"commonName", "oid", "objectType"}`` (xelion-protocol.md §4); whichever identifiers arrived are
    kept, so that users can be matched by ``userName``/``commonName`` or by ``oid``.
    """

    role: str  # "caller" | "callee"
    username: str | None
    oid: str | None
    common_name: str | None


def read_json(text: str) -> object:
    """JSON text read as the websocket's frames are: a number beyond a double kept as its text,
    ``NaN`` and ``Infinity`` as text too (``_finite_or_text``). ``ValueError`` if not JSON.

    orjson reads what it can read exactly as this (``jsontext.loads``: nothing it reads is beyond a
    double, and it refuses ``NaN``, ``Infinity`` and ``1e400``); the rest is read by ``json`` with
    the hooks. Text nested deeper than either reads (1,024 levels) is not a notification anyone can
    use: a ``ValueError`` as well, rather than the ``RecursionError`` that ended the websocket's
    session."""
    try:
        return loads(text, _read_with_hooks)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _read_with_hooks(text: str) -> object:
    return json.loads(text, parse_float=_finite_or_text, parse_constant=str)


def _finite_or_text(text: str) -> float | str:
    """A JSON number as a float, or its text when it is beyond a double (``1e400``): infinities and
    NaN (``NaN``, ``Infinity``, which Python's json reads too) would reach the templates, where no
    finite arithmetic or printing applies; as text they print as sent, and a number context refuses
    them with the template's own error."""
    value = float(text)
    return value if math.isfinite(value) else text


def parse_notification(frame: str | bytes) -> ParsedNotification | None:
    """Parse one websocket frame; ``None`` for anything that is not a notification we can use.

    Call events (:data:`CALL_EVENT_TYPES`) must carry a ``callId`` (a string, or a number that the
    server chose to send unquoted); other notification types are returned as they are, so the caller
    decides what to do with them.
    """
    if isinstance(frame, bytes | bytearray):
        try:
            frame = bytes(frame).decode("utf-8")
        except UnicodeDecodeError:
            logger.debug("ignored a binary frame that is not UTF-8 (%d bytes)", len(frame))
            return None
    try:
        data = read_json(frame)
    except ValueError:
        logger.debug("ignored a frame that is not JSON (%d characters)", len(frame))
        return None
    if not isinstance(data, dict):
        logger.debug("ignored a JSON frame that is not an object")
        return None
    notification_type = data.get("notificationType")
    if not isinstance(notification_type, str) or not notification_type:
        # Test echoes ({"messageType": "test", ...}) and anything else land here (§3.3, §3.4).
        logger.debug("ignored a frame without notificationType (keys: %s)", sorted(data)[:10])
        return None
    notification = data.get("notification")
    if notification is None:
        notification = {}
    if not isinstance(notification, dict):
        logger.debug("ignored a %s frame whose notification is not an object", notification_type)
        return None
    fields: dict[str, object] = {str(k): v for k, v in notification.items()}
    if notification_type in CALL_EVENT_TYPES:
        call_id = fields.get("callId")
        if isinstance(call_id, bool) or not isinstance(call_id, str | int) or call_id == "":
            logger.debug("ignored a %s frame without a usable callId", notification_type)
            return None
    return ParsedNotification(notification_type=notification_type, fields=fields)


def _opt_str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def parties(fields: Mapping[str, object]) -> list[Party]:
    """The internal parties of a call event, caller first; outside parties (null users) are left out.

    A user given as a string is a ``userName`` (xelion-protocol.md §4). A user given as an object
    reference contributes its ``oid`` and ``commonName`` (and a ``userName`` if the server added one).
    """
    result: list[Party] = []
    for role, key in _PARTY_FIELDS:
        value = fields.get(key)
        if isinstance(value, str):
            if value:
                result.append(Party(role=role, username=value, oid=None, common_name=None))
        elif isinstance(value, Mapping):
            username = _opt_str(value.get("userName"))
            oid = _opt_str(value.get("oid"))
            common_name = _opt_str(value.get("commonName"))
            if username or oid or common_name:
                result.append(Party(role=role, username=username, oid=oid, common_name=common_name))
    return result


#: A deduplication key begins with the event's ``callId``, at most this many characters of it.
DEDUPE_CALL_PREFIX = 31


def dedupe_key(xelion_context_id: int, notification_type: str, fields: Mapping[str, object]) -> str:
    """The deduplication key of an event (xelion-protocol.md §4, chosen): ``<callId>|<digest>``.

    The digest, the first 128 bits of a sha256 in hex, covers (integration, ``notificationType``,
    ``callId``, ``callerPhoneNumber``, ``calleePhoneNumber``), so the attended transfer's second
    A-B hang-up gets the same key as the first. The tuple is serialised as canonical JSON (no
    spaces, UTF-8) so the key is stable across processes and versions; absent fields count as
    ``null``.

    Why the ``callId`` in front (at most ``DEDUPE_CALL_PREFIX`` characters, as the ``call_id``
    column holds it): a Xelion callId begins with the call's start time (``1732443153.1021``), so
    keys of events received at about the same time sort together, and the unique index on the key
    takes a batch of new events at one place. A key that is a bare hash lands each event on a
    random page of that index: one page written per event, and once the index outgrows the cache,
    one page read. At most 31 + 1 + 32 = 64 characters, the column's width.
    """
    # Exactly ``json.dumps(..., separators=(",", ":"), ensure_ascii=False, sort_keys=True,
    # default=str)``, as every version wrote it (jsontext.py): the keys of stored events still match.
    text = canonical(
        [
            xelion_context_id,
            notification_type,
            fields.get("callId"),
            fields.get("callerPhoneNumber"),
            fields.get("calleePhoneNumber"),
        ]
    )
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    return f"{str(fields.get('callId') or '')[:DEDUPE_CALL_PREFIX]}|{digest}"


def normalise_fields(fields: Mapping[str, object]) -> dict[str, object]:
    """The fields templates see: every field the server sent, values unchanged (a deep copy).

    User references stay as they arrived (string, null or object) because templates may name them;
    matching users goes through :func:`parties` instead (xelion-protocol.md §4).
    """
    # Strings, numbers, booleans and null are immutable: only containers are copied (deepcopy's
    # dispatch cost about half a microsecond per scalar, and a notification is mostly scalars).
    return {str(k): v if type(v) in _IMMUTABLE else copy.deepcopy(v) for k, v in fields.items()}


_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


def parse_xelion_time(s: str) -> datetime:
    """Parse a Xelion date-time into a timezone-aware UTC datetime (the convention of clock.py).

    Accepts ``YYYY-MM-DD HH:MM:SS`` (UTC, no zone marker: xelion-protocol.md §1) and ISO-8601,
    with or without a zone (``Z`` or an offset, converted to UTC; no zone means UTC).
    Raises ``ValueError`` otherwise.
    """
    text = s.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except OverflowError:
        # An offset that carries year 1 or 9999 out of range in UTC: unreadable like any other.
        raise ValueError(f"{s!r} is out of range in UTC") from None
