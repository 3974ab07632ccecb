from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DialBackRequest(_message.Message):
    __slots__ = ("addresses",)
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class DialBackReply(_message.Message):
    __slots__ = ("observed", "reached")
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    REACHED_FIELD_NUMBER: _ClassVar[int]
    observed: str
    reached: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, observed: _Optional[str] = ..., reached: _Optional[_Iterable[str]] = ...) -> None: ...

class ListenRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RelayEvent(_message.Message):
    __slots__ = ("circuit_id", "dialer", "observed")
    CIRCUIT_ID_FIELD_NUMBER: _ClassVar[int]
    DIALER_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    circuit_id: int
    dialer: bytes
    observed: str
    def __init__(self, circuit_id: _Optional[int] = ..., dialer: _Optional[bytes] = ..., observed: _Optional[str] = ...) -> None: ...

class RelayFrame(_message.Message):
    __slots__ = ("target", "circuit_id", "data", "open")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    target: bytes
    circuit_id: int
    data: bytes
    open: bool
    def __init__(self, target: _Optional[bytes] = ..., circuit_id: _Optional[int] = ..., data: _Optional[bytes] = ..., open: _Optional[bool] = ...) -> None: ...

class PunchRequest(_message.Message):
    __slots__ = ("observed", "delay_ms")
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    observed: str
    delay_ms: int
    def __init__(self, observed: _Optional[str] = ..., delay_ms: _Optional[int] = ...) -> None: ...

class PunchReply(_message.Message):
    __slots__ = ("observed",)
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    observed: str
    def __init__(self, observed: _Optional[str] = ...) -> None: ...
