from shoal.net.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundMessageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_MESSAGE_KIND_UNSPECIFIED: _ClassVar[RoundMessageKind]
    CONTRIBUTION: _ClassVar[RoundMessageKind]
    REPORT: _ClassVar[RoundMessageKind]
    REDUCED: _ClassVar[RoundMessageKind]
    LEAVE: _ClassVar[RoundMessageKind]
ROUND_MESSAGE_KIND_UNSPECIFIED: RoundMessageKind
CONTRIBUTION: RoundMessageKind
REPORT: RoundMessageKind
REDUCED: RoundMessageKind
LEAVE: RoundMessageKind

class PullRequest(_message.Message):
    __slots__ = ("round_id", "received")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    round_id: bytes
    received: int
    def __init__(self, round_id: _Optional[bytes] = ..., received: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("peer_id", "reason")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    peer_id: bytes
    reason: str
    def __init__(self, peer_id: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundMessage(_message.Message):
    __slots__ = ("round_id", "kind", "part", "weight", "peers", "rejected", "codec", "numel", "block_size", "payload_tensors", "tag", "tagged")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_TENSORS_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    TAGGED_FIELD_NUMBER: _ClassVar[int]
    round_id: bytes
    kind: RoundMessageKind
    part: int
    weight: float
    peers: _containers.RepeatedScalarFieldContainer[bytes]
    rejected: _containers.RepeatedCompositeFieldContainer[Rejection]
    codec: str
    numel: int
    block_size: int
    payload_tensors: int
    tag: bytes
    tagged: _containers.RepeatedCompositeFieldContainer[Tagged]
    def __init__(self, round_id: _Optional[bytes] = ..., kind: _Optional[_Union[RoundMessageKind, str]] = ..., part: _Optional[int] = ..., weight: _Optional[float] = ..., peers: _Optional[_Iterable[bytes]] = ..., rejected: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., codec: _Optional[str] = ..., numel: _Optional[int] = ..., block_size: _Optional[int] = ..., payload_tensors: _Optional[int] = ..., tag: _Optional[bytes] = ..., tagged: _Optional[_Iterable[_Union[Tagged, _Mapping]]] = ...) -> None: ...

class Tagged(_message.Message):
    __slots__ = ("peer_id", "tag")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    peer_id: bytes
    tag: bytes
    def __init__(self, peer_id: _Optional[bytes] = ..., tag: _Optional[bytes] = ...) -> None: ...
