"""``deliveries.sqlite_datetime`` writes exactly the text SQLAlchemy's own bind processor for the
``UTCDateTime`` columns writes on SQLite (the per-event statements use it instead, for speed): the
stored text is what every other query compares against."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from cti_bridge.store.deliveries import sqlite_datetime
from cti_bridge.store.models import Delivery

PROCESS = Delivery.__table__.c.updated_at.type._cached_bind_processor(sqlite.dialect())  # type: ignore[attr-defined]

zones = st.one_of(
    st.just(UTC),
    st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(min_value=-23 * 60, max_value=23 * 60)),
)


@given(
    st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(9999, 12, 30), timezones=zones),
)
def test_the_same_text_as_sqlalchemy(value: datetime) -> None:
    assert sqlite_datetime(value) == PROCESS(value)


def test_whole_seconds_keep_their_microseconds_and_none_stays_none() -> None:
    value = datetime(2026, 12, 5, 6, 40, 1, tzinfo=UTC)
    assert sqlite_datetime(value) == PROCESS(value) == "2026-12-05 06:40:01.000000"
    assert sqlite_datetime(None) is PROCESS(None) is None


def test_a_naive_datetime_is_refused_as_sqlalchemy_refuses_it() -> None:
    naive = datetime(2026, 12, 5, 6, 40, 1)
    with pytest.raises(ValueError, match="timezone"):
        PROCESS(naive)
    with pytest.raises(ValueError, match="timezone"):
        sqlite_datetime(naive)
