"""asyncio client, the same shape as the synchronous one."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

from client.errors import from_rpc_error
from client.sync import as_rows


class AsyncStreamingClient:
    def __init__(
        self, target: str = "localhost:50051", channel: grpc.aio.Channel | None = None
    ) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.InferenceServiceStub(self._channel)
        self._info: pb.GetModelInfoResponse | None = None

    async def __aenter__(self) -> AsyncStreamingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def info(self) -> pb.GetModelInfoResponse:
        if self._info is None:
            self._info = await self._call(self.stub.GetModelInfo(pb.GetModelInfoRequest()))
        return self._info

    async def open_session(self, session_id: str = "") -> AsyncStreamSession:
        return AsyncStreamSession(self, await self.info(), session_id)

    async def predict(self, inputs: np.ndarray | Sequence) -> np.ndarray:
        info = await self.info()
        rows = as_rows(inputs, info.input_size)
        response = await self._call(
            self.stub.Predict(pb.PredictRequest(inputs=rows.ravel().tolist(), num_steps=len(rows)))
        )
        return np.asarray(response.outputs, dtype=np.float32).reshape(-1, info.output_size)

    @staticmethod
    async def _call(call):
        try:
            return await call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class AsyncStreamSession:
    def __init__(
        self, client: AsyncStreamingClient, info: pb.GetModelInfoResponse, session_id: str = ""
    ) -> None:
        self._info = info
        metadata = (("x-session-id", session_id),) if session_id else None
        self._call = client.stub.StreamSteps(metadata=metadata)
        self.session_id = session_id
        self.next_step: int | None = None
        self._first = True

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(
        self,
        chunk: np.ndarray | Sequence = (),
        start_step: int | None = None,
        reset: bool = False,
        end_session: bool = False,
    ) -> np.ndarray:
        rows = as_rows(chunk, self._info.input_size) if len(chunk) else np.zeros((0, 0))
        request = pb.StreamStepsRequest(
            inputs=rows.ravel().tolist(), reset=reset, end_session=end_session
        )
        if self._first and self.session_id:
            request.session_id = self.session_id
        if start_step is not None:
            request.start_step = start_step
        self._first = False
        try:
            await self._call.write(request)
            response = await self._call.read()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if response is grpc.aio.EOF:
            raise from_rpc_error(await _finished_error(self._call))
        self.session_id = response.session_id
        self.next_step = max(self.next_step or 0, response.start_step + response.num_steps)
        return np.asarray(response.outputs, dtype=np.float32).reshape(
            response.num_steps, self._info.output_size
        )

    async def step(self, x: np.ndarray | Sequence) -> np.ndarray:
        return (await self.send(np.asarray(x, dtype=np.float32).reshape(1, -1)))[0]

    async def close(self) -> None:
        self._call.cancel()


async def _finished_error(call: grpc.aio.StreamStreamCall) -> grpc.RpcError:
    code = await call.code()
    details = await call.details()
    trailers = await call.trailing_metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)
