from __future__ import annotations

import hashlib
import hmac

import pytest

from gptload.lib.crypto import Cipher, DecryptionError


def test_without_a_key_values_are_stored_as_they_are():
    cipher = Cipher("")
    assert cipher.encrypt("sk-live-1") == "sk-live-1"
    assert cipher.decrypt("sk-live-1") == "sk-live-1"
    assert cipher.hash("sk-live-1") == hashlib.sha256(b"sk-live-1").hexdigest()


def test_with_a_key_values_round_trip_and_differ_each_time():
    cipher = Cipher("a-long-encryption-secret-value")
    first, second = cipher.encrypt("sk-live-1"), cipher.encrypt("sk-live-1")
    assert first != second != "sk-live-1"
    assert "sk-live-1" not in first
    assert cipher.decrypt(first) == cipher.decrypt(second) == "sk-live-1"
    bytes.fromhex(first)  # stored as hex, as GPT-Load does


def test_the_format_is_gpt_loads():
    secret = "a-long-encryption-secret-value"
    derived = hashlib.pbkdf2_hmac(
        "sha256", secret.encode(), b"gpt-load-encryption-v1", 100_000, dklen=32
    )
    cipher = Cipher(secret)
    assert cipher.hash("sk-x") == hmac.new(derived, b"sk-x", hashlib.sha256).hexdigest()
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = bytes.fromhex(cipher.encrypt("sk-x"))
    assert AESGCM(derived).decrypt(raw[:12], raw[12:], None) == b"sk-x"


def test_a_different_key_cannot_decrypt():
    stored = Cipher("first-encryption-secret").encrypt("sk-live-1")
    with pytest.raises(DecryptionError):
        Cipher("second-encryption-secret").decrypt(stored)
    with pytest.raises(DecryptionError):
        Cipher("first-encryption-secret").decrypt("sk-plaintext-not-hex")
