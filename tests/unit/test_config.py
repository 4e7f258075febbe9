"""Settings: environment, TOML file, and one clear line with exit code 3 for an invalid setting."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from cti_bridge.config import load_settings
from cti_bridge.errors import ConfigError, ExitCode
from tests.e2e.process_helpers import cli

ROOT = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    s = load_settings()
    assert s.database_url == "sqlite:///./cti-bridge.db"
    assert (s.admin_host, s.admin_port) == ("127.0.0.1", 8080)
    assert s.allow_private_targets is False
    assert s.retry_schedule[:3] == [0.0, 5.0, 30.0]


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTI_BRIDGE_ADMIN_PORT", "9999")
    monkeypatch.setenv("CTI_BRIDGE_ALLOWED_XELION_HOSTS", "pbx.example.com, 127.0.0.1:9100")
    monkeypatch.setenv("CTI_BRIDGE_ALLOW_PRIVATE_TARGETS", "true")
    monkeypatch.setenv("CTI_BRIDGE_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("CTI_BRIDGE_SECRET_KEY", "k" * 32)
    s = load_settings()
    assert s.admin_port == 9999
    assert s.allowed_xelion_hosts == ["pbx.example.com", "127.0.0.1:9100"]
    assert s.host_allowed("pbx.example.com") and s.host_allowed("PBX.example.com:443")
    assert s.host_allowed("127.0.0.1:9100") and not s.host_allowed("127.0.0.1:9101")
    assert not s.host_allowed("evil.example.com")
    assert s.allow_private_targets is True
    assert s.database_url == "postgresql+psycopg://u@h/db"


def test_star_allows_any_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTI_BRIDGE_ALLOWED_XELION_HOSTS", "*")
    assert load_settings().host_allowed("anything.example:8443")


def test_example_toml_has_every_key_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from cti_bridge.config import Settings

    example = ROOT / "config" / "cti-bridge.example.toml"
    text = example.read_text()
    for name in Settings.model_fields:
        assert f"{name} =" in text, f"{name} is missing from {example.name}"
    s = load_settings(str(example))
    assert s.admin_port == 8080


def test_toml_file_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('admin_port = 7000\nlog_level = "DEBUG"\n')
    monkeypatch.setenv("CTI_BRIDGE_CONFIG", str(cfg))
    monkeypatch.setenv("CTI_BRIDGE_LOG_LEVEL", "WARNING")
    s = load_settings()
    assert s.admin_port == 7000
    assert s.log_level == "WARNING"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CTI_BRIDGE_ADMIN_PORT": "http"}, "CTI_BRIDGE_ADMIN_PORT"),
        ({"CTI_BRIDGE_SECRET_KEY": "short"}, "CTI_BRIDGE_SECRET_KEY"),
        ({"CTI_BRIDGE_DATABASE_URL": "mysql://x"}, "CTI_BRIDGE_DATABASE_URL"),
        ({"CTI_BRIDGE_DATABASE_URL": "postgresql+psycopg://u@h/db"}, "CTI_BRIDGE_SECRET_KEY"),
        ({"CTI_BRIDGE_LOG_LEVEL": "LOUD"}, "CTI_BRIDGE_LOG_LEVEL"),
        ({"CTI_BRIDGE_RETRY_SCHEDULE": "1,-2"}, "CTI_BRIDGE_RETRY_SCHEDULE"),
        ({"CTI_BRIDGE_RETENTION_DAYS": "-1"}, "CTI_BRIDGE_RETENTION_DAYS"),
        ({"CTI_BRIDGE_DEAD_RETENTION_DAYS": "a week"}, "CTI_BRIDGE_DEAD_RETENTION_DAYS"),
        ({"CTI_BRIDGE_RETENTION_INTERVAL_SECONDS": "0"}, "CTI_BRIDGE_RETENTION_INTERVAL_SECONDS"),
        (
            {"CTI_BRIDGE_NO_SUCH_SETTING_X": "1", "CTI_BRIDGE_CONFIG": "/nonexistent.toml"},
            "CTI_BRIDGE_CONFIG",
        ),
        # A misspelt variable was ignored and its setting kept the default (the TOML file refused
        # an unknown key already).
        ({"CTI_BRIDGE_RETENTON_DAYS": "7"}, "CTI_BRIDGE_RETENTON_DAYS"),
    ],
)
def test_invalid_setting_names_it(env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(named + ":")


@pytest.mark.parametrize(
    ("env", "numbers"),
    [
        ({"CTI_BRIDGE_LEASE_SECONDS": "60"}, "(2 x 30 s = 60 s), not 60 s"),
        ({"CTI_BRIDGE_REQUEST_TIMEOUT": "60"}, "(2 x 60 s = 120 s), not 120 s"),  # the default lease
        ({"CTI_BRIDGE_LEASE_SECONDS": "3"}, "(2 x 30 s = 60 s), not 3 s"),
        ({"CTI_BRIDGE_LEASE_SECONDS": "0.9", "CTI_BRIDGE_REQUEST_TIMEOUT": "0.5"}, "(2 x 0.5 s = 1 s)"),
    ],
)
def test_a_lease_not_longer_than_an_attempt_is_refused_naming_both_settings(
    env: dict[str, str], numbers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # reliability.md §4: longer than the request timeout plus a token refresh.
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("CTI_BRIDGE_LEASE_SECONDS: must be longer than 2 x CTI_BRIDGE_REQUEST_TIMEOUT ")
    assert numbers in message
    assert "\n" not in message


def test_a_short_lease_in_the_toml_file_is_refused_too(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("request_timeout = 10.0\nlease_seconds = 20.0\n")
    # Named as the file's key: the lease came from the file, not from CTI_BRIDGE_LEASE_SECONDS.
    with pytest.raises(ConfigError) as info:
        load_settings(str(cfg))
    assert str(info.value).startswith(f"lease_seconds in {cfg}: must be longer than 2 x ")
    assert "(2 x 10 s = 20 s)" in str(info.value)


@pytest.mark.parametrize(
    ("lease", "timeout"),
    [
        (None, None),  # the defaults: 120 s against 2 x 30 s
        ("2", "0.5"),  # as short as the kill -9 test's (tests/e2e/test_reliability_crash.py)
        ("600", "60"),
        ("61", None),
    ],
)
def test_the_defaults_and_a_long_enough_lease_load(
    lease: str | None, timeout: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if lease is not None:
        monkeypatch.setenv("CTI_BRIDGE_LEASE_SECONDS", lease)
    if timeout is not None:
        monkeypatch.setenv("CTI_BRIDGE_REQUEST_TIMEOUT", timeout)
    s = load_settings()
    assert s.lease_seconds == float(lease or 120.0)
    assert s.request_timeout == float(timeout or 30.0)
    assert s.lease_seconds > 2 * s.request_timeout


def _clean_env() -> dict[str, str]:
    """This process's environment without any CTI_BRIDGE_* setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CTI_BRIDGE_")}


def _check_config(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``cti-bridge check-config`` in a process of its own, its output captured."""
    return _cli(env, cwd, "check-config")


def _cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cti-bridge ARGS`` in a process of its own, its output captured."""
    return cli(list(args), env, cwd)


def test_a_file_setting_that_the_environment_overrides_is_named_in_a_warning(tmp_path: Path) -> None:
    """The Docker image sets CTI_BRIDGE_DATABASE_URL, _ADMIN_HOST and _ADMIN_PORT, which win over
    a TOML file: a PostgreSQL URL or a port put in the file was passed over without a word (an
    operator walkthrough's finding). The value used is the environment's, as documented; each
    such key is named in a warning."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('admin_port = 9000\ndatabase_url = "sqlite:///./from-the-file.db"\nlog_level = "INFO"\n')
    env = _clean_env()
    env.update(CTI_BRIDGE_CONFIG=str(cfg), CTI_BRIDGE_ADMIN_PORT="8080", CTI_BRIDGE_LOG_LEVEL="INFO")
    proc = _check_config(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"admin_port": 8080' in proc.stdout
    warned = [line for line in proc.stderr.splitlines() if "is not used" in line]
    assert len(warned) == 2, proc.stderr
    assert "admin_port" in warned[0] and "CTI_BRIDGE_ADMIN_PORT" in warned[0]
    assert "log_level" in warned[1] and "CTI_BRIDGE_LOG_LEVEL" in warned[1]
    assert "database_url" not in proc.stderr  # the file's own value is used: nothing to say


def test_cli_exits_3_with_one_line(tmp_path: Path) -> None:
    env = _clean_env()
    env["CTI_BRIDGE_ADMIN_PORT"] = "not-a-port"
    proc = _check_config(env, tmp_path)
    assert proc.returncode == ExitCode.CONFIG == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "CTI_BRIDGE_ADMIN_PORT" in lines[0]


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    env = _clean_env()
    env["CTI_BRIDGE_ADMIN_TOKEN"] = "operator-token-that-must-not-show"
    proc = _check_config(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "operator-token-that-must-not-show" not in proc.stdout + proc.stderr
    assert '"admin_port": 8080' in proc.stdout


def test_check_config_masks_the_password_in_the_database_url(tmp_path: Path) -> None:
    """The URL was printed whole, its password with it (a README walkthrough's finding)."""
    env = _clean_env()
    env["CTI_BRIDGE_DATABASE_URL"] = "postgresql://cti:database-password-S3CR3T@127.0.0.1:5432/cti"
    env["CTI_BRIDGE_SECRET_KEY"] = "k" * 44
    proc = _check_config(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "database-password-S3CR3T" not in proc.stdout + proc.stderr
    assert '"database_url": "postgresql+psycopg://cti:***@127.0.0.1:5432/cti"' in proc.stdout


def test_check_config_masks_a_password_given_in_the_database_urls_query(tmp_path: Path) -> None:
    """libpq takes ``?password=`` (and ``sslpassword``) too, and check-config printed them."""
    env = _clean_env()
    env["CTI_BRIDGE_DATABASE_URL"] = (
        "postgresql://cti@127.0.0.1/cti?password=query-password-S3CR3T&sslpassword=ssl-S3CR3T&sslmode=require"
    )
    env["CTI_BRIDGE_SECRET_KEY"] = "k" * 44
    proc = _check_config(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "S3CR3T" not in proc.stdout + proc.stderr
    assert "sslmode=require" in proc.stdout


def test_a_database_url_whose_password_holds_an_unencoded_at_is_refused_unquoted(tmp_path: Path) -> None:
    """The password ended at its first '@' and the rest joined the host name, which check-config,
    migrate and run then printed ("failed to resolve host 'TAILSECRET@127.0.0.1'")."""
    env = _clean_env()
    env["CTI_BRIDGE_SECRET_KEY"] = "k" * 44
    for url, command in [
        ("postgresql://cti:Hunter2@TAILSECRET@127.0.0.1:5432/cti", "check-config"),
        ("postgresql://cti:Hunter2@TAILSECRET@127.0.0.1:5432/cti", "migrate"),
        ("postgresql://cti:Hunter2@TAILSECRET@127.0.0.1:5432/cti", "run"),
        ("postgresql://cti:Hun/ter2@TAILSECRET@127.0.0.1:5432/cti", "check-config"),  # a '/' too
        ("postgresql://cti:Hun/ter2@TAILSECRET@127.0.0.1:5432/cti", "migrate"),
    ]:
        env["CTI_BRIDGE_DATABASE_URL"] = url
        proc = _cli(env, tmp_path, command)
        assert proc.returncode == 3, (command, proc.stdout, proc.stderr)
        assert "CTI_BRIDGE_DATABASE_URL" in proc.stderr and "%40" in proc.stderr
        assert "TAILSECRET" not in proc.stdout + proc.stderr and "ter2" not in proc.stdout + proc.stderr
    env["CTI_BRIDGE_DATABASE_URL"] = "postgresql://cti:Hunter2%40TAILSECRET@127.0.0.1:5432/cti"
    assert _check_config(env, tmp_path).returncode == 0  # encoded, as the error says


def test_config_is_taken_before_or_after_the_command(tmp_path: Path) -> None:
    """``cti-bridge run --config FILE`` was 'unrecognized arguments' (exit 2): only the form with
    the option before the command worked (a README walkthrough's finding). Given in both places,
    the one after the command wins."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("admin_port = 8123\n")
    b.write_text("admin_port = 8124\n")
    env = _clean_env()
    for args, port in (
        (("--config", str(a), "check-config"), 8123),
        (("check-config", "--config", str(b)), 8124),
        (("--config", str(a), "check-config", "--config", str(b)), 8124),
    ):
        proc = _cli(env, tmp_path, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert f'"admin_port": {port}' in proc.stdout, args


# --- non-finite and huge numbers ------------------------------------------------------------------


def _float_settings() -> list[str]:
    """Every setting that holds seconds, days or another float, as a number or a list of them."""
    from cti_bridge.config import Settings

    return sorted(
        name
        for name, field in Settings.model_fields.items()
        if field.annotation is float or field.annotation == list[float] or name == "retry_schedule"
    )


def test_the_float_settings_are_found() -> None:
    """The test below covers every float setting (the reviewer counted 15 that took ``inf``)."""
    names = _float_settings()
    assert len(names) >= 20
    for name in ("lease_seconds", "retry_schedule", "login_lockout_seconds", "connect_timeout"):
        assert name in names


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e15", "1e300"])
def test_every_float_setting_refuses_non_finite_and_huge_values(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inf`` passed and then broke the daemon (a lease of ``inf`` failed every commit,
    ``0,inf`` as the retry schedule an OverflowError in a task, a lockout of ``inf`` a 500), and so
    did values past what datetime and timedelta arithmetic can take (a lease of 1e15 s)."""
    for name in _float_settings():
        variable = "CTI_BRIDGE_" + name.upper()
        monkeypatch.setenv(variable, f"0,{value}" if name == "retry_schedule" else value)
        with pytest.raises(ConfigError) as info:
            load_settings()
        assert str(info.value).startswith(variable + ":"), (name, str(info.value))
        monkeypatch.delenv(variable)


def test_a_huge_session_lifetime_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An integer duration too: a session's ``validUntil`` is now + this (a timedelta)."""
    monkeypatch.setenv("CTI_BRIDGE_SESSION_TTL_SECONDS", str(10**15))
    with pytest.raises(ConfigError, match=r"^CTI_BRIDGE_SESSION_TTL_SECONDS: .*\(ten years\)$"):
        load_settings()


def test_every_duration_at_its_bound_loads_and_stays_computable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounds are far beyond any real setting and still inside what the daemon computes with
    them: a datetime now + the longest (and + the longest retry delay with its full jitter), a
    thread's or socket's timeout, libpq's int connect_timeout, PostgreSQL's idle_session_timeout
    in milliseconds (3 x the replica poll)."""
    import socket
    import threading
    from datetime import UTC, datetime, timedelta

    from cti_bridge.config import MAX_REPLICA_POLL_SECONDS, MAX_SECONDS

    for name in _float_settings():
        if name not in ("retry_jitter", "retention_days", "dead_retention_days", "replica_poll_seconds"):
            monkeypatch.setenv("CTI_BRIDGE_" + name.upper(), str(MAX_SECONDS))
    monkeypatch.setenv("CTI_BRIDGE_REQUEST_TIMEOUT", "1")  # the lease must outlast 2 of them
    monkeypatch.setenv("CTI_BRIDGE_SESSION_TTL_SECONDS", str(MAX_SECONDS))
    monkeypatch.setenv("CTI_BRIDGE_REPLICA_POLL_SECONDS", str(MAX_REPLICA_POLL_SECONDS))
    monkeypatch.setenv("CTI_BRIDGE_RETRY_JITTER", "1")
    s = load_settings()
    assert s.lease_seconds == s.retry_schedule[-1] == s.session_ttl_seconds == MAX_SECONDS
    assert datetime.now(UTC) + timedelta(seconds=2 * MAX_SECONDS) < datetime.max.replace(tzinfo=UTC)
    assert MAX_SECONDS < threading.TIMEOUT_MAX and MAX_SECONDS < 2**31
    with socket.socket() as sock:
        sock.settimeout(MAX_SECONDS)
    assert 3 * MAX_REPLICA_POLL_SECONDS * 1000 < 2**31
    for too_long in (MAX_SECONDS + 1, 1e15):
        monkeypatch.setenv("CTI_BRIDGE_LEASE_SECONDS", str(too_long))
        with pytest.raises(ConfigError, match=r"^CTI_BRIDGE_LEASE_SECONDS: .*\(ten years\)$"):
            load_settings()


@pytest.mark.parametrize("value", ["inf", "nan", "1e15"])
@pytest.mark.parametrize(
    "variable",
    [
        "CTI_BRIDGE_LEASE_SECONDS",
        "CTI_BRIDGE_RETRY_SCHEDULE",
        "CTI_BRIDGE_LOGIN_LOCKOUT_SECONDS",
        "CTI_BRIDGE_CONNECT_TIMEOUT",
        "CTI_BRIDGE_XELION_PING_INTERVAL",
    ],
)
def test_check_config_refuses_non_finite_and_huge_numbers(variable: str, value: str, tmp_path: Path) -> None:
    env = _clean_env()
    env[variable] = f"0,5,{value}" if variable == "CTI_BRIDGE_RETRY_SCHEDULE" else value
    proc = _check_config(env, tmp_path)
    assert proc.returncode == ExitCode.CONFIG, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"cti-bridge: invalid setting: {variable}: ")
    if variable == "CTI_BRIDGE_RETRY_SCHEDULE":
        assert ": value 3: " in lines[0]  # which of the values


def test_a_non_finite_number_in_the_toml_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("retry_schedule = [0, 5, inf]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(cfg))
    assert str(info.value) == f"retry_schedule in {cfg}: value 3: Input should be a finite number"


# --- check-config masks the Xelion app key ---------------------------------------------------------


def test_check_config_masks_the_xelion_app_key(tmp_path: Path) -> None:
    """It printed ``"xelion_app_key": "<the value>"`` while the other secrets were masked."""
    env = _clean_env()
    env["CTI_BRIDGE_XELION_APP_KEY"] = "xelion-app-key-S3CR3T"
    env["CTI_BRIDGE_SECRET_KEY"] = "k" * 44
    proc = _check_config(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "S3CR3T" not in proc.stdout + proc.stderr
    assert '"xelion_app_key": "**********"' in proc.stdout
    assert '"secret_key": "**********"' in proc.stdout  # as the other secrets show
    del env["CTI_BRIDGE_XELION_APP_KEY"]
    assert '"xelion_app_key": null' in _check_config(env, tmp_path).stdout  # not set: shown so


# --- a faulty TOML key or value is named as the file's key -----------------------------------------


def test_a_misspelt_key_of_the_toml_file_is_named_as_the_files_key(tmp_path: Path) -> None:
    """It was reported as ``CTI_BRIDGE_ADMN_PORT: Extra inputs are not permitted``, a variable
    that does not exist."""
    cfg = tmp_path / "file.toml"
    cfg.write_text("admn_port = 9000\n")
    proc = _cli(_clean_env(), tmp_path, "check-config", "--config", str(cfg))
    assert proc.returncode == ExitCode.CONFIG, proc.stdout
    assert proc.stderr.strip() == (
        f"cti-bridge: invalid setting: admn_port in {cfg}: unknown setting (see the README's Settings)"
    )
    assert "CTI_BRIDGE_ADMN_PORT" not in proc.stderr


def test_a_bad_value_is_named_where_it_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's key when the file gave it, the variable when the environment did (it wins)."""
    cfg = tmp_path / "file.toml"
    cfg.write_text('admin_port = "http"\nlog_level = "INFO"\n')
    monkeypatch.setenv("CTI_BRIDGE_CONFIG", str(cfg))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(f"admin_port in {cfg}: Input should be a valid integer")
    monkeypatch.setenv("CTI_BRIDGE_ADMIN_PORT", "also-not-a-port")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("CTI_BRIDGE_ADMIN_PORT: Input should be a valid integer")
    monkeypatch.setenv("CTI_BRIDGE_ADMIN_PORT", "9000")  # the environment's good value wins
    monkeypatch.setenv("CTI_BRIDGE_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match=r"^CTI_BRIDGE_LOG_LEVEL: "):
        load_settings()
    cfg.write_text('admin_port = 9000\nlog_level = "LOUD"\n')
    monkeypatch.delenv("CTI_BRIDGE_LOG_LEVEL")
    with pytest.raises(ConfigError, match="^" + re.escape(f"log_level in {cfg}: ")):
        load_settings()
