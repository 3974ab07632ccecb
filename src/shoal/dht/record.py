"""Signed, expiring DHT records: schema, canonical signing bytes, validation, wire codec.

A record maps ``key`` (and optionally ``subkey``) to ``value`` until ``expires_at`` (Unix
seconds). The writer signs ``SIGN_DOMAIN + msgpack([key, subkey, value, expires_at, writer])``;
msgpack with these fixed types is canonical (one encoding per tuple).

Kinds of keys:

* **plain**: ``subkey == b""``. Any peer may write; each writer has its own slot and a read
  returns the freshest valid value among writers.
* **dictionary**: ``subkey != b""``. The subkey is *owned*: it must start with the writer's
  32-byte PeerID (optionally followed by up to ``max_subkey_bytes - 32`` bytes of the
  owner's choosing). Only its owner can write it; a read returns ``{subkey: value}``.

Values are opaque bytes (msgpack or protobuf produced by the caller; never pickle).
``validate`` returns a :class:`Rejection` reason instead of raising, so handlers can report
it; ``decode_record`` raises :class:`~shoal.errors.ProtocolViolation` on malformed bytes and
checks every size before it trusts it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import msgpack

from shoal.dht.config import RecordLimits
from shoal.errors import ProtocolViolation
from shoal.net.identity import PEER_ID_BYTES, SIGNATURE_BYTES, Identity, PeerID

__all__ = [
    "Record",
    "Rejection",
    "decode_record",
    "encode_record",
    "sign_record",
    "subkey_owner",
    "validate",
]

SIGN_DOMAIN = b"shoal.dht.record.v1\x00"
_WIRE_VERSION = 1
_MAX_WIRE_BYTES = 64 * 1024  # hard cap before any parsing, above every configurable limit


class Rejection(enum.Enum):
    """Why a record was refused."""

    EXPIRED = "expired"
    FAR_FUTURE = "expires too far in the future"
    OVERSIZED = "key, subkey or value too large"
    BAD_SIGNATURE = "missing or wrong signature"
    NOT_SUBKEY_OWNER = "subkey not owned by the writer"
    MALFORMED = "malformed record"
    STALE = "an entry with a later expiration is already stored"
    STORAGE_FULL = "storage full of records that expire later"


@dataclass(frozen=True, slots=True)
class Record:
    """One signed entry. ``signature`` covers every other field (see module docstring)."""

    key: bytes
    subkey: bytes
    value: bytes
    expires_at: float
    writer: PeerID
    signature: bytes

    def signing_bytes(self) -> bytes:
        return signing_bytes(self.key, self.subkey, self.value, self.expires_at, self.writer)

    @property
    def size_bytes(self) -> int:
        """Bytes this record costs in storage accounting."""
        return len(self.key) + len(self.subkey) + len(self.value) + 96

    def slot(self) -> tuple[bytes, bytes, bytes]:
        """(key, subkey, writer): at most one record per slot is kept."""
        return (self.key, self.subkey, self.writer.raw)


def signing_bytes(
    key: bytes, subkey: bytes, value: bytes, expires_at: float, writer: PeerID
) -> bytes:
    body = msgpack.packb([key, subkey, value, float(expires_at), writer.raw], use_bin_type=True)
    return SIGN_DOMAIN + bytes(body)


def sign_record(
    identity: Identity, key: bytes, value: bytes, expires_at: float, subkey: bytes = b""
) -> Record:
    """Build and sign a record written by ``identity``."""
    writer = identity.peer_id
    sig = identity.sign(signing_bytes(key, subkey, value, expires_at, writer))
    return Record(key, subkey, value, float(expires_at), writer, sig)


def subkey_owner(subkey: bytes) -> bytes | None:
    """The PeerID bytes that own ``subkey`` (its first 32 bytes), or None if too short."""
    return subkey[:PEER_ID_BYTES] if len(subkey) >= PEER_ID_BYTES else None


def validate(record: Record, now: float, limits: RecordLimits) -> Rejection | None:
    """Check a record received from anyone; None when it is acceptable.

    Cheap checks run first; the signature (about 0.3 ms) is verified last.
    """
    if (
        len(record.key) > limits.max_key_bytes
        or len(record.subkey) > limits.max_subkey_bytes
        or len(record.value) > limits.max_value_bytes
    ):
        return Rejection.OVERSIZED
    if not math.isfinite(record.expires_at) or not record.key:
        return Rejection.MALFORMED
    if record.expires_at <= now:
        return Rejection.EXPIRED
    if record.expires_at > now + limits.max_ttl_s + limits.max_clock_skew_s:
        return Rejection.FAR_FUTURE
    if record.subkey and subkey_owner(record.subkey) != record.writer.raw:
        return Rejection.NOT_SUBKEY_OWNER
    if not record.writer.verify(record.signature, record.signing_bytes()):
        return Rejection.BAD_SIGNATURE
    return None


def encode_record(record: Record) -> bytes:
    """Wire/storage form: a msgpack array with a version tag."""
    packed: bytes = msgpack.packb(
        [
            _WIRE_VERSION,
            record.key,
            record.subkey,
            record.value,
            record.expires_at,
            record.writer.raw,
            record.signature,
        ],
        use_bin_type=True,
    )
    return packed


def decode_record(data: bytes, limits: RecordLimits | None = None) -> Record:
    """Parse ``encode_record`` output; raises ProtocolViolation on anything malformed.

    Sizes are bounded before allocation (msgpack's own limits) and the field types are
    checked exactly. The signature is *not* verified here: call ``validate``.
    """
    limits = limits or RecordLimits()
    if not isinstance(data, (bytes, bytearray)) or len(data) > _MAX_WIRE_BYTES:
        raise ProtocolViolation("record too large or not bytes")
    cap = max(limits.max_key_bytes, limits.max_value_bytes, SIGNATURE_BYTES)
    try:
        fields = msgpack.unpackb(
            bytes(data),
            use_list=True,
            raw=True,
            strict_map_key=True,
            max_bin_len=cap,
            max_str_len=0,
            max_array_len=7,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolViolation(f"undecodable record: {type(exc).__name__}") from exc
    if not isinstance(fields, list) or len(fields) != 7 or fields[0] != _WIRE_VERSION:
        raise ProtocolViolation("record is not a version-1 7-field array")
    _, key, subkey, value, expires_at, writer, sig = fields
    if not all(isinstance(x, bytes) for x in (key, subkey, value, writer, sig)):
        raise ProtocolViolation("record fields have wrong types")
    if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)):
        raise ProtocolViolation("record expires_at is not a number")
    if len(writer) != PEER_ID_BYTES or len(sig) != SIGNATURE_BYTES:
        raise ProtocolViolation("record writer or signature has the wrong length")
    if len(key) > limits.max_key_bytes or len(subkey) > limits.max_subkey_bytes:
        raise ProtocolViolation("record key or subkey too long")
    return Record(key, subkey, value, float(expires_at), PeerID(writer), sig)
