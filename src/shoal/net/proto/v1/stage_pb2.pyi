from shoal.net.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLY_STATUS_UNSPECIFIED: _ClassVar[ReplyStatus]
    OK: _ClassVar[ReplyStatus]
    BUSY: _ClassVar[ReplyStatus]
    WRONG_STAGE: _ClassVar[ReplyStatus]
    UNKNOWN_REQUEST: _ClassVar[ReplyStatus]
    EXPIRED: _ClassVar[ReplyStatus]
REPLY_STATUS_UNSPECIFIED: ReplyStatus
OK: ReplyStatus
BUSY: ReplyStatus
WRONG_STAGE: ReplyStatus
UNKNOWN_REQUEST: ReplyStatus
EXPIRED: ReplyStatus

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "stage", "codec", "payload_tensors", "budget_s", "has_targets", "micro_batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    HAS_TARGETS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: bytes
    stage: int
    codec: str
    payload_tensors: int
    budget_s: float
    has_targets: bool
    micro_batch: int
    def __init__(self, request_id: _Optional[bytes] = ..., stage: _Optional[int] = ..., codec: _Optional[str] = ..., payload_tensors: _Optional[int] = ..., budget_s: _Optional[float] = ..., has_targets: _Optional[bool] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("request_id", "stage", "codec", "payload_tensors", "budget_s", "micro_batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: bytes
    stage: int
    codec: str
    payload_tensors: int
    budget_s: float
    micro_batch: int
    def __init__(self, request_id: _Optional[bytes] = ..., stage: _Optional[int] = ..., codec: _Optional[str] = ..., payload_tensors: _Optional[int] = ..., budget_s: _Optional[float] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class StageReply(_message.Message):
    __slots__ = ("status", "reason", "payload_tensors", "loss", "duplicate", "queue_length", "optimizer_steps")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_TENSORS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    status: ReplyStatus
    reason: str
    payload_tensors: int
    loss: float
    duplicate: bool
    queue_length: int
    optimizer_steps: int
    def __init__(self, status: _Optional[_Union[ReplyStatus, str]] = ..., reason: _Optional[str] = ..., payload_tensors: _Optional[int] = ..., loss: _Optional[float] = ..., duplicate: _Optional[bool] = ..., queue_length: _Optional[int] = ..., optimizer_steps: _Optional[int] = ...) -> None: ...

class ParametersRequest(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: int
    def __init__(self, stage: _Optional[int] = ...) -> None: ...

class ParametersInfo(_message.Message):
    __slots__ = ("stage", "tensors", "optimizer_steps")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    tensors: int
    optimizer_steps: int
    def __init__(self, stage: _Optional[int] = ..., tensors: _Optional[int] = ..., optimizer_steps: _Optional[int] = ...) -> None: ...

class StageInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage", "num_stages", "throughput", "queue_length", "max_queue", "applied", "optimizer_steps")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    num_stages: int
    throughput: float
    queue_length: int
    max_queue: int
    applied: int
    optimizer_steps: int
    def __init__(self, stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., throughput: _Optional[float] = ..., queue_length: _Optional[int] = ..., max_queue: _Optional[int] = ..., applied: _Optional[int] = ..., optimizer_steps: _Optional[int] = ...) -> None: ...

class StageAnnouncement(_message.Message):
    __slots__ = ("address", "stage", "num_stages", "throughput", "queue_length", "active", "announced_at")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_AT_FIELD_NUMBER: _ClassVar[int]
    address: str
    stage: int
    num_stages: int
    throughput: float
    queue_length: int
    active: bool
    announced_at: float
    def __init__(self, address: _Optional[str] = ..., stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., throughput: _Optional[float] = ..., queue_length: _Optional[int] = ..., active: _Optional[bool] = ..., announced_at: _Optional[float] = ...) -> None: ...
