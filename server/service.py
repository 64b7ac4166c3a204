"""The servicer: protobuf <-> the core's verbs (server/runtime.py), validation and errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from google.protobuf import timestamp_pb2

from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from server import metrics
from server.codec import (
    check_session_id,
    decode_chunks,
    decode_steps,
    put_outputs,
    resolve_session_id,
)
from server.config import ServerConfig
from server.errors import BadInput, ServiceError, StepOutOfOrder
from server.models import ModelVersion, VersionState
from server.rpc import Malformed, metadata_session_id, unary
from server.runtime import Runtime
from server.security import TokenStore, principal_of
from server.sessions import Attachment, Session
from server.steps import ChunkRequest

OUTPUT_KINDS = {
    "regression": pb.OUTPUT_KIND_REGRESSION,
    "classification": pb.OUTPUT_KIND_CLASSIFICATION,
}
VERSION_STATES = {
    VersionState.LOADING: pb.MODEL_VERSION_STATE_LOADING,
    VersionState.READY: pb.MODEL_VERSION_STATE_READY,
    VersionState.DRAINING: pb.MODEL_VERSION_STATE_DRAINING,
    VersionState.FAILED: pb.MODEL_VERSION_STATE_FAILED,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def session_message(session: Session) -> pb.Session:
    return pb.Session(
        session_id=session.session_id,
        next_step=session.next_step,
        create_time=_timestamp(session.create_time),
        last_active_time=_timestamp(session.last_active_time),
        replay_start_step=session.replay.first_step(session.next_step),
        model=session.model.key.name,
        model_version=session.model.key.version,
    )


class InferenceService(pb_grpc.InferenceServiceServicer):
    def __init__(
        self, runtime: Runtime, config: ServerConfig, tokens: TokenStore | None = None
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.tokens = tokens
        self._stream_latency = metrics.STEP_LATENCY.labels("StreamSteps")
        self._stream_ok = metrics.REQUESTS.labels("StreamSteps", "OK")
        self._batches_latency = metrics.STEP_LATENCY.labels("StreamBatches")
        self._batches_ok = metrics.REQUESTS.labels("StreamBatches", "OK")

    def _principal(self, context: Any) -> str:
        return principal_of(self.tokens, context)

    def _session_id(self, request_id: str, context: Any) -> str:
        session_id = resolve_session_id(request_id, metadata_session_id(context))
        if not session_id:
            raise BadInput("session_id: expected a session id, got an empty one")
        return session_id

    @unary("GetModelInfo")
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any):
        model = self.runtime.resolve(request.model, request.model_version, new_work=False)
        config, engine = model.config, model.engine
        return pb.GetModelInfoResponse(
            name=model.key.name,
            version=str(model.key.version),
            model_version=model.key.version,
            input_size=config.input_size,
            output_size=config.output_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            output_kind=OUTPUT_KINDS[config.output_kind],
            labels=config.labels,
            device=str(engine.device),
            dtype=str(engine.dtype).removeprefix("torch."),
            max_chunk_steps=self.config.max_chunk_steps,
            max_batch_chunks=self.config.max_batch_chunks,
            fingerprint=model.fingerprint,
            replay_steps=self.config.replay_steps,
            durable_sessions=self.runtime.durable,
            cell=config.cell,
        )

    @unary("ListModels")
    async def ListModels(self, request: pb.ListModelsRequest, context: Any):
        self._principal(context)
        return list_models_response(self.runtime)

    @unary("CreateSession")
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any):
        session_id = resolve_session_id(request.session_id, metadata_session_id(context))
        session = await self.runtime.open_session(
            session_id, self._principal(context), request.model, request.model_version
        )
        return pb.CreateSessionResponse(session=session_message(session))

    @unary("GetSession")
    async def GetSession(self, request: pb.GetSessionRequest, context: Any):
        session = await self.runtime.get_session(
            self._session_id(request.session_id, context), self._principal(context)
        )
        return pb.GetSessionResponse(session=session_message(session))

    @unary("DeleteSession")
    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Any):
        await self.runtime.delete_session(
            self._session_id(request.session_id, context), self._principal(context)
        )
        return pb.DeleteSessionResponse()

    @unary("Predict")
    async def Predict(self, request: pb.PredictRequest, context: Any):
        model = self.runtime.resolve(request.model, request.model_version)
        inputs = self._decode(request, model)
        if request.num_steps and request.num_steps != len(inputs):
            raise BadInput(
                f"num_steps: expected {len(inputs)} or 0 (inputs hold {len(inputs)} timesteps "
                f"of input_size {model.config.input_size}), got {request.num_steps}"
            )
        outputs = await self.runtime.predict(inputs, model, self._principal(context))
        response = pb.PredictResponse()
        put_outputs(response, outputs, bool(request.packed_inputs))
        return response

    @unary("ExportSession")
    async def ExportSession(self, request: pb.ExportSessionRequest, context: Any):
        state = await self.runtime.export_session(
            self._session_id(request.session_id, context), self._principal(context)
        )
        return pb.ExportSessionResponse(state=state)

    @unary("ImportSession")
    async def ImportSession(self, request: pb.ImportSessionRequest, context: Any):
        session_id = request.session_id and check_session_id(request.session_id)
        session = await self.runtime.import_session(
            request.state, session_id, self._principal(context)
        )
        return pb.ImportSessionResponse(session=session_message(session))

    async def StreamSteps(
        self, request_iterator: AsyncIterator[pb.StreamStepsRequest], context: Any
    ) -> AsyncIterator[pb.StreamStepsResponse]:
        attachment = Attachment()
        metadata_id = metadata_session_id(context)
        try:
            async for request in request_iterator:
                received = time.perf_counter()
                attachment.busy = True
                try:
                    response = await self._stream_message(request, attachment, metadata_id, context)
                except ServiceError as err:
                    metrics.REQUESTS.labels("StreamSteps", err.code.name).inc()
                    self._stream_latency.observe(time.perf_counter() - received)
                    await context.abort_with_status(err.to_status())
                if request.end_session:
                    # Before the answer is written: a client that hangs up on reading it must
                    # not leave the session behind.
                    await self.runtime.close_session(attachment.session, "ended")
                self._stream_ok.inc()
                self._stream_latency.observe(time.perf_counter() - received)
                yield response
                attachment.busy = False
                if request.end_session:
                    return
                if attachment.interruption is not None:
                    await context.abort_with_status(attachment.interruption.to_status())
        except asyncio.CancelledError:
            if attachment.interruption is None:
                raise  # the client went away
            await context.abort_with_status(attachment.interruption.to_status())
        finally:
            self.runtime.end_stream(attachment)

    async def _stream_message(
        self,
        request: pb.StreamStepsRequest,
        attachment: Attachment,
        metadata_id: str | None,
        context: Any,
    ) -> pb.StreamStepsResponse:
        if attachment.interruption is not None:
            raise attachment.interruption
        if isinstance(request, Malformed):
            raise request.error
        session = attachment.session
        start_step = request.start_step if request.HasField("start_step") else None
        if session is None:  # a bad first message creates nothing
            session_id = resolve_session_id(request.session_id, metadata_id)
            principal = self._principal(context)
            found = None
            if session_id:  # attaching: the inputs are for the version it lives on
                found = await self.runtime.get_session(session_id, principal)
                model = found.model
            else:
                model = self.runtime.resolve(request.model, request.model_version)
            inputs = self._decode(request, model)
            if not session_id and start_step:
                raise StepOutOfOrder(
                    f"start_step: expected 0 (or none) for a new session, got {start_step}",
                    expected_step=0,
                )
            session = await self.runtime.attach(
                attachment, session_id, principal, request.model, request.model_version, found
            )
        else:
            if request.session_id and request.session_id != session.session_id:
                raise BadInput(
                    f"session_id: expected {session.session_id!r} (this stream's session) or "
                    f"empty, got {request.session_id!r}"
                )
            inputs = self._decode(request, session.model)
        item = ChunkRequest(
            session.session_id,
            inputs,
            start_step,
            request.reset,
            answered_step=request.answered_step,
            session=session,
            stream=attachment,
        )
        await self.runtime.step(item)
        response = pb.StreamStepsResponse(
            session_id=session.session_id,
            start_step=item.first,
            num_steps=len(item.outputs),
            durable_step=session.durable_step,
        )
        put_outputs(response, item.outputs, bool(request.packed_inputs))
        return response

    def _decode(
        self, request: pb.StreamStepsRequest | pb.PredictRequest, model: ModelVersion
    ) -> np.ndarray:
        return decode_steps(
            request.inputs,
            model.config.input_size,
            self.config.max_chunk_steps,
            request.packed_inputs,
        )

    # Many sessions in one message (DESIGN 1.7)

    @unary("StepBatch")
    async def StepBatch(self, request: pb.StepBatchRequest, context: Any):
        model = self._batch_model(request)
        chunks = self._batch_chunks(request, "StepBatch", model)
        outcomes = await self.runtime.step_batch(
            chunks, self._principal(context), request.create_missing, model
        )
        return batch_response(request, outcomes, "StepBatch")

    async def StreamBatches(
        self, request_iterator: AsyncIterator[pb.StepBatchRequest], context: Any
    ) -> AsyncIterator[pb.StepBatchResponse]:
        """Messages are planned in order as they arrive, and answered in order: the next
        message is decoded and queued while the engine runs the one before."""
        answers: asyncio.Queue[tuple[float, Any] | None] = asyncio.Queue()
        reader = asyncio.create_task(self._queue_batches(request_iterator, context, answers))
        try:
            while (item := await answers.get()) is not None:
                received, answer = item
                try:
                    if isinstance(answer, ServiceError):
                        raise answer
                    request, outcomes = answer[0], await asyncio.shield(answer[1])
                except ServiceError as err:
                    metrics.REQUESTS.labels("StreamBatches", err.code.name).inc()
                    self._batches_latency.observe(time.perf_counter() - received)
                    await context.abort_with_status(err.to_status())
                response = batch_response(request, outcomes, "StreamBatches")
                self._batches_ok.inc()
                self._batches_latency.observe(time.perf_counter() - received)
                yield response
            await asyncio.wait([reader])
            if (failure := reader.exception()) is not None:  # not a refusal: a fault
                raise failure
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _queue_batches(
        self,
        request_iterator: AsyncIterator[pb.StepBatchRequest],
        context: Any,
        answers: asyncio.Queue[tuple[float, Any] | None],
    ) -> None:
        principal: str | None = None
        try:
            async for request in request_iterator:
                received = time.perf_counter()
                try:
                    if isinstance(request, Malformed):
                        raise request.error
                    if principal is None:  # once a stream
                        principal = self._principal(context)
                    model = self._batch_model(request)
                    chunks = self._batch_chunks(request, "StreamBatches", model)
                    pending = await self.runtime.start_batch(
                        chunks, principal, request.create_missing, model
                    )
                except ServiceError as err:
                    answers.put_nowait((received, err))
                    return
                answers.put_nowait((received, (request, pending)))
        finally:  # the end of the requests, or a failure the writer raises: never a hang
            answers.put_nowait(None)

    def _batch_model(self, request: pb.StepBatchRequest) -> ModelVersion:
        """The version a batch message's inputs are for: a draining one still feeds its own
        sessions, but creates none."""
        return self.runtime.resolve(
            request.model, request.model_version, new_work=request.create_missing
        )

    def _batch_chunks(
        self, request: pb.StepBatchRequest, rpc: str, model: ModelVersion
    ) -> list[ChunkRequest | ServiceError]:
        """The message's chunks decoded, each a ChunkRequest or the BadInput refusing it."""
        limit = self.config.max_batch_chunks
        if len(request.chunks) > limit:
            raise BadInput(
                f"chunks: expected at most max_batch_chunks={limit} chunks per message, "
                f"got {len(request.chunks)}"
            )
        metrics.BATCH_CHUNKS.labels(rpc).observe(len(request.chunks))
        config = self.config
        inputs = decode_chunks(request.chunks, model.config.input_size, config.max_chunk_steps)
        decoded: list[ChunkRequest | ServiceError] = []
        for index, (chunk, rows) in enumerate(zip(request.chunks, inputs, strict=True)):
            try:
                if isinstance(rows, BadInput):
                    raise rows
                if not chunk.session_id:
                    raise BadInput("session_id: expected the session's id, got an empty one")
                session_id = check_session_id(chunk.session_id)
            except BadInput as err:
                decoded.append(BadInput(f"chunks[{index}].{err.message}", **err.metadata))
                continue
            start_step = chunk.start_step if chunk.HasField("start_step") else None
            decoded.append(
                ChunkRequest(
                    session_id,
                    rows,
                    start_step,
                    chunk.reset,
                    chunk.end_session,
                    answered_step=chunk.answered_step,
                )
            )
        return decoded


def list_models_response(runtime: Runtime) -> pb.ListModelsResponse:
    models = runtime.catalog()
    response = pb.ListModelsResponse(default_model=models.default_name)
    listed: dict[str, pb.ModelStatus] = {}

    def entry(name: str) -> pb.ModelStatus:
        if name not in listed:
            listed[name] = response.models.add(name=name)
        return listed[name]

    rows = [(v.key, v.state, v.sessions, v.fingerprint, "", v.config.cell) for v in models]
    rows += [(k, VersionState.LOADING, 0, "", "", "") for k in models.loading]
    rows += [(k, VersionState.FAILED, 0, "", f.error, "") for k, f in models.failed.items()]
    for key, state, sessions, fingerprint, error, cell in sorted(rows, key=lambda r: r[0]):
        entry(key.name).versions.add(
            version=key.version,
            state=VERSION_STATES[state],
            sessions=sessions,
            fingerprint=fingerprint,
            error=error,
            cell=cell,
        )
    return response


def batch_response(
    request: pb.StepBatchRequest, outcomes: list[ChunkRequest | ServiceError], rpc: str
) -> pb.StepBatchResponse:
    response = pb.StepBatchResponse()
    results = response.results
    for chunk, outcome in zip(request.chunks, outcomes, strict=True):
        if isinstance(outcome, ServiceError):
            metrics.CHUNKS_REFUSED.labels(rpc, outcome.code.name).inc()
            results.add(session_id=chunk.session_id, error=outcome.status_message())
            continue
        assert outcome.session is not None
        result = results.add(
            session_id=outcome.session_id,
            start_step=outcome.first,
            num_steps=len(outcome.outputs),
            durable_step=outcome.session.durable_step,
        )
        put_outputs(result, outcome.outputs, bool(chunk.packed_inputs))
    return response
