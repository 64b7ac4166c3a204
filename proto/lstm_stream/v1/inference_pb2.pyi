import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_KIND_UNSPECIFIED: _ClassVar[OutputKind]
    OUTPUT_KIND_REGRESSION: _ClassVar[OutputKind]
    OUTPUT_KIND_CLASSIFICATION: _ClassVar[OutputKind]

class ModelVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_VERSION_STATE_UNSPECIFIED: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_LOADING: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_READY: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_DRAINING: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_FAILED: _ClassVar[ModelVersionState]
OUTPUT_KIND_UNSPECIFIED: OutputKind
OUTPUT_KIND_REGRESSION: OutputKind
OUTPUT_KIND_CLASSIFICATION: OutputKind
MODEL_VERSION_STATE_UNSPECIFIED: ModelVersionState
MODEL_VERSION_STATE_LOADING: ModelVersionState
MODEL_VERSION_STATE_READY: ModelVersionState
MODEL_VERSION_STATE_DRAINING: ModelVersionState
MODEL_VERSION_STATE_FAILED: ModelVersionState

class Session(_message.Message):
    __slots__ = ("session_id", "next_step", "create_time", "last_active_time", "replay_start_step", "model", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    REPLAY_START_STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    next_step: int
    create_time: _timestamp_pb2.Timestamp
    last_active_time: _timestamp_pb2.Timestamp
    replay_start_step: int
    model: str
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., next_step: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_active_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replay_start_step: _Optional[int] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ...) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("version", "state", "sessions", "fingerprint", "error", "cell")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: ModelVersionState
    sessions: int
    fingerprint: str
    error: str
    cell: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[ModelVersionState, str]] = ..., sessions: _Optional[int] = ..., fingerprint: _Optional[str] = ..., error: _Optional[str] = ..., cell: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("name", "version", "input_size", "output_size", "hidden_size", "num_layers", "output_kind", "labels", "device", "dtype", "max_chunk_steps", "fingerprint", "replay_steps", "durable_sessions", "max_batch_chunks", "model_version", "cell")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLAY_STEPS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    input_size: int
    output_size: int
    hidden_size: int
    num_layers: int
    output_kind: OutputKind
    labels: _containers.RepeatedScalarFieldContainer[str]
    device: str
    dtype: str
    max_chunk_steps: int
    fingerprint: str
    replay_steps: int
    durable_sessions: bool
    max_batch_chunks: int
    model_version: int
    cell: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., input_size: _Optional[int] = ..., output_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., output_kind: _Optional[_Union[OutputKind, str]] = ..., labels: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_chunk_steps: _Optional[int] = ..., fingerprint: _Optional[str] = ..., replay_steps: _Optional[int] = ..., durable_sessions: _Optional[bool] = ..., max_batch_chunks: _Optional[int] = ..., model_version: _Optional[int] = ..., cell: _Optional[str] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "model", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamStepsRequest(_message.Message):
    __slots__ = ("session_id", "start_step", "inputs", "reset", "end_session", "packed_inputs", "model", "model_version", "answered_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    END_SESSION_FIELD_NUMBER: _ClassVar[int]
    PACKED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_step: int
    inputs: _containers.RepeatedScalarFieldContainer[float]
    reset: bool
    end_session: bool
    packed_inputs: bytes
    model: str
    model_version: int
    answered_step: int
    def __init__(self, session_id: _Optional[str] = ..., start_step: _Optional[int] = ..., inputs: _Optional[_Iterable[float]] = ..., reset: _Optional[bool] = ..., end_session: _Optional[bool] = ..., packed_inputs: _Optional[bytes] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., answered_step: _Optional[int] = ...) -> None: ...

class StreamStepsResponse(_message.Message):
    __slots__ = ("session_id", "start_step", "num_steps", "outputs", "durable_step", "packed_outputs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_STEP_FIELD_NUMBER: _ClassVar[int]
    PACKED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_step: int
    num_steps: int
    outputs: _containers.RepeatedScalarFieldContainer[float]
    durable_step: int
    packed_outputs: bytes
    def __init__(self, session_id: _Optional[str] = ..., start_step: _Optional[int] = ..., num_steps: _Optional[int] = ..., outputs: _Optional[_Iterable[float]] = ..., durable_step: _Optional[int] = ..., packed_outputs: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("inputs", "num_steps", "packed_inputs", "model", "model_version")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    PACKED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[float]
    num_steps: int
    packed_inputs: bytes
    model: str
    model_version: int
    def __init__(self, inputs: _Optional[_Iterable[float]] = ..., num_steps: _Optional[int] = ..., packed_inputs: _Optional[bytes] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("outputs", "packed_outputs")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedScalarFieldContainer[float]
    packed_outputs: bytes
    def __init__(self, outputs: _Optional[_Iterable[float]] = ..., packed_outputs: _Optional[bytes] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportSessionResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: bytes
    def __init__(self, state: _Optional[bytes] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("state", "session_id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    state: bytes
    session_id: str
    def __init__(self, state: _Optional[bytes] = ..., session_id: _Optional[str] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class StepBatchRequest(_message.Message):
    __slots__ = ("chunks", "create_missing", "model", "model_version")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CREATE_MISSING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[SessionChunk]
    create_missing: bool
    model: str
    model_version: int
    def __init__(self, chunks: _Optional[_Iterable[_Union[SessionChunk, _Mapping]]] = ..., create_missing: _Optional[bool] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class SessionChunk(_message.Message):
    __slots__ = ("session_id", "start_step", "inputs", "packed_inputs", "reset", "end_session", "answered_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    END_SESSION_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_step: int
    inputs: _containers.RepeatedScalarFieldContainer[float]
    packed_inputs: bytes
    reset: bool
    end_session: bool
    answered_step: int
    def __init__(self, session_id: _Optional[str] = ..., start_step: _Optional[int] = ..., inputs: _Optional[_Iterable[float]] = ..., packed_inputs: _Optional[bytes] = ..., reset: _Optional[bool] = ..., end_session: _Optional[bool] = ..., answered_step: _Optional[int] = ...) -> None: ...

class StepBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ChunkResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ChunkResult, _Mapping]]] = ...) -> None: ...

class ChunkResult(_message.Message):
    __slots__ = ("session_id", "start_step", "num_steps", "outputs", "packed_outputs", "durable_step", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_step: int
    num_steps: int
    outputs: _containers.RepeatedScalarFieldContainer[float]
    packed_outputs: bytes
    durable_step: int
    error: _status_pb2.Status
    def __init__(self, session_id: _Optional[str] = ..., start_step: _Optional[int] = ..., num_steps: _Optional[int] = ..., outputs: _Optional[_Iterable[float]] = ..., packed_outputs: _Optional[bytes] = ..., durable_step: _Optional[int] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
