"""Logging set-up (text or JSON lines) with a last line of defence against secrets.

The code never logs a secret on purpose: it logs ids, hosts and tenants. The ``RedactingFilter``
masks what slips through anyway in known shapes (``Authorization`` values, ``Bearer``/``xelion``
tokens, ``access_token=``/``refresh_token=``/``client_secret=``/``password=`` pairs, JSON keys of the
same names), so a stray exception message or a third-party debug line cannot leak one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

_MASK = "***"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(authorization\s*[:=]\s*)(\S+\s+)?[^\s,;\"']+"), r"\1\2" + _MASK),
    (re.compile(r"(?i)\b(bearer|xelion_cti|xelion)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + _MASK),
    (
        re.compile(
            r"(?i)((?:access|refresh|id)_?token|client_?secret|device_?code|password|admin_?password"
            r"|authentication|renewal_?token)(\"?\s*[:=]\s*\"?)[^\s\"&,;}]+"
        ),
        r"\1\2" + _MASK,
    ),
    # The one-time secret in a Xelion websocket URL path (xelion-protocol.md §3).
    (re.compile(r"(/websocket/[^/\s]+/[^/\s]+/[^/\s]+/)[^/\s\"']+"), r"\1" + _MASK),
)


def redact(text: str) -> str:
    """Mask secrets of known shapes in ``text``."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and exception text) through ``redact``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill logging
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once, for the CLI. Tests leave logging to pytest."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; URLs may carry a token (CRM.COM's token parameter).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # Alembic names every plugin it sets up at each start (7-12 lines); the migrations it runs stay.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


class FailureStreak:
    """How a background loop (the worker's claims, the replicas' follow-up, vacuum) logs a run of
    failures, such as a database outage, without a traceback every few seconds for its whole length.

    The first failure of a streak, and one of a new kind (exception type and first line), is logged
    with its traceback at ``level``; the next ``QUIET_AFTER - 1`` as one line each; after that one
    line every ``EVERY`` seconds with the count. ``recovered`` says, once, that it works again.

    Failures that are expected and handled, such as the requests to a CRM host that their
    deliveries retry, are counted with ``noted`` instead, and told in at most one line every
    ``EVERY`` seconds: the first of a streak in the caller's words (no traceback), then how many
    more failed and the last one's kind, whatever the kinds, so that an outage of a thousand
    deliveries is a few lines, not a thousand. ``tick``, called by the loop, writes that count when
    it is due even if no failure comes after. A streak that was told ends with ``recovered``'s line;
    one that began and ended within the interval after a line (a host failing one request in ten)
    is only counted, in the next count's line: otherwise each failure and success of a flapping
    host would be two lines.
    """

    QUIET_AFTER = 5
    EVERY = 60.0

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        level: int = logging.ERROR,
        clock: Callable[[], float] = time.monotonic,
        works_again: str = "works again",
    ) -> None:
        self.logger = logger
        self.what = what
        self.level = level
        self.clock = clock
        self.works_again = works_again
        self.count = 0
        self._since = 0.0
        self._logged_at = 0.0
        self._kind: tuple[str, str] | None = None
        self._told = False  # whether a line told of this streak (then its end is told too)
        # ``noted``: when its last line was written, the failures no line has counted yet (of this
        # streak: ``_streak_untold``), the last one's kind and what becomes of them.
        self._told_at: float | None = None
        self._untold = 0
        self._streak_untold = 0
        self._last = ""
        self._then = ""

    def failed(self, exc: BaseException, then: str = "") -> None:
        """Count ``exc`` and log it as the rules above say; ``then``: what the loop does next."""
        now = self.clock()
        self.count += 1
        if self.count == 1:
            self._since = now
        lines = str(exc).strip().splitlines()
        kind = (type(exc).__name__, lines[0][:300] if lines else "")
        suffix = f"; {then}" if then else ""
        if kind != self._kind:
            self._kind = kind
            self.logger.log(self.level, "%s failed%s", self.what, suffix, exc_info=exc)
        elif self.count <= self.QUIET_AFTER or now - self._logged_at >= self.EVERY:
            self.logger.warning(
                "%s failed again (%s: %s), %d times in %.0f s%s",
                self.what,
                kind[0],
                kind[1],
                self.count,
                now - self._since,
                suffix,
            )
        else:
            return
        self._logged_at = now
        self._told = True

    def noted(self, kind: str, first: Callable[[], str], then: str = "") -> None:
        """Count a handled failure of ``kind`` (short: "HTTP 503", "ConnectTimeout"). The first of a
        streak is logged at ``level`` as ``first()`` says, if no line was written in the last
        ``EVERY`` seconds (``first`` is called only then: the caller's details are formatted once
        per streak, not per failure); the others are counted (``tick``). ``then``: what becomes of
        such failures, for the count's line."""
        now = self.clock()
        self.count += 1
        self._last, self._then = kind, then
        if self.count == 1:
            self._since = now
            self._told = False
            if self._told_at is None or now - self._told_at >= self.EVERY:
                self.tick(now)  # failures of streaks gone untold, if any: before this one's line
                self.logger.log(self.level, "%s", first())
                self._told_at = now
                self._told = True
                return
        self._untold += 1
        self._streak_untold += 1
        self.tick(now)

    def tick(self, now: float | None = None) -> None:
        """Log how many ``noted`` failures came since the last line, if any did and ``EVERY``
        seconds have passed since that line."""
        if not self._untold:
            return
        if now is None:
            now = self.clock()
        if self._told_at is not None and now - self._told_at < self.EVERY:
            return
        self.logger.warning(
            "%s: %d more %s in the last %.0f s (last: %s%s)%s",
            self.what,
            self._untold,
            "failure" if self._untold == 1 else "failures",
            now - (self._since if self._told_at is None else self._told_at),
            self._last,
            "" if self.count else f"; {self.works_again} since",
            f"; {self._then}" if self._then else "",
        )
        self._untold = self._streak_untold = 0
        self._told_at = now
        self._told = self.count > 0

    def idle(self) -> bool:
        """Whether this streak's object may go (``noted``): no streak, nothing left to count, and
        no line in the last ``EVERY`` seconds that a new streak's first line would have to wait for."""
        return (
            not self.count
            and not self._untold
            and (self._told_at is None or self.clock() - self._told_at >= self.EVERY)
        )

    def recovered(self) -> None:
        """The loop's step worked: end the streak (one line if a line told of it)."""
        if not self.count:
            return
        if self._told:
            now = self.clock()
            self.logger.info(
                "%s %s after %d %s in %.0f s",
                self.what,
                self.works_again,
                self.count,
                "failure" if self.count == 1 else "failures",
                now - self._since,
            )
            # This line counts the streak's failures that no line counted yet.
            self._untold -= self._streak_untold
            self._told_at = now
        self._streak_untold = 0
        self.count = 0
        self._kind = None
        self._told = False
