"""The retry policy: whether an attempt's result is success, retry, refresh-and-retry or permanent,
and when the next attempt is due. Pure functions; the clock (``now``) and the randomness (``rng``)
are passed in, so a test can step through a whole schedule deterministically.

reliability.md §6 (classification) and §7 (schedule, jitter, ``Retry-After``) are the contract.

Decisions this module makes that §6 leaves open, and why:

- **3xx is permanent.** Redirects are never followed (§15: a redirect could send an access token to
  a host nobody configured). A CRM endpoint that answers 3xx is misconfigured (http→https, a moved
  API version, a login page); retrying for hours would only delay the operator's signal. The
  delivery goes dead with the status and the response excerpt (the ``Location``), and can be
  replayed (§19) after the mapping is fixed.
- **A status wins over an error.** If a status line was received and reading the body failed
  afterwards, the CRM has processed the request; the status decides.
- **Unknown statuses:** any status >= 500 is retried (5xx family and non-standard server errors);
  1xx and anything else not listed is permanent.
- **Errors:** timeouts and transport errors (connect, read, write, protocol) are retried; a refusal
  of the outbound guard (``EgressRefused``), an unsupported scheme or an invalid URL is permanent;
  any other exception is a bug or a bad request (rendering) and is permanent.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
import httpx

from cti_bridge.delivery.egress import EgressRefused
from cti_bridge.delivery.http1 import InvalidRequest

DEFAULT_RETRY_AFTER_CAP = 86400.0  # reliability.md §7: Retry-After is obeyed up to 24 h


class Outcome(enum.Enum):
    """What to do after one attempt (reliability.md §6)."""

    SUCCESS = "success"
    RETRY = "retry"
    # 401: refresh the access token once and retry once (reliability.md §6, §12).
    REFRESH_AND_RETRY = "refresh_and_retry"
    PERMANENT = "permanent"


# 408 Request Timeout, 425 Too Early, 429 Too Many Requests: the request may succeed later.
_RETRYABLE_4XX = frozenset({408, 425, 429})
# Exceptions that mean "the URL itself can never work": retrying cannot help.
_PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    EgressRefused,
    InvalidRequest,
    httpx.UnsupportedProtocol,
    httpx.InvalidURL,
)
# Timeouts and connection-level failures (reliability.md §6: retried).
_RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.TransportError,
    aiohttp.ClientError,
    TimeoutError,
    ConnectionError,
    OSError,
)
#: Every error a CRM request may end in that ``classify`` decides on: the worker records these as
#: the attempt's outcome; anything else is a bug.
SEND_ERRORS: tuple[type[Exception], ...] = _PERMANENT_ERRORS + _RETRYABLE_ERRORS


def _causes(error: BaseException) -> list[BaseException]:
    """The error and its causes/contexts (a transport may wrap the guard's refusal)."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def classify(status: int | None, error: BaseException | None) -> Outcome:
    """Classify one attempt's result: the HTTP ``status`` if one arrived, else the ``error``."""
    if status is not None:
        if 200 <= status < 300:
            return Outcome.SUCCESS
        if status == 401:
            return Outcome.REFRESH_AND_RETRY
        if status in _RETRYABLE_4XX or status >= 500:
            return Outcome.RETRY
        # 3xx (never followed), 400, 403, 404, 409, 410, 422, other 4xx, 1xx: see the module doc.
        return Outcome.PERMANENT
    if error is None:
        # Neither a status nor an error: nothing was sent. Treat like a lost connection.
        return Outcome.RETRY
    chain = _causes(error)
    if any(isinstance(e, _PERMANENT_ERRORS) for e in chain):
        return Outcome.PERMANENT
    if isinstance(error, _RETRYABLE_ERRORS):
        return Outcome.RETRY
    return Outcome.PERMANENT


def parse_retry_after(value: str | None, now: datetime, cap: float = DEFAULT_RETRY_AFTER_CAP) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).

    A date in the past gives 0. The result is capped at ``cap`` (reliability.md §7: 24 h).
    None when absent or unparseable (the schedule applies alone).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds: float | None = None
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            return None
        return min(max(seconds, 0.0), cap)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), cap)


def next_delay(
    attempt_no: int,
    schedule: Sequence[float],
    jitter: float,
    rng: random.Random,
    retry_after: float | None,
    cap: float = DEFAULT_RETRY_AFTER_CAP,
) -> float | None:
    """Seconds until the next attempt after ``attempt_no`` attempts have failed, or None: give up.

    ``schedule[i]`` is the delay before attempt ``i + 1`` (``schedule[0]``, normally 0, is the first
    attempt itself), so a delivery gets ``len(schedule)`` attempts and then goes dead
    (reliability.md §7). The scheduled delay is spread by ±``jitter`` (0.2 = ±20 %) so that
    deliveries failing together do not come back together. ``Retry-After`` is a floor: never earlier
    than it says, capped at ``cap``.
    """
    if attempt_no < 1:
        raise ValueError("attempt_no counts attempts made so far and starts at 1")
    if attempt_no >= len(schedule):
        return None
    base = max(float(schedule[attempt_no]), 0.0)
    delay = base * (1.0 + rng.uniform(-jitter, jitter)) if jitter > 0 else base
    if retry_after is not None:
        delay = max(delay, min(max(retry_after, 0.0), cap))
    return max(delay, 0.0)


def classify_after_refresh(status: int | None, error: BaseException | None) -> Outcome:
    """Classify the one retry made after a refresh: a second 401 is permanent (§6: retries once)."""
    outcome = classify(status, error)
    return Outcome.PERMANENT if outcome is Outcome.REFRESH_AND_RETRY else outcome
