"""The retry policy (reliability.md §6-§7): classification table, schedule with jitter, Retry-After."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cti_bridge.config import DEFAULT_RETRY_SCHEDULE
from cti_bridge.delivery.egress import EgressRefused
from cti_bridge.delivery.retry import (
    Outcome,
    classify,
    classify_after_refresh,
    next_delay,
    parse_retry_after,
)

NOW = datetime(2026, 11, 24, 9, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (201, Outcome.SUCCESS),
        (202, Outcome.SUCCESS),
        (204, Outcome.SUCCESS),
        (299, Outcome.SUCCESS),
        # 3xx: never followed, a failure, permanent (module doc says why)
        (300, Outcome.PERMANENT),
        (301, Outcome.PERMANENT),
        (302, Outcome.PERMANENT),
        (303, Outcome.PERMANENT),
        (304, Outcome.PERMANENT),
        (307, Outcome.PERMANENT),
        (308, Outcome.PERMANENT),
        (400, Outcome.PERMANENT),
        (401, Outcome.REFRESH_AND_RETRY),
        (402, Outcome.PERMANENT),
        (403, Outcome.PERMANENT),
        (404, Outcome.PERMANENT),
        (405, Outcome.PERMANENT),
        (408, Outcome.RETRY),
        (409, Outcome.PERMANENT),
        (410, Outcome.PERMANENT),
        (413, Outcome.PERMANENT),
        (418, Outcome.PERMANENT),
        (422, Outcome.PERMANENT),
        (425, Outcome.RETRY),
        (429, Outcome.RETRY),
        (451, Outcome.PERMANENT),
        (499, Outcome.PERMANENT),
        (500, Outcome.RETRY),
        (501, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (599, Outcome.RETRY),
        (100, Outcome.PERMANENT),
    ],
)
def test_status_classification(status: int, outcome: Outcome) -> None:
    assert classify(status, None) is outcome


def _wrapped_refusal() -> Exception:
    try:
        try:
            raise EgressRefused("refused host example.com: a private address")
        except EgressRefused as inner:
            raise httpx.ConnectError("connect failed") from inner
    except httpx.ConnectError as outer:
        return outer


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (httpx.ConnectError("refused"), Outcome.RETRY),
        (httpx.ConnectTimeout("slow"), Outcome.RETRY),
        (httpx.ReadTimeout("slow"), Outcome.RETRY),
        (httpx.WriteTimeout("slow"), Outcome.RETRY),
        (httpx.PoolTimeout("slow"), Outcome.RETRY),
        (httpx.ReadError("reset"), Outcome.RETRY),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), Outcome.RETRY),
        (TimeoutError(), Outcome.RETRY),
        (ConnectionResetError(), Outcome.RETRY),
        (aiohttp.ServerDisconnectedError(), Outcome.RETRY),
        (OSError("network unreachable"), Outcome.RETRY),
        (EgressRefused("refused host 10.0.0.1: a private address"), Outcome.PERMANENT),
        (_wrapped_refusal(), Outcome.PERMANENT),
        (httpx.UnsupportedProtocol("ftp"), Outcome.PERMANENT),
        (httpx.InvalidURL("bad"), Outcome.PERMANENT),
        (ValueError("a bug"), Outcome.PERMANENT),
    ],
)
def test_error_classification(error: Exception, outcome: Outcome) -> None:
    assert classify(None, error) is outcome


def test_status_wins_over_a_later_body_error() -> None:
    assert classify(201, httpx.ReadError("reset while reading")) is Outcome.SUCCESS
    assert classify(404, httpx.ReadTimeout("slow body")) is Outcome.PERMANENT


def test_second_401_after_refresh_is_permanent() -> None:
    assert classify_after_refresh(401, None) is Outcome.PERMANENT
    assert classify_after_refresh(201, None) is Outcome.SUCCESS
    assert classify_after_refresh(503, None) is Outcome.RETRY


def test_schedule_without_jitter_is_the_schedule_then_dead() -> None:
    rng = random.Random(1)
    delays = [next_delay(n, DEFAULT_RETRY_SCHEDULE, 0.0, rng, None) for n in range(1, 11)]
    assert delays == [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 10800.0, 21600.0, None, None]


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ValueError):
        next_delay(0, DEFAULT_RETRY_SCHEDULE, 0.2, random.Random(0), None)


@given(
    attempt=st.integers(min_value=1, max_value=8),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_jitter_stays_within_bounds(attempt: int, jitter: float, seed: int) -> None:
    base = DEFAULT_RETRY_SCHEDULE[attempt]
    delay = next_delay(attempt, DEFAULT_RETRY_SCHEDULE, jitter, random.Random(seed), None)
    assert delay is not None
    assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


def test_jitter_spreads_the_delays() -> None:
    rng = random.Random(42)
    delays = {next_delay(3, DEFAULT_RETRY_SCHEDULE, 0.2, rng, None) for _ in range(50)}
    assert len(delays) > 40
    assert all(d is not None and 96.0 <= d <= 144.0 for d in delays)


@given(
    attempt=st.integers(min_value=1, max_value=8),
    retry_after=st.floats(min_value=0.0, max_value=200_000.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_never_earlier_than_retry_after_but_capped(attempt: int, retry_after: float, seed: int) -> None:
    delay = next_delay(attempt, DEFAULT_RETRY_SCHEDULE, 0.2, random.Random(seed), retry_after, 86400.0)
    assert delay is not None
    assert delay >= min(retry_after, 86400.0)
    assert delay <= max(min(retry_after, 86400.0), DEFAULT_RETRY_SCHEDULE[attempt] * 1.2 + 1e-9)


def test_retry_after_does_not_extend_an_exhausted_schedule() -> None:
    assert next_delay(9, DEFAULT_RETRY_SCHEDULE, 0.2, random.Random(0), 10.0) is None


def test_retry_after_longer_than_the_step_wins() -> None:
    assert next_delay(1, DEFAULT_RETRY_SCHEDULE, 0.2, random.Random(0), 120.0) == 120.0
    assert next_delay(1, DEFAULT_RETRY_SCHEDULE, 0.2, random.Random(0), 200_000.0, 86400.0) == 86400.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("  30 ", 30.0),
        ("-5", 0.0),
        ("100000", 86400.0),  # capped at 24 h
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date() -> None:
    future = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(future, NOW) == 90.0
    assert parse_retry_after("Tue, 24 Nov 2026 09:02:00 GMT", NOW) == 120.0
    past = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(past, NOW) == 0.0
    far = format_datetime(NOW + timedelta(days=3), usegmt=True)
    assert parse_retry_after(far, NOW) == 86400.0
    assert parse_retry_after(far, NOW, cap=3600.0) == 3600.0
