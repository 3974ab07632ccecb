import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.dht.config import RecordLimits
from shoal.dht.ids import Contact
from shoal.dht.record import sign_record
from shoal.dht.wire import (
    contact_to_pb,
    contacts_from_pb,
    id_from_pb,
    record_to_pb,
    records_from_pb,
)
from shoal.errors import ProtocolViolation
from shoal.net.identity import Identity
from shoal.net.proto.v1 import dht_pb2 as pb

LIMITS = RecordLimits(max_records_per_message=4, max_value_bytes=64)
ALICE = Identity.from_seed(b"alice")


def test_round_trip():
    rec = sign_record(ALICE, b"k", b"v", 1e9, subkey=ALICE.peer_id.raw + b"s")
    assert records_from_pb([record_to_pb(rec)], LIMITS) == [rec]
    contact = Contact(ALICE.peer_id, "10.0.0.1:5")
    assert contacts_from_pb([contact_to_pb(contact)]) == [contact]


def test_bounds():
    rec = sign_record(ALICE, b"k", b"v", 1e9)
    with pytest.raises(ProtocolViolation):
        records_from_pb([record_to_pb(rec)] * 5, LIMITS)
    big = pb.DHTRecord(key=b"k", value=b"v" * 65, writer=b"w" * 32, signature=b"s" * 64)
    with pytest.raises(ProtocolViolation):
        records_from_pb([big], LIMITS)
    with pytest.raises(ProtocolViolation):
        records_from_pb([pb.DHTRecord(key=b"k", writer=b"w" * 31, signature=b"s" * 64)], LIMITS)
    with pytest.raises(ProtocolViolation):
        contacts_from_pb([pb.DHTContact(peer_id=b"p" * 32, address="")])
    with pytest.raises(ProtocolViolation):
        contacts_from_pb([pb.DHTContact(peer_id=b"p" * 32, address="a\nb")])
    with pytest.raises(ProtocolViolation):
        contacts_from_pb([pb.DHTContact(peer_id=b"p" * 32, address="h:1")] * 33)
    with pytest.raises(ProtocolViolation):
        id_from_pb(b"x" * 31)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_store_and_find_value_messages(data):
    for cls in (pb.DHTStoreRequest, pb.DHTFindValueResponse):
        msg = cls()
        try:
            msg.ParseFromString(data)
        except Exception:  # protobuf's DecodeError: not ours to map here
            continue
        with contextlib.suppress(ProtocolViolation):
            for rec in records_from_pb(msg.records, LIMITS):
                assert len(rec.value) <= LIMITS.max_value_bytes
        if cls is pb.DHTFindValueResponse:
            with contextlib.suppress(ProtocolViolation):
                contacts_from_pb(msg.closer)
