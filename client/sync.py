"""Synchronous client: one stream per session, one response per message, in order."""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

from client.errors import from_rpc_error

_END = object()


def as_rows(chunk: np.ndarray | Sequence, width: int) -> np.ndarray:
    """A chunk as (num_steps, width) float32; one timestep may be given as a flat row."""
    rows = np.asarray(chunk, dtype=np.float32)
    return rows.reshape(-1, width) if rows.ndim <= 1 else rows


class StreamingClient:
    def __init__(
        self, target: str = "localhost:50051", channel: grpc.Channel | None = None
    ) -> None:
        self._channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceServiceStub(self._channel)
        self._info: pb.GetModelInfoResponse | None = None

    def __enter__(self) -> StreamingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def info(self) -> pb.GetModelInfoResponse:
        if self._info is None:
            self._info = self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest())
        return self._info

    def open_session(self, session_id: str = "") -> StreamSession:
        """A stream on a new session (empty id) or attached to an existing one."""
        return StreamSession(self, session_id)

    def predict(self, inputs: np.ndarray | Sequence) -> np.ndarray:
        info = self.info()
        rows = as_rows(inputs, info.input_size)
        response = self._call(
            self.stub.Predict, pb.PredictRequest(inputs=rows.ravel().tolist(), num_steps=len(rows))
        )
        return np.asarray(response.outputs, dtype=np.float32).reshape(-1, info.output_size)

    @staticmethod
    def _call(method, request, **kwargs):
        try:
            return method(request, **kwargs)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class StreamSession:
    """A session fed through one bidirectional stream."""

    def __init__(self, client: StreamingClient, session_id: str = "") -> None:
        self._info = client.info()
        self._requests: queue.Queue = queue.Queue()
        metadata = (("x-session-id", session_id),) if session_id else None
        self._call = client.stub.StreamSteps(iter(self._requests.get, _END), metadata=metadata)
        self._responses: Iterator[pb.StreamStepsResponse] = iter(self._call)
        self.session_id = session_id
        self.next_step: int | None = None
        self._first = True

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        chunk: np.ndarray | Sequence = (),
        start_step: int | None = None,
        reset: bool = False,
        end_session: bool = False,
    ) -> np.ndarray:
        """Send timesteps (num_steps, input_size); their outputs (num_steps, output_size)."""
        rows = as_rows(chunk, self._info.input_size) if len(chunk) else np.zeros((0, 0))
        request = pb.StreamStepsRequest(
            inputs=rows.ravel().tolist(), reset=reset, end_session=end_session
        )
        if self._first and self.session_id:
            request.session_id = self.session_id
        if start_step is not None:
            request.start_step = start_step
        self._first = False
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self.session_id = response.session_id
        self.next_step = max(self.next_step or 0, response.start_step + response.num_steps)
        return np.asarray(response.outputs, dtype=np.float32).reshape(
            response.num_steps, self._info.output_size
        )

    def step(self, x: np.ndarray | Sequence) -> np.ndarray:
        """One timestep (input_size,) -> its output (output_size,)."""
        return self.send(np.asarray(x, dtype=np.float32).reshape(1, -1))[0]

    def close(self) -> None:
        """End the stream (the session stays on the server until deleted or expired)."""
        self._requests.put(_END)
        self._call.cancel()
