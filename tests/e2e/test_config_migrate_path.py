"""``migrate`` on an SQLite path whose folder cannot be made or written: exit 4 and one line saying
why, as ``run`` says it (it printed a traceback and exited 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cti_bridge.errors import ExitCode
from tests.e2e.process_helpers import cli


def _env(database: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTI_BRIDGE_")}
    env["CTI_BRIDGE_DATABASE_URL"] = f"sqlite:///{database}"
    env["CTI_BRIDGE_ADMIN_PORT"] = "0"
    return env


@pytest.mark.parametrize("command", ["migrate", "run"])
def test_a_database_beneath_a_regular_file_is_exit_4_with_one_line(command: str, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    proc = cli([command], _env(afile / "x.db"), tmp_path, timeout=60)
    assert proc.returncode == ExitCode.DATABASE, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == f"cti-bridge: database unavailable: FileExistsError: [Errno 17] File exists: '{afile}'"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_database_in_a_folder_that_cannot_be_written_is_exit_4_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = cli(["migrate"], _env(folder / "x.db"), tmp_path, timeout=60)
    finally:
        folder.chmod(0o755)
    assert proc.returncode == ExitCode.DATABASE, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("cti-bridge: database unavailable: PermissionError: ")
    assert str(folder) in proc.stderr


def test_a_lock_file_that_cannot_be_made_is_exit_4_for_migrate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same as a PermissionError, as root too (root writes into the read-only folder above)."""
    from cti_bridge import cli as cli_module
    from cti_bridge.store.db import InstanceLock

    def refuse(self: InstanceLock) -> None:
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(InstanceLock, "acquire", refuse)
    monkeypatch.setattr("cti_bridge.logs.setup_logging", lambda *args: None)  # pytest's logging stays
    for k in [k for k in os.environ if k.startswith("CTI_BRIDGE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("CTI_BRIDGE_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    assert cli_module.main(["migrate"]) == ExitCode.DATABASE
    err = capsys.readouterr().err
    lock = tmp_path / "x.db.lock"
    assert (
        err == f"cti-bridge: database unavailable: PermissionError: [Errno 13] Permission denied: '{lock}'\n"
    )
    assert not (tmp_path / "x.db").exists()  # nothing was migrated
