"""``logs.FailureStreak``: a background loop's run of failures (a database outage) is logged with
one traceback, a few single lines, then a line a minute, and one line when it works again. Before,
the worker's claim loop logged a full traceback every 10 s for as long as the database was away."""

from __future__ import annotations

import logging

import pytest

from cti_bridge.logs import FailureStreak


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _streak(caplog: pytest.LogCaptureFixture) -> tuple[FailureStreak, Clock]:
    caplog.set_level(logging.INFO, logger="test.streak")
    clock = Clock()
    return FailureStreak(logging.getLogger("test.streak"), "the claim", clock=clock), clock


def test_one_traceback_a_few_lines_then_one_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    streak, clock = _streak(caplog)
    for _ in range(40):  # 40 failures 10 s apart: 390 s
        streak.failed(ConnectionError("server closed the connection\nDETAIL: more"), "trying again in 10.0 s")
        clock.now += 10
    records = caplog.records
    with_trace = [r for r in records if r.exc_info]
    assert len(with_trace) == 1 and with_trace[0].levelno == logging.ERROR
    assert with_trace[0].getMessage() == "the claim failed; trying again in 10.0 s"
    again = [r.getMessage() for r in records if not r.exc_info]
    # Failures 2-5 one line each (10-40 s in), then one a minute: at 100, 160, ..., 340 s in.
    assert len(again) == 4 + 5, again
    assert again[0] == (
        "the claim failed again (ConnectionError: server closed the connection), 2 times in 10 s; "
        "trying again in 10.0 s"
    )
    assert again[-1].startswith(
        "the claim failed again (ConnectionError: server closed the connection), 35 times in 340 s"
    )
    assert all(r.levelno == logging.WARNING for r in records if not r.exc_info)

    caplog.clear()
    streak.recovered()
    streak.recovered()  # said once
    assert [r.getMessage() for r in caplog.records] == ["the claim works again after 40 failures in 400 s"]
    assert streak.count == 0


def test_a_new_kind_of_failure_gets_its_traceback_and_a_new_streak_starts_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    streak, clock = _streak(caplog)
    for _ in range(10):
        streak.failed(ConnectionError("refused"))
        clock.now += 1
    streak.failed(TimeoutError("the pool timed out"))
    streak.failed(ConnectionError("refused"))  # a kind again after another: its traceback again
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [  # type: ignore[index]
        ConnectionError,
        TimeoutError,
        ConnectionError,
    ]
    streak.recovered()
    caplog.clear()
    streak.failed(ConnectionError("refused"))  # after a recovery: a new streak, with its traceback
    assert [bool(r.exc_info) for r in caplog.records] == [True]
    assert caplog.records[0].getMessage() == "the claim failed"


def test_no_line_when_nothing_failed(caplog: pytest.LogCaptureFixture) -> None:
    streak, _ = _streak(caplog)
    streak.recovered()
    assert caplog.records == []
