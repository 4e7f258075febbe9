"""``logs.FailureStreak.noted``: handled failures (a CRM host's requests that their deliveries
retry) are told in at most one line per interval: the first of a streak in the caller's words, then
a count with the last kind, and one line when it works again. The first line's text is built only
when it is written. A host that fails now and then among successes is counted, not told at each
failure and each success. (tests/e2e/test_delivery_logs.py runs it in the worker.)"""

from __future__ import annotations

import logging

import pytest

from cti_bridge.logs import FailureStreak
from tests.unit.test_failure_streak import Clock


def _streak(caplog: pytest.LogCaptureFixture) -> tuple[FailureStreak, Clock]:
    caplog.set_level(logging.INFO, logger="test.noted")
    clock = Clock()
    streak = FailureStreak(
        logging.getLogger("test.noted"),
        "CRM host crm.example.com",
        level=logging.WARNING,
        clock=clock,
        works_again="answers again",
    )
    return streak, clock


def _said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records]


def test_an_outage_is_its_first_failure_then_a_count_a_minute_then_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    streak, clock = _streak(caplog)
    built: list[int] = []

    def first() -> str:
        built.append(1)
        return "CRM host crm.example.com: HTTP 503 for delivery d-1"

    # 1,000 failures over 150 s, of two kinds.
    for i in range(1000):
        streak.noted("HTTP 503" if i % 2 else "ConnectTimeout", first, "their deliveries will be retried")
        clock.now += 0.15
    assert built == [1]  # formatted once, not per failure
    assert _said(caplog) == [
        (logging.WARNING, "CRM host crm.example.com: HTTP 503 for delivery d-1"),
        (
            logging.WARNING,
            "CRM host crm.example.com: 400 more failures in the last 60 s (last: ConnectTimeout); "
            "their deliveries will be retried",
        ),
        (
            logging.WARNING,
            "CRM host crm.example.com: 400 more failures in the last 60 s (last: ConnectTimeout); "
            "their deliveries will be retried",
        ),
    ]
    # No more failures: the loop's tick writes the rest once the interval is up, not before.
    caplog.clear()
    streak.tick()
    assert caplog.records == []
    clock.now += 30
    streak.tick()
    streak.tick()
    assert _said(caplog) == [
        (
            logging.WARNING,
            "CRM host crm.example.com: 199 more failures in the last 60 s (last: HTTP 503); "
            "their deliveries will be retried",
        )
    ]
    caplog.clear()
    streak.recovered()
    streak.recovered()  # said once
    assert _said(caplog) == [
        (logging.INFO, "CRM host crm.example.com answers again after 1000 failures in 180 s")
    ]
    assert streak.count == 0
    assert not streak.idle()  # a new streak now would wait for the interval
    clock.now += 60
    assert streak.idle()


def test_a_short_outage_is_two_lines(caplog: pytest.LogCaptureFixture) -> None:
    streak, clock = _streak(caplog)
    for _ in range(3):
        streak.noted("HTTP 500", lambda: "first", "retried")
        clock.now += 1
    streak.recovered()
    assert _said(caplog) == [
        (logging.WARNING, "first"),
        (logging.INFO, "CRM host crm.example.com answers again after 3 failures in 3 s"),
    ]
    # The two after the first are in the end's count: no count of them comes later.
    caplog.clear()
    clock.now += 120
    streak.tick()
    assert caplog.records == []


def test_a_host_failing_now_and_then_is_counted_not_told_at_each_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    streak, clock = _streak(caplog)
    # One request in ten fails, ten a second, for five minutes.
    for i in range(3000):
        if i % 10 == 0:
            streak.noted("HTTP 502", lambda: "first", "retried")
        else:
            streak.recovered()
        clock.now += 0.1
        if i % 10 == 5:
            streak.tick()  # the worker's loop
    said = _said(caplog)
    assert said[:2] == [
        (logging.WARNING, "first"),
        (logging.INFO, "CRM host crm.example.com answers again after 1 failure in 0 s"),
    ]
    # After that at most a count, a first failure and its end a minute, against 600 lines before.
    assert len(said) <= 2 + 3 * 5, said
    caplog.clear()
    clock.now += 60
    streak.tick()
    said += _said(caplog)
    counts = [m for _, m in said if " more failure" in m]
    assert counts and all(m.startswith("CRM host crm.example.com: ") for m in counts), said
    assert all(m.endswith("(last: HTTP 502; answers again since); retried") for m in counts[-1:]), said
    # Every failure is in one line: a first one, or a count (each streak here is one failure).
    firsts = sum(1 for _, m in said if m == "first")
    told = sum(int(m.split(": ", 1)[1].split(" ", 1)[0]) for m in counts)
    assert firsts + told == 300, said


def test_a_new_streak_after_a_quiet_interval_is_told_again(caplog: pytest.LogCaptureFixture) -> None:
    streak, clock = _streak(caplog)
    streak.noted("HTTP 503", lambda: "first outage", "retried")
    streak.recovered()
    clock.now += 61
    assert streak.idle()
    streak.noted("ConnectError", lambda: "second outage", "retried")
    assert [m for _, m in _said(caplog)][-1] == "second outage"
