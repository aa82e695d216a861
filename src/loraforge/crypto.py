"""Secrets at rest: the organizations' integration keys, encrypted with Fernet (AES-128-CBC + HMAC).

The key is ``LORAFORGE_SECRET_KEY`` (any passphrase, stretched with SHA-256), else a random key in
``$LORAFORGE_HOME/secret.key`` made on first use (mode 0600). The API encrypts, the worker
decrypts: both must see the same key (the same home, or the same ``LORAFORGE_SECRET_KEY``).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from loraforge.settings import Settings

KEY_FILE = "secret.key"


class SecretUnreadableError(ValueError):
    """A stored secret cannot be decrypted (the key changed, or the value was altered)."""


def _key_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made before, or by another process just now
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(Fernet.generate_key())
    return path.read_bytes().strip()


def _fernet(settings: Settings) -> Fernet:
    passphrase = settings.secret_key.get_secret_value()
    if passphrase:
        return Fernet(base64.urlsafe_b64encode(hashlib.sha256(passphrase.encode()).digest()))
    return Fernet(_key_file(settings.home / KEY_FILE))


def encrypt(settings: Settings, value: str) -> str:
    """``value`` encrypted (a Fernet token, ASCII)."""
    return _fernet(settings).encrypt(value.encode()).decode()


def decrypt(settings: Settings, token: str) -> str:
    """The value :func:`encrypt` gave ``token`` for.

    Raises:
        SecretUnreadableError: the key is not the one it was encrypted with, or the token was altered.
    """
    try:
        return _fernet(settings).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretUnreadableError("the stored secret cannot be decrypted with this secret key") from exc


def hint(value: str) -> str:
    """What may be shown of a secret: its last four characters."""
    return "…" + value[-4:] if len(value) > 8 else "…"
