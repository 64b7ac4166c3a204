"""A session loaded from the state store while another call names it: nothing may see it half
made (at step 0, with a new create time). Real servers on a real redis-server; the loading
replica's engine is held busy so that the load is caught in the middle."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import grpc
import numpy as np
import pytest

from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from server import transfer
from server.store_backend import KeyLayout
from tests.e2e.scale_parts import RedisServer
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import serve, wait_for

SESSION = "loaded"


def stored(store: RedisServer) -> transfer.SessionRecord:
    fields = store.client().hgetall(KeyLayout(store.url, "").session("", SESSION))
    return transfer.from_fields(fields)


def step_batch(target: str, steps: np.ndarray, start: int, create: bool = False) -> Future:
    """A StepBatch of the session's chunk at `start`, answered in the background."""
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.InferenceServiceStub(channel)
    chunk = pb.SessionChunk(
        session_id=SESSION, start_step=start, packed_inputs=steps.astype("<f4").tobytes()
    )
    call = stub.StepBatch.future(
        pb.StepBatchRequest(chunks=[chunk], create_missing=create), timeout=60
    )
    call.add_done_callback(lambda _: channel.close())
    return call


def outputs_of(response: pb.StepBatchResponse) -> np.ndarray:
    (result,) = response.results
    assert not result.HasField("error"), result.error.message
    return np.frombuffer(result.packed_outputs, "<f4").reshape(result.num_steps, -1)


class HeldEngine:
    """The server's engine thread held busy until release(): work handed to it waits."""

    def __init__(self, srv) -> None:
        self._srv = srv
        self._free = threading.Event()
        model = srv.server.runtime.models.resolve()
        self._done = asyncio.run_coroutine_threadsafe(model.engine.call(self._free.wait), srv.loop)

    def release(self) -> None:
        self._free.set()
        self._done.result(30)


@pytest.fixture
def continued(regression_dir, regression_model):
    """Steps 0..3 of the session on replica A, stored; replica B, which has never held it,
    serves its next steps. Yields (B, all steps)."""
    steps = np.random.default_rng(61).normal(0, 3, (10, 6)).astype(np.float32)
    with RedisServer() as store:
        model = str(regression_dir)
        with serve(model=model, state_store=store.url) as a:
            response = step_batch(a.target, steps[:4], 0, create=True).result(60)
            assert_equals_offline(outputs_of(response), regression_model, steps[:4])
            wait_for(lambda: stored(store).next_step == 4, what="step 4 stored")
        with serve(model=model, state_store=store.url) as b:
            yield b, steps


def test_a_retried_call_waits_for_the_load_its_first_try_started(continued, regression_model):
    """The client's first try loads the session; before the stored state is in place its
    retry (the first timed out, say) arrives. The retry once met the session at step 0 and
    was refused as a gap ("expected at most 0, got 4"): the client then took the stored steps
    for lost. Both are answered, steps 4..5 applied once."""
    b, steps = continued
    held = HeldEngine(b)
    first = step_batch(b.target, steps[4:6], 4)
    wait_for(lambda: len(b.server.runtime.sessions) == 1, what="the load to create the session")
    retry = step_batch(b.target, steps[4:6], 4)
    held.release()
    for call in (first, retry):
        assert_equals_offline(outputs_of(call.result(60)), regression_model, steps, first=4)
    response = step_batch(b.target, steps[6:8], 6).result(60)
    assert_equals_offline(outputs_of(response), regression_model, steps, first=6)
    assert_state_equals_offline(b.target, SESSION, regression_model, steps[:8])
