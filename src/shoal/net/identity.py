"""Peer identity: an Ed25519 key per peer and the PeerID derived from it.

A PeerID *is* the peer's raw 32-byte Ed25519 public key, so any signature can be verified
from the PeerID alone, with no key directory. Its text form is ``"sh" + base32`` (lowercase,
unpadded), e.g. ``shx5k...``; parsing checks length, alphabet and that the bytes are a valid
Ed25519 point.

Keys persist in the peer's data dir as raw 32-byte private keys, file mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.errors import ConfigError

PEER_ID_BYTES = 32
SIGNATURE_BYTES = 64
_TEXT_PREFIX = "sh"
_KEY_FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class PeerID:
    """A peer's public identity: its raw Ed25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != PEER_ID_BYTES:
            raise ValueError(f"PeerID must be {PEER_ID_BYTES} bytes, got {self.raw!r:.40}")

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerID:
        """Parse wire bytes; raises ValueError when they are not a valid Ed25519 key."""
        peer = cls(bytes(raw))
        peer.public_key()  # validates the point
        return peer

    @classmethod
    def from_string(cls, text: str) -> PeerID:
        """Parse the text form; raises ValueError with the offending text."""
        if not text.startswith(_TEXT_PREFIX):
            raise ValueError(f"not a PeerID (missing {_TEXT_PREFIX!r} prefix): {text!r}")
        body = text[len(_TEXT_PREFIX) :].upper()
        body += "=" * (-len(body) % 8)
        try:
            raw = base64.b32decode(body, casefold=False)
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"not a PeerID (bad base32): {text!r}") from exc
        if len(raw) != PEER_ID_BYTES:
            raise ValueError(f"not a PeerID (decodes to {len(raw)} bytes): {text!r}")
        return cls.from_bytes(raw)

    def to_string(self) -> str:
        return _TEXT_PREFIX + base64.b32encode(self.raw).decode("ascii").rstrip("=").lower()

    def short(self) -> str:
        """A short human label for logs (not unique; never use it as a key)."""
        return self.to_string()[:12]

    def public_key(self) -> Ed25519PublicKey:
        try:
            return Ed25519PublicKey.from_public_bytes(self.raw)
        except ValueError as exc:
            raise ValueError(f"PeerID is not a valid Ed25519 public key: {self.raw.hex()}") from exc

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` is this peer's signature of ``data``."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self.public_key().verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def digest(self) -> bytes:
        """SHA-256 of the PeerID: a uniformly spread 256-bit key (e.g. a DHT node ID)."""
        return hashlib.sha256(self.raw).digest()

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"PeerID({self.short()}…)"


class Identity:
    """A peer's private key and its PeerID."""

    __slots__ = ("_key", "peer_id")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = PeerID(raw)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (tests and simulations only)."""
        if len(seed) != 32:
            seed = hashlib.sha256(seed).digest()
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the key at ``path`` or create it (mode 0600, written atomically)."""
        path = Path(path)
        if path.exists():
            raw = path.read_bytes()
            if len(raw) != 32:
                raise ConfigError(f"identity key file {path} is corrupt: {len(raw)} bytes, want 32")
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(
                    f"identity key file {path} is readable by others (mode {mode:o}); "
                    f"run: chmod 600 {path}"
                )
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _KEY_FILE_MODE)
        try:
            os.write(fd, identity.private_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return identity

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id.short()}…)"


__all__ = ["PEER_ID_BYTES", "SIGNATURE_BYTES", "Identity", "PeerID"]
