from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DHTContact(_message.Message):
    __slots__ = ("peer_id", "address")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    peer_id: bytes
    address: str
    def __init__(self, peer_id: _Optional[bytes] = ..., address: _Optional[str] = ...) -> None: ...

class DHTRecord(_message.Message):
    __slots__ = ("key", "subkey", "value", "expires_at", "writer", "signature")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SUBKEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    subkey: bytes
    value: bytes
    expires_at: float
    writer: bytes
    signature: bytes
    def __init__(self, key: _Optional[bytes] = ..., subkey: _Optional[bytes] = ..., value: _Optional[bytes] = ..., expires_at: _Optional[float] = ..., writer: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class DHTPingRequest(_message.Message):
    __slots__ = ("caller_address",)
    CALLER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    caller_address: str
    def __init__(self, caller_address: _Optional[str] = ...) -> None: ...

class DHTPingResponse(_message.Message):
    __slots__ = ("self",)
    SELF_FIELD_NUMBER: _ClassVar[int]
    self: DHTContact
    def __init__(self_, self: _Optional[_Union[DHTContact, _Mapping]] = ...) -> None: ...

class DHTStoreRequest(_message.Message):
    __slots__ = ("caller_address", "records")
    CALLER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    caller_address: str
    records: _containers.RepeatedCompositeFieldContainer[DHTRecord]
    def __init__(self, caller_address: _Optional[str] = ..., records: _Optional[_Iterable[_Union[DHTRecord, _Mapping]]] = ...) -> None: ...

class DHTStoreResponse(_message.Message):
    __slots__ = ("rejections",)
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    rejections: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rejections: _Optional[_Iterable[str]] = ...) -> None: ...

class DHTFindNodeRequest(_message.Message):
    __slots__ = ("caller_address", "target")
    CALLER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    caller_address: str
    target: bytes
    def __init__(self, caller_address: _Optional[str] = ..., target: _Optional[bytes] = ...) -> None: ...

class DHTFindNodeResponse(_message.Message):
    __slots__ = ("closer",)
    CLOSER_FIELD_NUMBER: _ClassVar[int]
    closer: _containers.RepeatedCompositeFieldContainer[DHTContact]
    def __init__(self, closer: _Optional[_Iterable[_Union[DHTContact, _Mapping]]] = ...) -> None: ...

class DHTFindValueRequest(_message.Message):
    __slots__ = ("caller_address", "location")
    CALLER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    caller_address: str
    location: bytes
    def __init__(self, caller_address: _Optional[str] = ..., location: _Optional[bytes] = ...) -> None: ...

class DHTFindValueResponse(_message.Message):
    __slots__ = ("records", "closer")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CLOSER_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[DHTRecord]
    closer: _containers.RepeatedCompositeFieldContainer[DHTContact]
    def __init__(self, records: _Optional[_Iterable[_Union[DHTRecord, _Mapping]]] = ..., closer: _Optional[_Iterable[_Union[DHTContact, _Mapping]]] = ...) -> None: ...
