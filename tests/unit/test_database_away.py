"""Which database errors the admin API answers as 'the database is away, try again' (503): a
connection or server fault, not a statement no retry can mend."""

from __future__ import annotations

import sqlite3

import psycopg
import psycopg.errors
import pytest
from sqlalchemy.exc import OperationalError

from cti_bridge.admin.app import _database_away


def _wrapped(orig: Exception) -> OperationalError:
    return OperationalError("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    ("orig", "away"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), True),
        (sqlite3.OperationalError("database is locked"), True),
        # Class 54: the statement's own limit (an index entry over 2,704 bytes): a 503 for ever.
        (psycopg.errors.ProgramLimitExceeded("index row size 6072 exceeds btree maximum 2704"), False),
        (psycopg.errors.TooManyArguments("cannot pass more than 100 arguments"), False),
        (sqlite3.OperationalError("no such column: x"), False),
    ],
)
def test_only_a_database_that_is_away_is_a_503(orig: Exception, away: bool) -> None:
    assert _database_away(_wrapped(orig)) is away
