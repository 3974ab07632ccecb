"""Kademlia DHT with signed, expiring records and owned subkeys (see README.md).

The gRPC facade ``shoal.dht.peer.DHT`` is imported from its module (it pulls in grpc).
"""

from shoal.dht.bootstrap import BOOTSTRAP_RETRY
from shoal.dht.config import DHTConfig, RecordLimits
from shoal.dht.ids import Contact, location_of
from shoal.dht.node import DHTNode, merge_records
from shoal.dht.record import Record, Rejection, decode_record, encode_record, sign_record, validate

__all__ = [
    "BOOTSTRAP_RETRY",
    "Contact",
    "DHTConfig",
    "DHTNode",
    "Record",
    "RecordLimits",
    "Rejection",
    "decode_record",
    "encode_record",
    "location_of",
    "merge_records",
    "sign_record",
    "validate",
]
