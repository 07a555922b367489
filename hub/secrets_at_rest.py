"""Client secrets encrypted at rest: AES-256-GCM under a key kept outside the database.

The hub must verify HMACs, so it needs each client's raw secret: a one-way hash would not
do. What this protects, and what it does not:

- A copy of ``hub.sqlite3`` alone (a backup, a file attached to a bug report, a disk image
  of the database volume) reveals no secret: each is AES-GCM ciphertext under a 256-bit
  key that is not in the database.
- Anyone who can read both the database and the key file, or who runs as the hub's user
  (and so can read the hub's memory), has every secret. Keep the key on another volume, or
  provision it from a secret manager into a tmpfs file, by pointing
  ``FEDVLM_HUB_SECRETS_KEY_FILE`` (or ``--secrets-key-file`` / ``secrets_key_file`` in the
  TOML) at it; by default it lives beside the database in the state directory (mode 0600),
  which only protects against the database file leaking on its own.
- The client id is the AES-GCM associated data, so someone who can write the database
  cannot move one client's ciphertext onto another client's row.

A key file holds 32 random bytes as URL-safe base64 text on one line. Its id (a keyed
hash, not the key) is recorded in the database, so a hub started with the wrong key file
says so instead of failing every update with ``bad_signature``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .errors import HubError

__all__ = [
    "SECRETS_KEY_ENVIRONMENT",
    "DEFAULT_KEY_FILE_NAME",
    "ENCRYPTED_PREFIX",
    "SecretsKeyError",
    "SecretBox",
    "resolve_key_path",
]

SECRETS_KEY_ENVIRONMENT = "FEDVLM_HUB_SECRETS_KEY_FILE"
DEFAULT_KEY_FILE_NAME = "secrets.key"
# Stored values start with this, so a plain-text secret left by an older hub is recognised
# (and migrated) rather than used as ciphertext. Plain secrets are URL-safe base64, which
# never contains ':'.
ENCRYPTED_PREFIX = "aesgcm1:"
_KEY_BYTES = 32
_NONCE_BYTES = 12  # AES-GCM's standard nonce; random nonces are safe far beyond any registry size


class SecretsKeyError(HubError):
    """The key that encrypts client secrets is missing, unreadable, exposed or the wrong one."""


def resolve_key_path(state_dir: str | Path, configured: str | Path | None = None) -> Path:
    """Where the secrets key is: ``configured``, else the environment variable, else the state dir."""
    if configured:
        return Path(configured).expanduser()
    from_environment = os.environ.get(SECRETS_KEY_ENVIRONMENT)
    if from_environment:
        return Path(from_environment).expanduser()
    return Path(state_dir) / DEFAULT_KEY_FILE_NAME


class SecretBox:
    """Encrypts and decrypts client secrets with one AES-256-GCM key."""

    def __init__(self, key: bytes, path: Path | None = None) -> None:
        if len(key) != _KEY_BYTES:
            raise SecretsKeyError(f"a secrets key must be {_KEY_BYTES} bytes, got {len(key)}")
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:  # pragma: no cover - depends on the install
            raise SecretsKeyError("encrypting client secrets needs the cryptography package: "
                                  "pip install 'fedvlm[hub]'") from None  # fmt: skip
        self._aead = AESGCM(key)
        self.path = path
        # Identifies the key without revealing it: an HMAC of a fixed label under the key.
        self.key_id = hmac.new(key, b"fedvlm secrets key id", hashlib.sha256).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path, *, create: bool) -> SecretBox:
        """Read the key file; with ``create``, make a new one (mode 0600) if there is none."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise SecretsKeyError(
                    f"the key that encrypts this hub's client secrets is missing: {path} does not exist. "
                    f"Restore it from your backup, or set {SECRETS_KEY_ENVIRONMENT} (--secrets-key-file) to where "
                    "it is; without it the registered clients must be registered again"
                )
            text = base64.urlsafe_b64encode(secrets.token_bytes(_KEY_BYTES)).decode("ascii")
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except (FileExistsError, NotADirectoryError):
                raise SecretsKeyError(f"cannot create the secrets key {path}: a part of its folder path is a file; "
                                      "give --secrets-key-file a path in a folder") from None
            # O_EXCL: two processes creating the key at once must not end with different keys.
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return cls.load(path, create=False)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SecretsKeyError(f"the secrets key {path} is readable by other users (mode {mode:04o}); "
                                  f"make it private with `chmod 600 {path}`")  # fmt: skip
        try:
            key = base64.urlsafe_b64decode(path.read_text().strip().encode("ascii"))
        except (OSError, UnicodeError, binascii.Error, ValueError) as error:
            raise SecretsKeyError(f"cannot read the secrets key {path}: {error}") from None
        if len(key) != _KEY_BYTES:
            raise SecretsKeyError(f"{path} is not a FedVLM secrets key ({_KEY_BYTES} bytes as URL-safe base64 "
                                  f"expected, found {len(key)} bytes)")  # fmt: skip
        return cls(key, path)

    def encrypt(self, secret: str, client_id: str) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode("utf-8"), client_id.encode("utf-8"))
        return ENCRYPTED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, stored: str, client_id: str) -> str:
        from cryptography.exceptions import InvalidTag

        if not is_encrypted(stored):
            raise SecretsKeyError(f"the stored secret of {client_id!r} is not encrypted")
        try:
            raw = base64.urlsafe_b64decode(stored[len(ENCRYPTED_PREFIX):].encode("ascii"))
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], client_id.encode("utf-8"))
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretsKeyError(f"the stored secret of client {client_id!r} does not decrypt with the key "
                                  f"{self.path or ''} (id {self.key_id}): wrong key, or the database row was "
                                  "altered") from None  # fmt: skip
        return plain.decode("utf-8")


def is_encrypted(stored: str) -> bool:
    return stored.startswith(ENCRYPTED_PREFIX)
