"""What StreamingClient and AsyncStreamingClient share: their options, their channel, and the
flows (flows.py) of their calls; each surface only drives them, blocking or awaiting."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from lstm_stream.client.errors import LstmStreamError, from_rpc_error
from lstm_stream.client.flows import Call, Flow, Sleep
from lstm_stream.client.options import ClientOptions
from lstm_stream.client.policy import ArrayLike, UnaryRetry, as_rows, new_session_id
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc


def with_target(target: str | None, options: ClientOptions | None) -> ClientOptions:
    """`options` (default ones if none), with `target` in place of theirs if one is given."""
    options = options or ClientOptions()
    return dataclasses.replace(options, target=target) if target else options


def open_channel(options: ClientOptions, api: Any) -> Any:
    """A channel to `options.target`: `api` is the grpc module, or grpc.aio."""
    if options.secure:
        return api.secure_channel(
            options.target, options.channel_credentials(), options.channel_options()
        )
    return api.insecure_channel(options.target, options.channel_options())


def placement(session: pb.Session, model: str, model_version: int) -> tuple[str, int]:
    """The model version whose sizes a session takes: where the server says it lives, else what
    was asked for (a server that does not say serves one model)."""
    if session.model:
        return session.model, session.model_version
    return model, model_version


class ClientCore:
    """A connection to lstm-serve; the surfaces add `info` (cached their way) and the session
    class they open (`_new_session`)."""

    def __init__(
        self,
        target: str | None,
        options: ClientOptions | None,
        make_channel: Callable[[ClientOptions], Any],
    ) -> None:
        self.options = with_target(target, options)
        self._channel = make_channel(self.options)
        self.stub = pb_grpc.InferenceServiceStub(self._channel)

    def info(self, model: str = "", model_version: int = 0) -> Any:
        raise NotImplementedError

    def _new_session(self, **placed: Any) -> Any:
        """The surface's session: session_id, next_step, info, model, model_version."""
        raise NotImplementedError

    def _unary(self, method: str, request: Any, session_id: str = "") -> Flow[Any]:
        """A unary RPC within the client's deadline (all attempts together), with its metadata
        and typed errors; idempotent calls are repeated after a transport failure."""
        retry = UnaryRetry(self.options, method)
        while True:
            metadata = self.options.metadata(session_id)
            rpc = Call(
                getattr(self.stub, method), request, timeout=retry.timeout(), metadata=metadata
            )
            try:
                return (yield rpc)
            except grpc.RpcError as rpc_error:
                err = from_rpc_error(rpc_error)
            wait = retry.backoff_after(err)
            if wait is None:
                raise retry.final(err) from None
            yield Sleep(wait)

    def _fetching_info(self, model: str, model_version: int) -> Flow[pb.GetModelInfoResponse]:
        request = pb.GetModelInfoRequest(model=model, model_version=model_version)
        return self._unary("GetModelInfo", request)

    def _listing_models(self) -> Flow[pb.ListModelsResponse]:
        return self._unary("ListModels", pb.ListModelsRequest())

    def _getting_session(self, session_id: str) -> Flow[pb.Session]:
        request = pb.GetSessionRequest(session_id=session_id)
        return (yield from self._unary("GetSession", request, session_id)).session

    def _deleting_session(self, session_id: str) -> Flow[None]:
        request = pb.DeleteSessionRequest(session_id=session_id)
        yield from self._unary("DeleteSession", request, session_id)

    def _opening(self, session_id: str | None, model: str, model_version: int) -> Flow[Any]:
        """Create a session (with a new unguessable id unless one is given) on a model version
        ('' and 0: the default model's newest ready version); the session."""
        generated = not session_id
        session_id = session_id or new_session_id()
        request = pb.CreateSessionRequest(
            session_id=session_id, model=model, model_version=model_version
        )
        try:
            created = (yield from self._unary("CreateSession", request, session_id)).session
        except LstmStreamError as err:
            # A fresh random id that "exists" is our own create, answered again after a retry.
            if not (generated and err.reason == "SESSION_EXISTS"):
                raise
            created = yield from self._getting_session(session_id)
        return (yield from self._placing(session_id, 0, created, model, model_version))

    def _attaching(self, session_id: str) -> Flow[Any]:
        """An existing session, continued from the server's next step, on its own model."""
        session = yield from self._getting_session(session_id)
        return (yield from self._placing(session_id, session.next_step, session))

    def _placing(
        self, session_id: str, next_step: int, placed: pb.Session, model: str = "", version: int = 0
    ) -> Flow[Any]:
        info = yield Call(self.info, *placement(placed, model, version))
        return self._new_session(
            session_id=session_id,
            next_step=next_step,
            info=info,
            model=placed.model,
            model_version=placed.model_version,
        )

    def _predicting(self, inputs: ArrayLike, model: str, model_version: int) -> Flow[np.ndarray]:
        """A whole sequence (T, input_size) from zero state -> outputs (T, output_size)."""
        info = yield Call(self.info, model, model_version)
        rows = as_rows(inputs, info.input_size)
        request = pb.PredictRequest(
            packed_inputs=rows.astype("<f4").tobytes(),
            num_steps=len(rows),
            model=model,
            model_version=model_version,
        )
        response = yield from self._unary("Predict", request)
        return np.frombuffer(response.packed_outputs, "<f4").reshape(-1, info.output_size).copy()
