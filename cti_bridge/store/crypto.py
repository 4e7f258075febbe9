"""Encryption of secrets at rest (passwords, client secrets, device codes, refresh and access tokens).

Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) with a key derived by HKDF-SHA256 from
``CTI_BRIDGE_SECRET_KEY``. In the embedded default (SQLite, no key configured) a random key is
generated once into a file beside the database, mode 0600, with a warning: losing that file makes the
stored secrets unreadable, so operators should set the key explicitly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cti_bridge.errors import ConfigError

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 32
#: The setting a faulty key file is reported under (the default file beside the database too).
KEY_FILE_SETTING = "CTI_BRIDGE_SECRET_KEY_FILE"
_HKDF_INFO = b"cti-bridge secrets at rest v1"


class SecretDecryptError(Exception):
    """A stored secret cannot be decrypted: the secret key changed or the value was tampered with."""


class SecretBox:
    """Encrypts and decrypts the secret columns (``*_enc``). One instance, built by ``app.py``."""

    def __init__(self, secret_key: str) -> None:
        if len(secret_key) < MIN_KEY_LENGTH:
            raise ValueError(f"the secret key must have at least {MIN_KEY_LENGTH} characters")
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
            secret_key.encode()
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(raw))

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, ValueError) as exc:
            raise SecretDecryptError("a stored secret cannot be decrypted with the configured key") from exc

    def encrypt_opt(self, plain: str | None) -> str | None:
        return None if plain is None else self.encrypt(plain)

    def decrypt_opt(self, token: str | None) -> str | None:
        return None if token is None else self.decrypt(token)


def hash_token(token: str) -> str:
    """SHA-256 hex of a bearer token: API session tokens are stored only as this."""
    return hashlib.sha256(token.encode()).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    """Compare secrets without leaking where they differ through timing."""
    return hmac.compare_digest(a.encode(), b.encode())


def read_key_file(path: Path) -> str | None:
    """The key in a key file, None when there is none (``load_or_create_key_file`` creates it).

    A file that cannot serve (too short, a directory, unreadable, not text) is ``ConfigError``
    naming ``CTI_BRIDGE_SECRET_KEY_FILE``: an invalid setting (exit 3, one line), found by
    ``check-config`` as by ``run``, not a traceback or "database unavailable".
    """
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: UnicodeDecodeError, bytes that are not text
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{KEY_FILE_SETTING}: cannot read the key file {path}: {reason}") from None
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"{KEY_FILE_SETTING}: the key file {path} holds fewer than {MIN_KEY_LENGTH} characters"
        )
    return key


def load_or_create_key_file(path: Path) -> str:
    """Read the generated key beside an embedded database, creating it (mode 0600) on first use."""
    key = read_key_file(path)
    if key is not None:
        return key
    key = secrets.token_urlsafe(48)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
    except OSError as exc:
        raise ConfigError(f"{KEY_FILE_SETTING}: cannot create the key file {path}: {exc}") from None
    log.warning(
        "CTI_BRIDGE_SECRET_KEY is not set: generated a key file %s (mode 0600). Keep it with the "
        "database, or set CTI_BRIDGE_SECRET_KEY; without it the stored secrets cannot be read.",
        path,
    )
    return key
