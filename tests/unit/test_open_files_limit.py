"""The daemon's open files limit (cli.raise_open_files_limit): the soft limit raised towards the
hard one at start, since admin connections, CRM connections and database files share it."""

from __future__ import annotations

import resource

from cti_bridge.cli import OPEN_FILES, raise_open_files_limit


def test_the_open_files_limit_is_raised_towards_the_hard_one() -> None:
    """Many systems start a process at 1,024 open files while allowing far more; the daemon's
    admin connections, CRM connections and database files share the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        now = raise_open_files_limit()
        wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
        assert now == wanted == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
