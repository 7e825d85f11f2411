"""Encryption at rest: a master key wraps one random AES-GCM data key per member (crypto-shredding by key deletion)."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.settings import Settings
from data.errors import MasterKeyError

NONCE = 12
KEY_BYTES = 32


def _decode_key(text: str, where: str) -> bytes:
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 64:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != KEY_BYTES:
        raise MasterKeyError(f"{where}: master key must be 32 bytes, base64 or hex encoded")
    return raw


def load_master_key(env_value: str | None, key_path: Path) -> bytes:
    """The master key from DOPPEL_MASTER_KEY, else from `key_path`, created with mode 0600 on first use."""
    if env_value:
        return _decode_key(env_value, "DOPPEL_MASTER_KEY")
    if key_path.exists():
        try:
            return _decode_key(key_path.read_text(encoding="ascii"), str(key_path))
        except UnicodeDecodeError:
            raise MasterKeyError(f"{key_path}: master key must be 32 bytes, base64 or hex encoded") from None
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    # O_EXCL: two processes starting at once must not each write a different key.
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_master_key(None, key_path)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(base64.b64encode(key).decode("ascii") + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


def message_ad(member_id: str, message_id: str) -> bytes:
    """Associated data binding a message ciphertext to its message and author."""
    return b"msg\x00" + member_id.encode() + b"\x00" + message_id.encode()


def seal(aead: AESGCM, plaintext: bytes, ad: bytes) -> bytes:
    """Encrypt with a fresh random nonce; the nonce is stored in front of the ciphertext."""
    nonce = os.urandom(NONCE)
    return nonce + aead.encrypt(nonce, plaintext, ad)


def unseal(aead: AESGCM, blob: bytes, ad: bytes) -> bytes:
    """Decrypt a `seal` output; raises InvalidTag when the key or associated data do not match."""
    return aead.decrypt(blob[:NONCE], blob[NONCE:], ad)


class Keyring:
    """Wraps and unwraps member data keys; caches unwrapped keys for the life of one Store only."""

    def __init__(self, master_key: bytes) -> None:
        self._master = AESGCM(master_key)
        self._cache: dict[str, AESGCM] = {}

    def new_wrapped(self, member_id: str) -> tuple[bytes, AESGCM]:
        """A fresh member key: (wrapped bytes to store, cipher to use)."""
        key = AESGCM.generate_key(bit_length=256)
        wrapped = seal(self._master, key, b"key\x00" + member_id.encode())
        return wrapped, AESGCM(key)

    def unwrap(self, member_id: str, wrapped: bytes) -> AESGCM:
        """The cipher for a stored wrapped key, cached."""
        cached = self._cache.get(member_id)
        if cached is not None:
            return cached
        try:
            key = unseal(self._master, wrapped, b"key\x00" + member_id.encode())
        except InvalidTag:
            raise MasterKeyError(
                "the master key does not open the stored member keys (wrong DOPPEL_MASTER_KEY or key file?)"
            ) from None
        aead = AESGCM(key)
        self._cache[member_id] = aead
        return aead

    def cached(self, member_id: str) -> AESGCM | None:
        """The cached cipher of a member, if unwrapped before."""
        return self._cache.get(member_id)

    def remember(self, member_id: str, aead: AESGCM) -> None:
        """Cache a cipher (after creating a key)."""
        self._cache[member_id] = aead

    def evict(self, member_id: str) -> None:
        """Drop a member's cipher from memory (key deleted or transaction rolled back)."""
        self._cache.pop(member_id, None)


def job_key(master_key: bytes, job_id: str) -> bytes:
    """A job folder's dataset key: HKDF-SHA256 of the master key, bound to the job id (32 bytes, AES-256-GCM)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"doppel job dataset\x00" + job_id.encode()
    ).derive(master_key)


def job_key_for(settings: Settings, job_dir: Path) -> bytes:
    """The key of the job folder `job_dir` (named by its job id), from this installation's master key.

    Parent side only: the trainer child never sees the master key, it is handed this key (jobspec.jobdata.read_key).
    """
    return job_key(load_master_key(settings.master_key, settings.key_path), Path(job_dir).name)
