"""The client's shared logic (flows.py, client_core.py, session_core.py, feeder_core.py), driven
by hand or by the drivers, with fakes in place of gRPC: no server, no sleeping."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from lstm_stream.client.client_core import ClientCore
from lstm_stream.client.errors import LstmStreamError
from lstm_stream.client.feeder_core import FeederCore
from lstm_stream.client.flows import Call, Output, Sleep, aoutputs, arun, outputs, resume, run
from lstm_stream.client.options import ClientOptions
from lstm_stream.client.session_core import SessionCore
from lstm_stream.v1 import inference_pb2 as pb

OPTIONS = ClientOptions(deadline_s=5.0, backoff_max_s=0.01)
INFO = pb.GetModelInfoResponse(input_size=2, output_size=1)


class FakeRpcError(grpc.RpcError):
    """What a stub raises: a code, details, and the ErrorInfo reason in its trailers."""

    def __init__(self, code: grpc.StatusCode, reason: str = "") -> None:
        status = status_pb2.Status(code=code.value[0], message="fake")
        if reason:
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason))
        self._code, self._status = code, status

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "fake"

    def trailing_metadata(self) -> tuple:
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


def error(code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, reason: str = "") -> LstmStreamError:
    return LstmStreamError(code, "fake", reason)


def answer(start: int, outputs: list[float]) -> pb.StreamStepsResponse:
    packed = np.asarray(outputs, "<f4").tobytes()
    return pb.StreamStepsResponse(start_step=start, num_steps=len(outputs), packed_outputs=packed)


def counting(log: list[Any]) -> Any:
    """A flow that asks for two calls and a sleep, hands out what it got, and returns."""
    first = yield Call(log.append, "first")
    try:
        yield Call(int, "not a number")
    except ValueError as err:
        log.append(type(err).__name__)
    yield Sleep(0)
    yield Output(first)
    return "done"


def test_the_sync_drivers_make_calls_throw_errors_in_and_hand_out_outputs():
    log: list[Any] = []
    assert list(outputs(counting(log))) == [None]  # list.append's result, handed out
    assert log == ["first", "ValueError"]

    def quiet() -> Any:
        yield Sleep(0)
        return (yield Call(len, "four")) + 1

    assert run(quiet()) == 5


def test_the_asyncio_drivers_await_calls_and_hand_out_outputs():
    async def echo(value: Any) -> Any:
        return value

    def flow() -> Any:
        got = yield Call(echo, 7)
        yield Sleep(0)
        yield Output(got)
        return got * 2

    def quiet() -> Any:
        return (yield Call(echo, 3)) + 1

    async def drive() -> tuple[list[Any], int]:
        handed = [value async for value in aoutputs(flow())]
        return handed, await arun(quiet())

    assert asyncio.run(drive()) == ([7], 4)


def test_a_driver_closes_the_flow_it_leaves():
    closed: list[bool] = []

    def flow() -> Any:
        try:
            yield Output(1)
            yield Output(2)
        finally:
            closed.append(True)

    driven = outputs(flow())
    assert next(driven) == 1
    driven.close()
    assert closed == [True]


class FakeStream:
    def __init__(self) -> None:
        self.written: list[pb.StreamStepsRequest] = []
        self.closed = False

    def write(self, request: pb.StreamStepsRequest) -> None:
        self.written.append(request)

    def read(self, timeout: float | None) -> pb.StreamStepsResponse:
        raise AssertionError("driven by hand: the test answers")

    def close(self) -> None:
        self.closed = True


class Session(SessionCore):
    """A session whose streams are fakes, driven by hand."""

    def __init__(self, client: Any) -> None:
        super().__init__(client, INFO, "s-1")
        self.streams: list[FakeStream] = []

    def _start(self, method: Any, metadata: Any) -> FakeStream:
        self.streams.append(FakeStream())
        return self.streams[-1]


def fake_client(**stub: Any) -> Any:
    return SimpleNamespace(options=OPTIONS, stub=SimpleNamespace(StreamSteps=None, **stub))


def test_a_session_reopens_after_a_failure_and_resends_with_the_same_step_numbers():
    session = Session(fake_client())
    flow = session._sending([[1.0, 2.0]])
    done, effect = resume(flow)
    assert effect.fn == session.streams[0].write and effect.args[0].start_step == 0
    done, effect = resume(flow, (None, None))
    assert effect.fn == session.streams[0].read  # the answer, awaited
    done, effect = resume(flow, (None, error()))  # the connection dropped
    assert isinstance(effect, Sleep) and session.streams[0].closed
    done, effect = resume(flow, (None, None))
    assert effect.fn == session.streams[1].write and effect.args[0].start_step == 0
    done, effect = resume(flow, (None, None))
    done, outputs_ = resume(flow, (answer(0, [0.5]), None))
    assert done and outputs_.tolist() == [[0.5]]
    assert session.reconnects == 1 and session.next_step == 1


def test_a_refusal_no_retry_fixes_is_raised_and_its_chunk_dropped():
    session = Session(fake_client())
    flow = session._sending([[1.0, 2.0]])
    resume(flow)
    resume(flow, (None, None))
    with pytest.raises(LstmStreamError) as raised:
        resume(flow, (None, error(grpc.StatusCode.INVALID_ARGUMENT, "BAD_INPUT")))
    assert raised.value.reason == "BAD_INPUT"
    assert session.next_step == 0 and session.streams[0].closed  # numbered again from 0


def test_a_with_block_that_raised_deletes_the_session_and_notes_a_failed_delete():
    deleted: list[str] = []
    session = Session(SimpleNamespace(options=OPTIONS, delete_session=deleted.append))
    run(session._exiting(RuntimeError("the block failed")))
    assert deleted == ["s-1"]

    def unreachable(session_id: str) -> None:
        raise error()

    session = Session(SimpleNamespace(options=OPTIONS, delete_session=unreachable))
    block_error = RuntimeError("the block failed")
    run(session._exiting(block_error))
    assert "was not ended" in block_error.__notes__[0]


def test_a_session_another_stream_took_over_is_left_to_it():
    deleted: list[str] = []
    session = Session(SimpleNamespace(options=OPTIONS, delete_session=deleted.append))
    run(session._exiting(error(grpc.StatusCode.ABORTED, "SESSION_TAKEN_OVER")))
    assert deleted == []


class Client(ClientCore):
    def __init__(self, stub: Any) -> None:
        super().__init__(None, OPTIONS, lambda options: grpc.insecure_channel(options.target))
        self.stub = stub

    def info(self, model: str = "", model_version: int = 0) -> pb.GetModelInfoResponse:
        return INFO

    def _new_session(self, **placed: Any) -> tuple[str, int]:
        return placed["session_id"], placed["next_step"]


def test_idempotent_unary_calls_are_repeated_after_a_transport_failure():
    attempts: list[str] = []

    def get_session(request: Any, timeout: float, metadata: Any) -> pb.GetSessionResponse:
        attempts.append(request.session_id)
        if len(attempts) == 1:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
        return pb.GetSessionResponse(session=pb.Session(session_id="s-1", next_step=4))

    client = Client(SimpleNamespace(GetSession=get_session))
    assert run(client._attaching("s-1")) == ("s-1", 4)
    assert attempts == ["s-1", "s-1"]


def test_a_delete_is_not_repeated():
    def delete_session(request: Any, timeout: float, metadata: Any) -> None:
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    client = Client(SimpleNamespace(DeleteSession=delete_session))
    with pytest.raises(LstmStreamError) as raised:
        run(client._deleting_session("s-1"))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_an_own_create_answered_again_as_existing_is_taken_for_the_session():
    def create_session(request: Any, timeout: float, metadata: Any) -> None:
        raise FakeRpcError(grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS")

    def get_session(request: Any, timeout: float, metadata: Any) -> pb.GetSessionResponse:
        return pb.GetSessionResponse(session=pb.Session(session_id=request.session_id))

    client = Client(SimpleNamespace(CreateSession=create_session, GetSession=get_session))
    session_id, _ = run(client._opening(None, "", 0))
    assert session_id  # a generated id: the "existing" session is this client's own
    with pytest.raises(LstmStreamError, match="SESSION_EXISTS"):
        run(client._opening("chosen", "", 0))  # an id the caller chose may be another's


def test_a_batch_call_error_is_typed():
    def step_batch(request: Any, timeout: float, metadata: Any) -> None:
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    feeder = FeederCore(fake_client(StepBatch=step_batch), INFO)
    with pytest.raises(LstmStreamError) as raised:
        run(feeder._calling("", []))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
