"""A bidirectional call driven from synchronous code, with a deadline on every read."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from lstm_stream.client.errors import LstmStreamError, from_rpc_error

_END = object()


class CallStream:
    """One streaming call (StreamSteps, StreamBatches): requests go in through a queue; a reader
    thread puts responses (and finally the call's error) into another, so reads can have a
    deadline."""

    def __init__(self, method: Any, metadata: Sequence) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses: queue.SimpleQueue = queue.SimpleQueue()
        self._call = method(iter(self._requests.get, _END), metadata=metadata)
        threading.Thread(target=self._read, daemon=True, name="lstm-stream-reader").start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(_END)
        except grpc.RpcError as err:
            self._responses.put(err)

    def write(self, request: Any) -> None:
        self._requests.put(request)

    def read(self, timeout: float | None) -> Any:
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise LstmStreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout} s"
            ) from None
        if item is _END:
            raise LstmStreamError(grpc.StatusCode.UNAVAILABLE, "stream ended by the server")
        if isinstance(item, grpc.RpcError):
            raise from_rpc_error(item)
        return item

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
