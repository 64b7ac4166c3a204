"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`) with Triton's
sequence parameters, served beside the native API over the same sessions, batcher and models
(DESIGN 1.9), so tritonclient and clients generated from that proto work unchanged.

A sequence is a session: `sequence_id` (int64, as its decimal string, or a string) is the
session id, owned by the caller's principal. `sequence_start` creates it from zero state (a live
one restarts: its state is zeroed, on the version it lives on), `sequence_end` ends it after
the answer, and a request of a sequence that was never started is refused. A request is a chunk
of one session on the one step path (server/steps.py), so the step rule, replay, version
pinning and the state store apply as to native messages: a live sequence's next steps are
planned as a StreamSteps message is (runtime.queue_step); a start, an end, or a sequence this
replica does not hold (the state store may) as a StepBatch of one (runtime.start_batch). A
request with no `sequence_id` is stateless, like Predict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from importlib import metadata
from typing import Any

from lstm_stream.oip import grpc_service_pb2 as oip
from lstm_stream.oip import grpc_service_pb2_grpc as oip_grpc
from server import metrics
from server.config import ServerConfig
from server.errors import BadInput, ServiceError, SessionNotFound
from server.lifecycle import check_lives_on
from server.models import ModelVersion, VersionState
from server.oip_tensors import (
    DATATYPE,
    DURABLE_STEP_PARAMETER,
    INPUT_NAME,
    OUTPUT_NAME,
    START_STEP_PARAMETER,
    SequenceParameters,
    check_requested_outputs,
    decode_input,
    put_output,
    sequence_of,
)
from server.rpc import Malformed, add_servicer, unary
from server.runtime import Runtime
from server.security import TokenStore, principal_of
from server.sessions import Session
from server.steps import ChunkRequest

SERVER_NAME = "lstm-stream"
OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ["sequence", "sequence(string_id)", "model_configuration", "model_repository"]
REPOSITORY_STATES = {
    VersionState.LOADING: "LOADING",
    VersionState.READY: "READY",
    VersionState.DRAINING: "UNLOADING",
    VersionState.FAILED: "UNAVAILABLE",
}


def server_version() -> str:
    try:
        return metadata.version("lstm-stream")
    except metadata.PackageNotFoundError:
        return "0"


def version_number(text: str) -> int:
    """An OIP model_version ('' for the newest) as the repository's number."""
    if not text:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise BadInput(f"model_version: expected a positive integer or empty, got {text!r}")
    return int(text)


class OpenInferenceService(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, runtime: Runtime, config: ServerConfig, tokens: TokenStore | None = None
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.tokens = tokens
        self._stream_latency = metrics.STEP_LATENCY.labels("ModelStreamInfer")
        self._stream_ok = metrics.REQUESTS.labels("ModelStreamInfer", "OK")

    # Health and metadata

    @unary("ServerLive")
    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any):
        return oip.ServerLiveResponse(live=True)

    @unary("ServerReady")
    async def ServerReady(self, request: oip.ServerReadyRequest, context: Any):
        ready = not self.runtime.draining and any(
            v.state is VersionState.READY for v in self.runtime.catalog()
        )
        return oip.ServerReadyResponse(ready=ready)

    @unary("ServerMetadata")
    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Any):
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS
        )

    @unary("ModelReady")
    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any):
        try:
            model = self._model(request.name, request.version, new_work=False)
        except ServiceError:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=model.state is VersionState.READY)

    @unary("ModelMetadata")
    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Any):
        model = self._model(request.name, request.version, new_work=False)
        config = model.config
        versions = sorted(
            v.key.version
            for v in self.runtime.catalog()
            if v.key.name == model.key.name and v.state is VersionState.READY
        )
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=model.key.name,
            versions=[str(v) for v in versions],
            platform=SERVER_NAME,
            inputs=[tensor(name=INPUT_NAME, datatype=DATATYPE, shape=[-1, config.input_size])],
            outputs=[tensor(name=OUTPUT_NAME, datatype=DATATYPE, shape=[-1, config.output_size])],
        )

    @unary("ModelConfig")
    async def ModelConfig(self, request: oip.ModelConfigRequest, context: Any):
        model = self._model(request.name, request.version, new_work=False)
        return oip.ModelConfigResponse(config=model_config(model, self.config))

    @unary("RepositoryIndex")
    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context: Any):
        models = self.runtime.catalog()
        rows = [(v.key, v.state, f"draining: {v.sessions} live sequences") for v in models]
        rows += [(k, VersionState.LOADING, "") for k in models.loading]
        rows += [(k, VersionState.FAILED, f.error) for k, f in models.failed.items()]
        index = oip.RepositoryIndexResponse.ModelIndex
        return oip.RepositoryIndexResponse(
            models=[
                index(
                    name=key.name,
                    version=str(key.version),
                    state=REPOSITORY_STATES[state],
                    reason=reason if state in (VersionState.DRAINING, VersionState.FAILED) else "",
                )
                for key, state, reason in sorted(rows, key=lambda r: r[0])
                if not request.ready or state is VersionState.READY
            ]
        )

    # Inference

    @unary("ModelInfer")
    async def ModelInfer(self, request: oip.ModelInferRequest, context: Any):
        return await (await self._start(request, principal_of(self.tokens, context)))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: Any
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Requests are planned in the order they arrive (a sequence's are applied in that
        order) and answered in that order, each echoing its id; the next request is planned
        while the engine runs the ones before. A bad request is answered with error_message,
        and the stream goes on."""
        answers: asyncio.Queue[tuple[float, Any, Any] | None] = asyncio.Queue()
        reader = asyncio.create_task(self._plan_stream(request_iterator, context, answers))
        try:
            while (item := await answers.get()) is not None:
                received, request, pending = item
                try:
                    if isinstance(pending, ServiceError):
                        raise pending
                    response = oip.ModelStreamInferResponse(infer_response=await pending)
                    self._stream_ok.inc()
                except ServiceError as err:
                    metrics.REQUESTS.labels("ModelStreamInfer", err.code.name).inc()
                    response = stream_error(request, err)
                self._stream_latency.observe(time.perf_counter() - received)
                yield response
            await asyncio.wait([reader])
            if isinstance(failure := reader.exception(), ServiceError):  # before any request
                await context.abort_with_status(failure.to_status())
            elif failure is not None:
                raise failure
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            while not answers.empty():  # the client went away: answers nobody will read
                item = answers.get_nowait()
                if item is not None and asyncio.iscoroutine(item[2]):
                    item[2].close()

    async def _plan_stream(
        self,
        request_iterator: AsyncIterator[oip.ModelInferRequest],
        context: Any,
        answers: asyncio.Queue[tuple[float, Any, Any] | None],
    ) -> None:
        try:
            principal = principal_of(self.tokens, context)  # once a stream
            async for request in request_iterator:
                received = time.perf_counter()
                try:
                    if isinstance(request, Malformed):
                        raise request.error
                    pending: Any = await self._start(request, principal)
                except ServiceError as err:
                    pending = err
                answers.put_nowait((received, request, pending))
        finally:  # the end of the requests, or a failure the writer raises: never a hang
            answers.put_nowait(None)

    async def _start(self, request: oip.ModelInferRequest, principal: str) -> Awaitable[Any]:
        """Check and queue one request; an awaitable of its ModelInferResponse. A sequence's
        chunk is queued (behind that sequence's earlier ones) by the time this returns."""
        sequence = sequence_of(request.parameters)
        check_requested_outputs(request)
        model, held = self._model_for(request, sequence, principal)
        inputs, batched = decode_input(
            request, model.config.input_size, self.config.max_chunk_steps
        )
        if not sequence.session_id:
            return asyncio.ensure_future(self._predict(request, model, inputs, batched, principal))
        chunk = ChunkRequest(
            sequence.session_id, inputs, sequence.start_step, sequence.start, sequence.end
        )
        if held is not None and not (sequence.start or sequence.end):
            # The usual request, a live sequence's next steps: planned as a StreamSteps message.
            chunk.session = held
            try:
                answered = await self.runtime.queue_step(chunk)
            except SessionNotFound:  # ended or being ended meanwhile
                raise unknown_sequence(sequence) from None
            return self._answer_one(request, answered, batched)
        pending = await self.runtime.start_batch([chunk], principal, sequence.start, model)
        # A coroutine, not a task: its answer is awaited in order, and start_batch's own task
        # commits the chunk (and ends an ended sequence) whether or not anyone awaits it.
        return self._answer(request, pending, batched, sequence)

    def _model_for(
        self, request: oip.ModelInferRequest, sequence: SequenceParameters, principal: str
    ) -> tuple[ModelVersion, Session | None]:
        """The version whose input size decodes the request, and the live sequence if this
        replica holds it: a live sequence's own version (it stays on it, draining or not, and
        a request naming another is refused); else the one named, which for a new sequence or
        a stateless request must take new work."""
        if sequence.session_id and not sequence.start:
            held = self.runtime.held(sequence.session_id, principal)
            if held is not None:  # else not held here (the state store may have it): as named
                check_lives_on(held, request.model_name, version_number(request.model_version))
                return held.model, held
            return self._model(request.model_name, request.model_version, new_work=False), None
        return self._model(request.model_name, request.model_version), None

    async def _predict(self, request, model: ModelVersion, inputs, batched: bool, principal: str):
        outputs = await self.runtime.predict(inputs, model, principal)
        response = infer_response(request, model)
        put_output(response, outputs, batched)
        return response

    async def _answer_one(
        self, request, answered: Awaitable[ChunkRequest], batched: bool
    ) -> oip.ModelInferResponse:
        return sequence_response(request, await answered, batched)

    async def _answer(
        self, request, pending: Any, batched: bool, sequence: SequenceParameters
    ) -> oip.ModelInferResponse:
        (outcome,) = await asyncio.shield(pending)  # a cancelled caller leaves it to finish
        if isinstance(outcome, SessionNotFound) and not sequence.start:
            raise unknown_sequence(sequence)
        if isinstance(outcome, ServiceError):
            raise outcome
        return sequence_response(request, outcome, batched)

    def _model(self, name: str, version: str, new_work: bool = True) -> ModelVersion:
        return self.runtime.resolve(name, version_number(version), new_work)


def infer_response(request: oip.ModelInferRequest, model: ModelVersion) -> oip.ModelInferResponse:
    return oip.ModelInferResponse(
        model_name=model.key.name, model_version=str(model.key.version), id=request.id
    )


def sequence_response(
    request: oip.ModelInferRequest, item: ChunkRequest, batched: bool
) -> oip.ModelInferResponse:
    """An answered chunk's response: its outputs, the step of the first, and durable_step."""
    session = item.session
    assert session is not None
    response = infer_response(request, session.model)
    response.parameters[START_STEP_PARAMETER].int64_param = item.first
    response.parameters[DURABLE_STEP_PARAMETER].int64_param = session.durable_step
    put_output(response, item.outputs, batched)
    return response


def unknown_sequence(sequence: SequenceParameters) -> SessionNotFound:
    return SessionNotFound(
        sequence.session_id,
        message=f"sequence_id {sequence.session_id!r}: no such sequence (never started, ended "
        "or expired); expected sequence_start=true on a sequence's first request",
    )


def stream_error(request: Any, err: ServiceError) -> oip.ModelStreamInferResponse:
    """A refused request's answer on a stream: its code, reason and message in error_message,
    its id echoed."""
    request_id = "" if isinstance(request, Malformed) else request.id
    message = f"{err.code.name} ({err.reason}): {err.message}"
    return oip.ModelStreamInferResponse(
        error_message=message, infer_response=oip.ModelInferResponse(id=request_id)
    )


def model_config(model: ModelVersion, server: ServerConfig) -> oip.ModelConfig:
    """What Triton's tools read: one FP32 input and output with a dynamic timestep dimension,
    and sequence batching (oldest first) whose idle time is the server's idle timeout."""
    config = model.config
    return oip.ModelConfig(
        name=model.key.name,
        platform=SERVER_NAME,
        backend=SERVER_NAME,
        max_batch_size=0,
        input=[
            oip.ModelInput(name=INPUT_NAME, data_type=oip.TYPE_FP32, dims=[-1, config.input_size])
        ],
        output=[
            oip.ModelOutput(
                name=OUTPUT_NAME, data_type=oip.TYPE_FP32, dims=[-1, config.output_size]
            )
        ],
        sequence_batching=oip.ModelSequenceBatching(
            max_sequence_idle_microseconds=int(server.session_idle_timeout_s * 1e6),
            oldest=oip.ModelSequenceBatching.StrategyOldest(
                max_candidate_sequences=server.max_sessions,
                preferred_batch_size=[server.max_batch_size],
                max_queue_delay_microseconds=server.max_batch_delay_us,
            ),
        ),
    )


def add_oip_servicer(servicer: OpenInferenceService, server: Any) -> None:
    add_servicer(servicer, server, oip, "GRPCInferenceService")
