"""Settings: environment variables ``CTI_BRIDGE_*``, optionally a TOML file, validated at start.

Precedence: environment variables over the TOML file (``--config FILE`` or ``CTI_BRIDGE_CONFIG``)
over the defaults. ``config/cti-bridge.example.toml`` shows every key; README.md documents each.
An invalid setting raises ``ConfigError`` with one line that names it where it was given (the
``CTI_BRIDGE_*`` variable, or the key of the TOML file); the CLI then exits with ``ExitCode.CONFIG``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cti_bridge.errors import ConfigError

ENV_PREFIX = "CTI_BRIDGE_"
DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 10800.0, 21600.0)
# The requests a delivery attempt makes one after another: a token refresh and the CRM request
# (see Settings._lease_covers_an_attempt).
ATTEMPT_REQUESTS = 2
# The longest any duration setting may be: ten years, more than any operator means, and far below
# what the daemon's arithmetic with it can take (datetime ends at the year 9999, timedelta at 2.7
# million years, a threading or socket timeout at about 292 years, libpq's connect_timeout at
# 2**31 s). ``inf`` and ``nan`` are refused by every float setting (``allow_inf_nan=False``):
# accepted, they failed later in the running daemon (a lease of ``inf`` failed every commit).
MAX_SECONDS = 10 * 365 * 86400
# A replica's lock connection has an idle timeout of 3 x replica_poll_seconds, which PostgreSQL takes
# in milliseconds up to 2**31 - 1 (24.8 days): a week of polling keeps it inside that.
MAX_REPLICA_POLL_SECONDS = 7 * 86400
# How an error names those bounds.
SPANS = {MAX_SECONDS: "ten years", MAX_REPLICA_POLL_SECONDS: "a week"}
# A bound float of seconds: finite (the model's config), non-negative, at most MAX_SECONDS.
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS)]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _url_host(url: str) -> str | None:
    """The host of a database URL as SQLAlchemy reads it (None when it reads none)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).host
    except ArgumentError:
        raise ValueError("is not a database URL") from None


class Settings(BaseSettings):
    """Every setting of the daemon. Field ``foo`` is ``CTI_BRIDGE_FOO`` in the environment."""

    # Every float is finite, and every duration (seconds) at most MAX_SECONDS, ten years (the
    # replica poll a week): bounds no operator meets that keep datetime, timedelta and timeout
    # arithmetic from overflowing in the running daemon.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, allow_inf_nan=False)

    # Storage
    database_url: str = "sqlite:///./cti-bridge.db"
    secret_key: SecretStr | None = None
    secret_key_file: str | None = None  # default: "<database>.key" beside an SQLite database

    # Admin API
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8080, ge=0, le=65535)
    admin_token: SecretStr | None = None
    session_ttl_seconds: int = Field(default=3600, ge=60, le=MAX_SECONDS)
    login_failures_before_delay: int = Field(default=5, ge=1)
    login_lockout_seconds: float = Field(default=30.0, ge=0, le=MAX_SECONDS)

    # Who may POST crm-integrations without the operator token: "host[:port]" entries, "*" for any.
    allowed_xelion_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Outbound guard (reliability.md §15): allow loopback/private CRM and Xelion addresses.
    allow_private_targets: bool = False

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # Xelion source (xelion-protocol.md §2-§3)
    xelion_ping_interval: float = Field(default=20.0, gt=0, le=MAX_SECONDS)
    xelion_ping_timeout: float = Field(default=20.0, gt=0, le=MAX_SECONDS)
    xelion_backoff_min: float = Field(default=1.0, gt=0, le=MAX_SECONDS)
    xelion_backoff_max: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    xelion_healthy_after: float = Field(default=30.0, ge=0, le=MAX_SECONDS)
    # How often a subscribed source stores that it is listening (0: never): after a kill -9 the
    # downtime gap starts at most this long before the daemon stopped listening (reliability §18).
    source_heartbeat_seconds: float = Field(default=30.0, ge=0, le=MAX_SECONDS)
    xelion_request_timeout: float = Field(default=10.0, gt=0, le=MAX_SECONDS)
    xelion_app_key: str | None = None

    # Delivery (reliability.md §6-§9, §20)
    connect_timeout: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    request_timeout: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    max_response_bytes: int = Field(default=1024 * 1024, ge=1024)
    per_host_concurrency: int = Field(default=8, ge=1)
    worker_concurrency: int = Field(default=64, ge=1)
    retry_schedule: Annotated[list[Seconds], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE), min_length=1
    )
    retry_jitter: float = Field(default=0.2, ge=0, le=1)
    retry_after_cap_seconds: float = Field(default=86400.0, gt=0, le=MAX_SECONDS)
    lease_seconds: float = Field(default=120.0, gt=0, le=MAX_SECONDS)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=MAX_SECONDS)
    token_refresh_margin_seconds: float = Field(default=60.0, ge=0, le=MAX_SECONDS)

    # Retention (retention.py): days of history kept; 0 keeps it for ever
    retention_days: float = Field(default=30.0, ge=0, le=36500)
    dead_retention_days: float = Field(default=0.0, ge=0, le=36500)
    retention_interval_seconds: float = Field(default=3600.0, gt=0, le=MAX_SECONDS)
    # PostgreSQL upkeep (store/vacuum.py): VACUUM delivery, delivery_attempt or call_event at this
    # many dead row versions in it (0: never), checked this often
    pg_vacuum_dead_rows: int = Field(default=10000, ge=0)
    pg_vacuum_check_seconds: float = Field(default=2.0, gt=0, le=MAX_SECONDS)
    # PostgreSQL replicas (xelion/ownership.py): how often a standby tries to take an integration's
    # websocket, the owner checks its lock connection, and a replica picks up integrations that were
    # created, changed or deleted through another replica's admin API
    replica_poll_seconds: float = Field(default=5.0, gt=0, le=MAX_REPLICA_POLL_SECONDS)

    @field_validator("allowed_xelion_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("secret_key")
    @classmethod
    def _key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: str) -> str:
        if not (value.startswith("sqlite:") or value.startswith("postgresql")):
            raise ValueError("must start with sqlite:/// or postgresql+psycopg://")
        if value.startswith("postgresql://"):
            # One driver for PostgreSQL: psycopg 3.
            value = "postgresql+psycopg://" + value[len("postgresql://") :]
        if value.startswith("postgresql") and "@" in (_url_host(value) or ""):
            # The password ends at its first '@' (a '/' in it does not end it), so the rest of it
            # became part of the host name, which every connection error then printed. Judged on
            # the host SQLAlchemy reads, as the connection would be; the value is not quoted here.
            raise ValueError(
                "holds more than one '@' before the host: percent-encode an '@' of the password as %40"
            )
        return value

    @model_validator(mode="after")
    def _key_needed(self) -> Settings:
        if self.secret_key is None and not self.is_sqlite:
            raise ValueError("secret_key: must be set when the database is not an embedded SQLite file")
        if self.xelion_backoff_max < self.xelion_backoff_min:
            raise ValueError("xelion_backoff_max: must not be smaller than xelion_backoff_min")
        return self

    @model_validator(mode="after")
    def _lease_covers_an_attempt(self) -> Settings:
        """``lease_seconds > 2 * request_timeout``: reliability.md §4's "longer than the request
        timeout plus a token refresh".

        A shorter lease lets another worker claim a delivery that a live worker is still sending,
        and the CRM gets it twice. ``request_timeout`` bounds each request whole, connecting
        included: the CRM request (delivery/http1.py) and the token request (the same settings'
        ``build_http_client``, delivery/egress.py), so an attempt that refreshes its token first
        ends within two of them. The rarer attempt that meets a 401 (§6: refresh once, retry once)
        makes two more; if it outlasts the lease, the newer claim decides and the CRM may see the
        request twice, with the same Idempotency-Key, which the at-least-once promise allows.
        """
        least = ATTEMPT_REQUESTS * self.request_timeout
        if self.lease_seconds <= least:
            raise ValueError(
                f"lease_seconds: must be longer than {ATTEMPT_REQUESTS} x {ENV_PREFIX}REQUEST_TIMEOUT "
                f"({ATTEMPT_REQUESTS} x {self.request_timeout:g} s = {least:g} s), "
                f"not {self.lease_seconds:g} s: a delivery attempt makes a token refresh and the CRM "
                "request, each up to the request timeout, and its lease must outlast both"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite:")

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of an SQLite URL (None for in-memory or another database)."""
        if not self.is_sqlite:
            return None
        rest = self.database_url.split(":///", 1)[1] if ":///" in self.database_url else ""
        if not rest or rest == ":memory:":
            return None
        return Path(rest.split("?", 1)[0])

    @property
    def key_file(self) -> Path | None:
        """The key file ``run`` reads, or creates when it is missing (app.secret_key_for): None when
        ``secret_key`` is set or the SQLite database is in memory."""
        if self.secret_key is not None:
            return None
        if self.secret_key_file:
            return Path(self.secret_key_file)
        db_path = self.sqlite_path
        return None if db_path is None else db_path.with_name(db_path.name + ".key")

    def host_allowed(self, host: str) -> bool:
        """Whether a Xelion ``host[:port]`` is in ``allowed_xelion_hosts`` (``*`` allows any)."""
        wanted = host.strip().lower()
        for entry in self.allowed_xelion_hosts:
            entry = entry.lower()
            if entry == "*" or entry == wanted:
                return True
            # "example.com" allows "example.com:443" too; "example.com:8443" only that port.
            if ":" not in entry and wanted.rsplit(":", 1)[0] == entry:
                return True
        return False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """The ``CTI_BRIDGE_*`` variables that name no setting (a typo: ``CTI_BRIDGE_RETENTON_DAYS``)."""
    # CONFIG names the file; TEST_PG_URL is the test suite's PostgreSQL server (README, Development).
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    known |= {ENV_PREFIX + "CONFIG", ENV_PREFIX + "TEST_PG_URL"}
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Build the settings, or raise ConfigError with one line naming the faulty setting. A
    ``CTI_BRIDGE_*`` variable that names no setting is refused, as an unknown key of the TOML file
    is: silently ignored, a misspelt one left its setting at the default."""
    path = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
    cls: type[Settings] = Settings
    if path and not Path(path).is_file():
        raise ConfigError(f"CTI_BRIDGE_CONFIG: the file {path} does not exist")
    unknown = unknown_environment(os.environ)
    if unknown:
        raise ConfigError(f"{unknown[0]}: no such setting (see the README's Settings)")
    if path:

        class FileSettings(Settings):
            model_config = SettingsConfigDict(toml_file=path)

        cls = FileSettings
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, path, overrides)) from None
    except Exception as exc:  # a TOML syntax error, an unreadable file
        raise ConfigError(f"CTI_BRIDGE_CONFIG: cannot read {path}: {exc}") from None


def _first_error(exc: ValidationError, path: str | None, overrides: Mapping[str, Any]) -> str:
    """The line for the first error: the setting named where it was given, and what is wrong."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not loc and ":" in msg:
        # Model-level checks name the field themselves: "Value error, field: message".
        field, msg = msg.split(":", 1)
        loc = [field]
    if err["type"] == "extra_forbidden":
        msg = "unknown setting (see the README's Settings)"
    bound = (err.get("ctx") or {}).get("le")
    if err["type"] == "less_than_equal" and bound in SPANS:
        msg = f"{msg} seconds ({SPANS[bound]})"
    if len(loc) > 1 and loc[1].isdigit():  # an item of a list: RETRY_SCHEDULE's second value
        msg = f"value {int(loc[1]) + 1}: {msg.strip()}"
    name = _given_as(loc[0], path, overrides) if loc else "settings"
    return f"{name}: {msg.strip()}"


def _given_as(field: str, path: str | None, overrides: Mapping[str, Any]) -> str:
    """How the operator wrote setting ``field``: the environment variable, which wins over the
    file, or the key of the TOML file (naming a variable that was never set sent them looking for
    it). A setting given nowhere (its default) is named by its variable too."""
    variable = ENV_PREFIX + field.upper()
    if field in overrides or any(k.upper() == variable for k in os.environ):
        return variable
    for key in _file_keys(path):
        if key.lower() == field.lower():
            return f"{key} in {path}"
    return variable


def overridden_by_environment(config_file: str | None = None) -> list[tuple[str, str]]:
    """The TOML file's keys that an environment variable also sets, with that variable: the file's
    value is not used (the environment wins). The Docker image sets three such variables itself
    (the database URL, the admin host and port), so a file that set them was silently passed over,
    and a PostgreSQL URL in it left each container on an SQLite file of its own (an operator
    walkthrough's finding); ``run`` and ``check-config`` now log a warning for each."""
    path = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
    names = {k.upper() for k in os.environ}
    return [(key, ENV_PREFIX + key.upper()) for key in _file_keys(path) if ENV_PREFIX + key.upper() in names]


def _file_keys(path: str | None) -> list[str]:
    """The top-level keys of the TOML file (none without one, or if it cannot be read)."""
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            return list(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError):
        return []
