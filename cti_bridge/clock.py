"""Time in one place: timezone-aware UTC datetimes, and an injectable clock for tests.

SQLModel's ``UTCDateTime`` columns refuse naive datetimes and hand back aware UTC ones on SQLite
and PostgreSQL alike, so every timestamp the code writes comes from here.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

XELION_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def xelion_time(dt: datetime) -> str:
    """Format a datetime the way Xelion does: ``YYYY-MM-DD HH:MM:SS`` in UTC, no zone marker."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    return dt.strftime(XELION_TIME_FORMAT)


class Clock(Protocol):
    """What the daemon asks of time; tests pass a fake one to step through schedules."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return utcnow()

    def monotonic(self) -> float:
        return time.monotonic()
