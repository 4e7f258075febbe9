"""``run`` checks its secret key against the secrets the database holds before anything starts.

An operator walkthrough found a changed ``CTI_BRIDGE_SECRET_KEY`` (or a lost key file) ending in an
83-line traceback and exit 1 once the first source read its password, a crash loop under a
container runtime; and a lost key file beside an SQLite database was first replaced by a new,
wrong one. Now either is an invalid setting (exit 3, one line naming it) and nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlmodel import Session

from cti_bridge.app import _secret_box
from cti_bridge.config import Settings
from cti_bridge.store import migrate
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database, make_engine
from cti_bridge.store.models import XelionContext
from tests.e2e.process_helpers import cli, free_port

KEY = "the-key-the-secrets-were-stored-with-0123456789"


def _integration_stored_with(db_url: str, key: str) -> None:
    """An integration row whose admin password is encrypted with ``key``."""
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine)
        with Session(engine) as session:
            session.add(
                XelionContext(
                    host="127.0.0.1:9",
                    tenant="master",
                    admin_username="admin",
                    admin_password_enc=SecretBox(key).encrypt("admin-password"),
                )
            )
            session.commit()
    finally:
        engine.dispose()


def _env(db_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTI_BRIDGE_")}
    env.update(
        CTI_BRIDGE_DATABASE_URL=db_url,
        CTI_BRIDGE_ADMIN_HOST="127.0.0.1",
        CTI_BRIDGE_ADMIN_PORT=str(free_port()),
        **{f"CTI_BRIDGE_{k.upper()}": v for k, v in settings.items()},
    )
    return env


def _refused(result: object, *named: str) -> str:
    """Exit 3 with one line naming ``named``, no traceback, no secret; the line."""
    code, err = result.returncode, result.stderr  # type: ignore[attr-defined]
    assert code == 3, (code, err[-3000:])
    assert "Traceback" not in err, err
    # The log's lines (the migration's) come first; the reason is one line, the last.
    line = err.strip().splitlines()[-1]
    assert line.startswith("cti-bridge: invalid setting: "), err
    for name in named:
        assert name in line, err
    assert KEY not in err and "admin-password" not in err
    return str(line)


def _accepted(db_url: str, **settings: str) -> None:
    """The same check as ``run``'s, in this process: the key decrypts the stored password."""
    db = Database(db_url)
    try:
        box = _secret_box(Settings(database_url=db_url, **settings), db)  # type: ignore[arg-type]
        with Session(db.engine) as session:
            row = session.get(XelionContext, 1)
            assert row is not None and box.decrypt(row.admin_password_enc) == "admin-password"
    finally:
        db.dispose()


def test_a_key_that_does_not_decrypt_the_stored_secrets_is_an_invalid_setting(
    db_url: str, tmp_path: Path
) -> None:
    _integration_stored_with(db_url, KEY)
    other = "another-key-than-the-one-they-were-stored-with"
    line = _refused(
        cli(["run"], _env(db_url, secret_key=other), tmp_path), "CTI_BRIDGE_SECRET_KEY", "decrypt"
    )
    assert other not in line
    _accepted(db_url, secret_key=KEY)


def test_a_wrong_key_file_is_named(tmp_path: Path) -> None:
    """(A key file is an embedded SQLite database's: PostgreSQL needs CTI_BRIDGE_SECRET_KEY.)"""
    db_url = f"sqlite:///{tmp_path / 'cti-bridge.db'}"
    _integration_stored_with(db_url, KEY)
    key_file = tmp_path / "swapped.key"
    key_file.write_text("a-key-file-of-another-database-0123456789")
    _refused(
        cli(["run"], _env(db_url, secret_key_file=str(key_file)), tmp_path),
        "CTI_BRIDGE_SECRET_KEY_FILE",
        str(key_file),
    )
    key_file.write_text(KEY)
    _accepted(db_url, secret_key_file=str(key_file))


def test_a_lost_key_file_beside_sqlite_is_not_replaced_by_a_new_key(tmp_path: Path) -> None:
    """With no key set, SQLite's key lives beside the database (``<db>.key``): created at the
    first start. Lost later, it was created anew, and the stored secrets could not be read."""
    db = tmp_path / "cti-bridge.db"
    db_url = f"sqlite:///{db}"
    _integration_stored_with(db_url, KEY)
    key_file = tmp_path / "cti-bridge.db.key"
    assert not key_file.exists()
    _refused(cli(["run"], _env(db_url), tmp_path), str(key_file), "does not exist")
    assert not key_file.exists()  # nothing written: the old file can simply go back
    key_file.write_text(KEY)  # put back
    _accepted(db_url)
