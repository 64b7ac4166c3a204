"""The state store's writer and reader against a real redis-server."""

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.errors import StoreUnavailable
from server.models import VersionKey
from server.sessions import ReplayBuffer, Session
from server.state_store import StateStore, session_key
from tests.e2e.scale_parts import RedisServer
from tests.factories import free_port

FINGERPRINT = "f" * 64


@dataclass(frozen=True)
class FakeModel:
    """The version a session lives on, as the store reads it."""

    key: VersionKey = field(default_factory=lambda: VersionKey("m", 3))
    fingerprint: str = FINGERPRINT
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(output_size=2))


def make_session(
    steps: int, value: float, session_id: str = "s1", replay: int = 4, born: float = 1000.0
) -> Session:
    session = Session(
        session_id,
        slot=0,
        replay=ReplayBuffer(replay),
        model=FakeModel(),
        principal="alice",
        create_time=born,
    )
    outputs = value + np.arange(steps * 2, dtype=np.float32).reshape(steps, 2)  # (T, O)
    session.commit(0, outputs)
    return session


class FakePool:
    """The engine's pool as the store reads it: each session's (h, c), as stage() set it."""

    def __init__(self) -> None:
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def stage(self, store: StateStore, session: Session, h: torch.Tensor, c: torch.Tensor):
        """A batch changed the session: its state is now (h, c)."""
        self.states[id(session)] = (h, c)
        store.stage(session)

    async def read_states(self, sessions):
        return [(self.states[id(s)][0].numpy(), self.states[id(s)][1].numpy()) for s in sessions]


def make_store(url: str, pool: FakePool | None = None, ttl_s: float = 60.0) -> StateStore:
    return StateStore(
        url,
        ttl_s,
        replay_steps=4,
        read_states=(pool or FakePool()).read_states,
        live_sessions=list,
    )


def test_a_record_round_trips_with_its_replay_and_expires_with_the_idle_timeout():
    async def run(url):
        pool = FakePool()
        store = make_store(url, pool, ttl_s=30)
        await store.start()
        session = make_session(steps=6, value=10.0)
        pool.stage(store, session, torch.full((1, 3), 0.5), torch.full((1, 3), -0.5))
        await store.flush()
        record = await store.load("s1", "alice")
        other_principal = await store.load("s1", "bob")
        await store.stop()
        return session, record, other_principal

    with RedisServer() as redis:
        session, record, other_principal = asyncio.run(run(redis.url))
        ttl_ms = redis.client().pttl(session_key("alice", "s1"))
    assert record.next_step == 6 and session.durable_step == 6
    assert record.fingerprint == FINGERPRINT and record.principal == "alice"
    assert (record.model, record.model_version) == ("m", 3)  # the version it lives on
    np.testing.assert_array_equal(record.h.numpy(), np.full((1, 3), 0.5, np.float32))
    np.testing.assert_array_equal(record.c.numpy(), np.full((1, 3), -0.5, np.float32))
    np.testing.assert_array_equal(record.replay.numpy(), session.replay.read(2, 6, 2))  # last 4
    assert other_principal is None  # keyed by principal too
    assert 25_000 < ttl_ms <= 30_000


def test_an_older_write_never_replaces_a_newer_one():
    async def run(url):
        pool = FakePool()
        successor, lost = make_store(url, pool), make_store(url, pool)
        await successor.start()
        await lost.start()
        pool.stage(successor, make_session(9, 1.0), torch.ones(1, 3), torch.ones(1, 3))
        await successor.flush()
        # A lost replica's write of an older step arrives late.
        late = make_session(5, 2.0)
        pool.stage(lost, late, torch.zeros(1, 3), torch.zeros(1, 3))
        await lost.flush()
        record = await successor.load("s1", "alice")
        await successor.stop()
        await lost.stop()
        return record, late.durable_step

    with RedisServer() as redis:
        record, late_durable_step = asyncio.run(run(redis.url))
    assert record.next_step == 9
    assert late_durable_step == 0  # a refused write is not reported durable
    np.testing.assert_array_equal(record.h.numpy(), np.ones((1, 3), np.float32))


def test_reading_an_unreachable_store_is_unavailable_not_not_found():
    async def run():
        store = make_store(f"redis://127.0.0.1:{free_port()}/0")
        try:
            with pytest.raises(StoreUnavailable) as raised:
                await store.load("s1", "alice")
            with pytest.raises(StoreUnavailable):
                await store.holds("s1", "alice")
        finally:
            await store.stop()
        return raised.value

    err = asyncio.run(run())
    assert (err.code.name, err.reason) == ("UNAVAILABLE", "STATE_STORE_UNAVAILABLE")
    assert "state store is unreachable (ConnectionError" in err.message


def test_an_ended_session_stays_ended_until_a_new_one_takes_its_id():
    async def run(url):
        pool = FakePool()
        successor, lost = make_store(url, pool), make_store(url, pool)
        await successor.start()
        await lost.start()
        ended = make_session(9, 1.0)
        successor.forget(ended)  # the client ended it on the successor
        await successor.flush()
        # The lost replica's last write of it lands afterwards: it must not bring it back.
        pool.stage(lost, make_session(5, 2.0), torch.zeros(1, 3), torch.zeros(1, 3))
        await lost.flush()
        after_end = await successor.load("s1", "alice"), await successor.holds("s1", "alice")
        reborn = make_session(2, 3.0, born=2000.0)  # a new session with the same id
        pool.stage(successor, reborn, torch.ones(1, 3), torch.ones(1, 3))
        await successor.flush()
        record = await successor.load("s1", "alice")
        await successor.stop()
        await lost.stop()
        return after_end, record

    with RedisServer() as redis:
        (loaded, held), record = asyncio.run(run(redis.url))
    assert loaded is None and held is False
    assert record.next_step == 2 and record.create_time == 2000.0


def test_a_batch_creating_a_thousand_sessions_with_a_store_creates_every_one(bundled_model):
    """A gateway's first message names its sessions, all new: each is looked up in the store
    at once. They once failed from about the 100th on (redis-py's connection pool limit)."""
    import grpc

    from lstm_stream.v1 import inference_pb2 as pb
    from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
    from tests.equality import assert_equals_offline
    from tests.factories import ServeProcess, random_steps

    steps = random_steps(2, 6, seed=12)
    ids = [f"gw-{i}" for i in range(1000)]
    chunks = [
        pb.SessionChunk(session_id=sid, packed_inputs=steps.astype("<f4").tobytes()) for sid in ids
    ]
    with (
        RedisServer() as redis,
        ServeProcess("--state-store", redis.url, "--max-sessions", "2000") as proc,
        grpc.insecure_channel(proc.target) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        results = stub.StepBatch(pb.StepBatchRequest(chunks=chunks, create_missing=True)).results
    refused = [r.error.message for r in results if r.HasField("error")]
    assert not refused, f"{len(refused)} of {len(ids)} refused, e.g. {refused[0]}"
    for result in results:
        outputs = np.frombuffer(result.packed_outputs, "<f4").reshape(2, 4)
        assert_equals_offline(outputs, bundled_model, steps)
