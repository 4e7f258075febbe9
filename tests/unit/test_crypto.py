"""Secrets at rest: encryption round trip, wrong key, the generated key file, redaction of logs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cti_bridge.logs import redact
from cti_bridge.store.crypto import (
    SecretBox,
    SecretDecryptError,
    constant_time_equal,
    hash_token,
    load_or_create_key_file,
)


def test_round_trip_and_no_plaintext() -> None:
    box = SecretBox("x" * 40)
    token = box.encrypt("refresh-token-value")
    assert "refresh-token-value" not in token
    assert box.decrypt(token) == "refresh-token-value"
    assert box.encrypt("same") != box.encrypt("same")  # random IV: equal secrets do not look equal


def test_wrong_key_is_a_clear_error() -> None:
    token = SecretBox("a" * 40).encrypt("v")
    with pytest.raises(SecretDecryptError) as info:
        SecretBox("b" * 40).decrypt(token)
    assert "v" != str(info.value) and "key" in str(info.value)


def test_short_key_refused() -> None:
    with pytest.raises(ValueError):
        SecretBox("short")


def test_key_file_generated_with_mode_0600(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cti-bridge.db.key"
    key = load_or_create_key_file(path)
    assert len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "generated a key file" in caplog.text
    assert key not in caplog.text
    assert load_or_create_key_file(path) == key  # stable across starts


def test_token_hash_and_compare() -> None:
    assert hash_token("abc") == hash_token("abc") != hash_token("abd")
    assert constant_time_equal("s3cret", "s3cret") and not constant_time_equal("s3cret", "s3creT")


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi.payload.sig"),
        ("POST /x?access_token=abc123def456&y=1", "abc123def456"),
        ('{"refreshToken": "r-123456789"}', "r-123456789"),
        ("client_secret=shhh-secret", "shhh-secret"),
        ("connect ws://pbx/websocket/-1/1650938/2045869/FTEby8WCyGkcAxLz", "FTEby8WCyGkcAxLz"),
    ],
)
def test_redaction(line: str, secret: str) -> None:
    assert secret not in redact(line)
