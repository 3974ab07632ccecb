"""Conversions between DHT objects and their protobuf messages, checked at the trust boundary.

Every ``*_from_pb`` function bounds lengths and counts before building anything and raises
:class:`~shoal.errors.ProtocolViolation` on malformed input. Signatures are not verified
here (the store and the reader do that with ``record.validate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shoal.dht.config import RecordLimits
from shoal.dht.ids import MAX_ADDRESS_CHARS, Contact
from shoal.dht.record import Record, Rejection
from shoal.dht.transport import MAX_CONTACTS_PER_ANSWER
from shoal.errors import ProtocolViolation
from shoal.net.identity import PEER_ID_BYTES, SIGNATURE_BYTES, PeerID
from shoal.net.proto.v1 import dht_pb2 as pb

__all__ = [
    "contact_from_pb",
    "contact_to_pb",
    "contacts_from_pb",
    "id_from_pb",
    "id_to_pb",
    "record_from_pb",
    "record_to_pb",
    "records_from_pb",
    "rejection_from_pb",
]

ID_BYTES = 32


def id_to_pb(value: int) -> bytes:
    return value.to_bytes(ID_BYTES, "big")


def id_from_pb(raw: bytes) -> int:
    if len(raw) != ID_BYTES:
        raise ProtocolViolation(f"DHT id must be {ID_BYTES} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def contact_to_pb(contact: Contact) -> Any:
    return pb.DHTContact(peer_id=contact.peer_id.raw, address=contact.address)


def contact_from_pb(msg: Any) -> Contact:
    if len(msg.peer_id) != PEER_ID_BYTES:
        raise ProtocolViolation("contact PeerID has the wrong length")
    address = msg.address
    if not 0 < len(address) <= MAX_ADDRESS_CHARS or not address.isprintable():
        raise ProtocolViolation("contact address is empty, too long or not printable")
    return Contact(PeerID(bytes(msg.peer_id)), address)


def contacts_from_pb(msgs: Sequence[Any]) -> list[Contact]:
    if len(msgs) > MAX_CONTACTS_PER_ANSWER:
        raise ProtocolViolation(f"more than {MAX_CONTACTS_PER_ANSWER} contacts in one answer")
    return [contact_from_pb(m) for m in msgs]


def record_to_pb(record: Record) -> Any:
    return pb.DHTRecord(
        key=record.key,
        subkey=record.subkey,
        value=record.value,
        expires_at=record.expires_at,
        writer=record.writer.raw,
        signature=record.signature,
    )


def record_from_pb(msg: Any, limits: RecordLimits) -> Record:
    if (
        len(msg.key) > limits.max_key_bytes
        or len(msg.subkey) > limits.max_subkey_bytes
        or len(msg.value) > limits.max_value_bytes
    ):
        raise ProtocolViolation("record key, subkey or value exceeds the limits")
    if len(msg.writer) != PEER_ID_BYTES or len(msg.signature) != SIGNATURE_BYTES:
        raise ProtocolViolation("record writer or signature has the wrong length")
    return Record(
        bytes(msg.key),
        bytes(msg.subkey),
        bytes(msg.value),
        float(msg.expires_at),
        PeerID(bytes(msg.writer)),
        bytes(msg.signature),
    )


def records_from_pb(msgs: Sequence[Any], limits: RecordLimits) -> list[Record]:
    if len(msgs) > limits.max_records_per_message:
        raise ProtocolViolation(
            f"more than {limits.max_records_per_message} records in one message"
        )
    return [record_from_pb(m, limits) for m in msgs]


_REJECTIONS = {r.name: r for r in Rejection}


def rejection_from_pb(code: str) -> Rejection | None:
    if not code:
        return None
    return _REJECTIONS.get(code, Rejection.MALFORMED)
