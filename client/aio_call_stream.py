"""A bidirectional asyncio call (StreamSteps, StreamBatches) with the shape of CallStream
(call_stream.py): writes that never raise, reads with a deadline that raise LstmStreamError."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import grpc

from lstm_stream.client.errors import LstmStreamError, from_rpc_error


class AsyncCallStream:
    def __init__(self, method: Any, metadata: Sequence[tuple[str, str]]) -> None:
        self._call = method(metadata=metadata)

    async def write(self, request: Any) -> None:
        """Write `request`; a call that has already finished (the connection dropped, even
        between deciding to write and writing) shows in the read that follows."""
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self._call.write(request)

    async def read(self, timeout: float | None) -> Any:
        try:
            response = await asyncio.wait_for(self._call.read(), timeout)
        except TimeoutError:
            raise LstmStreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout} s"
            ) from None
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if response is grpc.aio.EOF:
            code = await self._call.code()
            if code == grpc.StatusCode.OK:
                raise LstmStreamError(grpc.StatusCode.UNAVAILABLE, "stream ended by the server")
            details, trailers = await self._call.details(), await self._call.trailing_metadata()
            raise from_rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details))
        return response

    def close(self) -> None:
        self._call.cancel()
