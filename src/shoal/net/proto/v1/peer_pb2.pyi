from shoal.net.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class HandshakeRequest(_message.Message):
    __slots__ = ("version", "peer_id", "ephemeral_key", "nonce", "timestamp_ms", "expected_peer_id", "swarm_proof", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SWARM_PROOF_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    peer_id: bytes
    ephemeral_key: bytes
    nonce: bytes
    timestamp_ms: int
    expected_peer_id: bytes
    swarm_proof: bytes
    signature: bytes
    def __init__(self, version: _Optional[int] = ..., peer_id: _Optional[bytes] = ..., ephemeral_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., expected_peer_id: _Optional[bytes] = ..., swarm_proof: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("peer_id", "ephemeral_key", "nonce", "session_id", "session_ttl_ms", "swarm_proof", "signature")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    SWARM_PROOF_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    peer_id: bytes
    ephemeral_key: bytes
    nonce: bytes
    session_id: bytes
    session_ttl_ms: int
    swarm_proof: bytes
    signature: bytes
    def __init__(self, peer_id: _Optional[bytes] = ..., ephemeral_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., session_id: _Optional[bytes] = ..., session_ttl_ms: _Optional[int] = ..., swarm_proof: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("payload", "time_ms")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    time_ms: int
    def __init__(self, payload: _Optional[bytes] = ..., time_ms: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("peer_id", "version", "addresses", "roles")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    peer_id: bytes
    version: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: _Optional[bytes] = ..., version: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class EmitRequest(_message.Message):
    __slots__ = ("byte_length", "chunk_bytes")
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    byte_length: int
    chunk_bytes: int
    def __init__(self, byte_length: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...
