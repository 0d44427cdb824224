"""Encryption at rest for upstream keys, compatible with GPT-Load's format.

With `ENCRYPTION_KEY` set: AES-256-GCM with a key derived by PBKDF2-SHA256 (100,000
iterations, GPT-Load's fixed salt), stored as hex(nonce ‖ ciphertext ‖ tag), and the
lookup hash is HMAC-SHA256 under the derived key. Without it: values are stored as they
are and the hash is plain SHA-256. Same scheme as GPT-Load, so its databases move over.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SALT = b"gpt-load-encryption-v1"
ITERATIONS = 100_000
NONCE_BYTES = 12


class DecryptionError(ValueError):
    """A stored value is not ciphertext of the configured key."""


class Cipher:
    """Encrypts, decrypts and hashes secrets under one `ENCRYPTION_KEY` (or none)."""

    def __init__(self, secret: str = "") -> None:
        self.enabled = bool(secret)
        self._key = _derive(secret) if secret else b""
        self._aead = AESGCM(self._key) if secret else None

    def encrypt(self, plaintext: str) -> str:
        if self._aead is None:
            return plaintext
        nonce = os.urandom(NONCE_BYTES)
        return (nonce + self._aead.encrypt(nonce, plaintext.encode(), None)).hex()

    def decrypt(self, stored: str) -> str:
        """The plaintext of a stored value; raises `DecryptionError` if it is not ours."""
        if self._aead is None:
            return stored
        try:
            raw = bytes.fromhex(stored)
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], None).decode()
        except (ValueError, InvalidTag, UnicodeDecodeError):
            raise DecryptionError(
                "value is not encrypted with the configured ENCRYPTION_KEY"
            ) from None

    def hash(self, plaintext: str) -> str:
        if not self.enabled:
            return hashlib.sha256(plaintext.encode()).hexdigest()
        return hmac.new(self._key, plaintext.encode(), hashlib.sha256).hexdigest()


@lru_cache(maxsize=4)
def _derive(secret: str) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), SALT, ITERATIONS, dklen=32)


@lru_cache(maxsize=4)
def cipher_for(secret: str) -> Cipher:
    return Cipher(secret)


def current_cipher() -> Cipher:
    """The cipher of the configured `ENCRYPTION_KEY`."""
    from django.conf import settings

    return cipher_for(settings.ENCRYPTION_KEY)


def read_under(cipher: Cipher, stored: str, key_hash: str) -> str | None:
    """The plaintext of a stored key if it was written under `cipher`, else None."""
    try:
        plain = cipher.decrypt(stored)
    except DecryptionError:
        return None
    return plain if hmac.compare_digest(cipher.hash(plain), key_hash) else None
