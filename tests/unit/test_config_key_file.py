"""The secret key file (``CTI_BRIDGE_SECRET_KEY_FILE``, by default ``<database>.key``) as a setting:
one that cannot serve stops ``check-config`` and ``run`` alike with exit 3 and one line naming it."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from cti_bridge.errors import ConfigError, ExitCode
from cti_bridge.store.crypto import load_or_create_key_file
from tests.e2e.process_helpers import cli

SETTING = "CTI_BRIDGE_SECRET_KEY_FILE"


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """An SQLite database without a secret key (so the key file is used), on a free admin port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTI_BRIDGE_")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(
        CTI_BRIDGE_DATABASE_URL=f"sqlite:///{tmp_path / 'cti-bridge.db'}",
        CTI_BRIDGE_ADMIN_HOST="127.0.0.1",
        CTI_BRIDGE_ADMIN_PORT=str(port),
    )
    env.update({"CTI_BRIDGE_" + k.upper(): v for k, v in settings.items()})
    return env


def _assert_invalid_key_file(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == ExitCode.CONFIG, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cti-bridge:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"cti-bridge: invalid setting: {SETTING}: "), lines[0]
    for word in words:
        assert word in lines[0]
    if not proc.stderr.startswith("cti-bridge:"):  # run logs its migration first; nothing else
        assert all(" ERROR " not in line for line in proc.stderr.splitlines())


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_key_file_with_a_short_key_is_an_invalid_setting(command: str, tmp_path: Path) -> None:
    """``run`` died with a 33-line traceback and exit 1, while ``check-config`` passed it."""
    key_file = tmp_path / "short.key"
    key_file.write_text("only-20-characters..\n")
    proc = cli([command], _env(tmp_path, secret_key_file=str(key_file)), tmp_path, timeout=60)
    _assert_invalid_key_file(proc, str(key_file), "fewer than 32 characters")


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_key_file_that_is_a_directory_is_an_invalid_setting(command: str, tmp_path: Path) -> None:
    """``run`` reported it as "database unavailable" (exit 4); ``check-config`` passed it."""
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    proc = cli([command], _env(tmp_path, secret_key_file=str(key_dir)), tmp_path, timeout=60)
    _assert_invalid_key_file(proc, str(key_dir), "Is a directory")


def test_check_config_reads_the_default_key_file_beside_the_database(tmp_path: Path) -> None:
    (tmp_path / "cti-bridge.db.key").write_text("short\n")
    proc = cli(["check-config"], _env(tmp_path), tmp_path)
    _assert_invalid_key_file(proc, "cti-bridge.db.key", "fewer than 32 characters")


def test_check_config_passes_a_missing_key_file_and_leaves_it_to_run(tmp_path: Path) -> None:
    key_file = tmp_path / "later.key"
    proc = cli(["check-config"], _env(tmp_path, secret_key_file=str(key_file)), tmp_path)
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert not key_file.exists()  # check-config creates nothing


def test_check_config_passes_a_good_key_file_and_ignores_it_when_the_key_is_set(tmp_path: Path) -> None:
    good = tmp_path / "good.key"
    good.write_text("g" * 40 + "\n")
    assert cli(["check-config"], _env(tmp_path, secret_key_file=str(good)), tmp_path).returncode == 0
    # run does not read the file when the key itself is set, so check-config does not either.
    short = tmp_path / "short.key"
    short.write_text("short\n")
    env = _env(tmp_path, secret_key_file=str(short), secret_key="k" * 40)
    assert cli(["check-config"], env, tmp_path).returncode == 0


def test_reading_and_creating_a_key_file_raise_config_error(tmp_path: Path) -> None:
    """What app.secret_key_for calls, inside ``build``: cli.main turns ConfigError into exit 3."""
    from cti_bridge.store.crypto import read_key_file  # what check-config calls too

    short = tmp_path / "short.key"
    short.write_text("x" * 31)
    with pytest.raises(ConfigError, match=rf"^{SETTING}: the key file .* fewer than 32 characters$"):
        load_or_create_key_file(short)
    with pytest.raises(ConfigError, match=rf"^{SETTING}: cannot read the key file .*: Is a directory$"):
        load_or_create_key_file(tmp_path)
    not_text = tmp_path / "binary.key"
    not_text.write_bytes(b"\xff" * 40)
    with pytest.raises(ConfigError, match=rf"^{SETTING}: cannot read the key file "):
        read_key_file(not_text)
    a_file = tmp_path / "afile"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=rf"^{SETTING}: cannot (read|create) the key file "):
        load_or_create_key_file(a_file / "sub" / "x.key")
    assert read_key_file(tmp_path / "missing.key") is None
    exact = tmp_path / "exact.key"
    exact.write_text("y" * 32 + "\n")
    assert load_or_create_key_file(exact) == "y" * 32
