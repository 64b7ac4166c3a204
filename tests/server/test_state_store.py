"""The state store's writer and reader against a real redis-server, and a real three-master
Redis Cluster: each writer test runs on both."""

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.errors import StoreUnavailable
from server.models import VersionKey
from server.sessions import ReplayBuffer, Session
from server.state_store import StateStore
from server.store_backend import KeyLayout
from tests.e2e.scale_parts import RedisCluster, RedisServer
from tests.factories import free_port, wait_for

FINGERPRINT = "f" * 64


@dataclass(frozen=True)
class FakeModel:
    """The version a session lives on, as the store reads it."""

    key: VersionKey = field(default_factory=lambda: VersionKey("m", 3))
    fingerprint: str = FINGERPRINT
    config: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(output_size=2, state_names=("h", "c"))
    )


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


def make_store(
    url: str, pool: FakePool | None = None, ttl_s: float = 60.0, live_sessions=list
) -> StateStore:
    return StateStore(
        url,
        ttl_s,
        replay_steps=4,
        read_states=(pool or FakePool()).read_states,
        live_sessions=live_sessions,
    )


def key_of(url: str, principal: str, session_id: str) -> str:
    return KeyLayout(url, "").session(principal, session_id)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture(params=["redis", "cluster"])
def redis(request):
    """One redis-server, or the module's cluster emptied."""
    if request.param == "redis":
        with RedisServer() as server:
            yield server
    else:
        started = request.getfixturevalue("cluster")
        started.flush()
        yield started


def test_a_record_round_trips_with_its_replay_and_expires_with_the_idle_timeout(redis):
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

    session, record, other_principal = asyncio.run(run(redis.url))
    ttl_ms = redis.client().pttl(key_of(redis.url, "alice", "s1"))
    assert record.next_step == 6 and session.durable_step == 6
    assert record.fingerprint == FINGERPRINT and record.principal == "alice"
    assert (record.model, record.model_version) == ("m", 3)  # the version it lives on
    np.testing.assert_array_equal(record.h.numpy(), np.full((1, 3), 0.5, np.float32))
    np.testing.assert_array_equal(record.state["c"].numpy(), np.full((1, 3), -0.5, np.float32))
    np.testing.assert_array_equal(record.replay.numpy(), session.replay.read(2, 6, 2))  # last 4
    assert other_principal is None  # keyed by principal too
    assert 25_000 < ttl_ms <= 30_000


def test_an_older_write_never_replaces_a_newer_one(redis):
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


def test_an_ended_session_stays_ended_until_a_new_one_takes_its_id(redis):
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


def test_a_record_keeps_the_outputs_from_the_step_its_client_has_answered(redis):
    """A client that says it has every output before step a is never again sent one of them:
    the record keeps outputs a .. next_step - 1 only (and none once a reaches next_step)."""

    async def run(url):
        pool = FakePool()
        store = make_store(url, pool)
        await store.start()
        records = {}
        for answered in (0, 3, 5, 6, 9):  # 9: a client ahead of a successor (it resends)
            session = make_session(steps=6, value=10.0, session_id=f"a{answered}")
            session.note_answered(answered)
            pool.stage(store, session, torch.zeros(1, 3), torch.zeros(1, 3))
            await store.flush()
            records[answered] = (session, await store.load(f"a{answered}", "alice"))
        await store.stop()
        return records

    records = asyncio.run(run(redis.url))
    for answered, oldest in ((0, 2), (3, 3), (5, 5), (6, 6), (9, 6)):  # replay_steps=4
        session, record = records[answered]
        assert record.next_step == 6
        np.testing.assert_array_equal(
            record.replay.numpy(), session.replay.read(oldest, 6, 2), err_msg=f"{answered=}"
        )


def test_a_thousand_look_ups_at_once_share_one_pipeline(redis):
    """Past the store's connection limit (64; per node in a cluster, whose client refuses more
    rather than waiting): every look-up is answered."""

    async def run(url):
        pool = FakePool()
        store = make_store(url, pool)
        await store.start()
        pool.stage(
            store, make_session(3, 1.0, session_id="held"), torch.ones(1, 3), torch.ones(1, 3)
        )
        await store.flush()
        ids = ["held", *(f"new-{i}" for i in range(999))]
        held = await asyncio.gather(*(store.holds(i, "alice") for i in ids))
        records = await asyncio.gather(*(store.load(i, "alice") for i in ids))
        await store.stop()
        return held, records

    held, records = asyncio.run(run(redis.url))
    assert held == [True] + [False] * 999
    assert records[0].next_step == 3 and records[1:] == [None] * 999


def test_a_cluster_shard_that_lost_its_data_gets_every_live_session_again(cluster):
    """One master restarts empty (FLUSHALL: slots kept, keys gone). Its buckets' markers are
    gone with its sessions: the writer's next call to it (a heartbeat, with nothing staged)
    notices, and every live session is written again, idle ones included."""
    cluster.flush()
    sessions = [make_session(4, float(i), session_id=f"s{i}") for i in range(60)]

    async def run(url):
        pool = FakePool()
        store = make_store(url, pool, live_sessions=lambda: sessions)
        await store.start()
        for session in sessions:
            pool.stage(store, session, torch.ones(1, 3), torch.ones(1, 3))
        await store.flush()
        client = cluster.client()
        keys = [key_of(url, "alice", s.session_id) for s in sessions]
        nodes = {client.get_node_from_key(key).port for key in keys}
        victim = cluster.ports[0]
        lost = [k for k in keys if client.get_node_from_key(k).port == victim]
        import redis as redis_py

        redis_py.Redis(port=victim).flushall()
        assert not any(client.exists(k) for k in lost)
        await asyncio.to_thread(
            wait_for, lambda: all(client.exists(k) for k in keys), 60, what="rewritten sessions"
        )
        await store.stop()
        return nodes, lost

    nodes, lost = asyncio.run(run(cluster.url))
    assert len(nodes) == 3 and lost  # the sessions were spread over every shard


def test_later_writes_send_step_and_state_only_and_a_lost_record_is_written_whole(redis):
    """The meta (id, principal, model, fingerprint) goes with a session's first write; later
    writes update step and state. A record gone meanwhile (evicted, or deleted by hand) is
    written whole again at the next write, never left without its meta."""

    async def run(url, client):
        pool = FakePool()
        store = make_store(url, pool)
        await store.start()
        key = key_of(url, "alice", "s1")
        session = make_session(steps=3, value=1.0)
        pool.stage(store, session, torch.zeros(1, 3), torch.zeros(1, 3))
        await store.flush()
        client.hset(key, "meta", client.hget(key, "meta") + b" ")  # marks the stored meta
        session.commit(3, np.ones((2, 2), np.float32))
        pool.stage(store, session, torch.ones(1, 3), torch.ones(1, 3))
        await store.flush()
        updated_meta = client.hget(key, "meta")
        updated = await store.load("s1", "alice")
        client.delete(key)
        session.commit(5, np.ones((1, 2), np.float32))
        pool.stage(store, session, torch.full((1, 3), 2.0), torch.full((1, 3), 2.0))
        await store.flush()
        rewritten = await store.load("s1", "alice")
        await store.stop()
        return updated_meta, updated, rewritten, session.durable_step

    updated_meta, updated, rewritten, durable_step = asyncio.run(run(redis.url, redis.client()))
    assert updated_meta.endswith(b" ")  # not sent again
    assert updated.next_step == 5 and float(updated.h[0, 0]) == 1.0
    assert rewritten is not None and rewritten.next_step == 6 and durable_step == 6
    assert float(rewritten.h[0, 0]) == 2.0 and rewritten.principal == "alice"


def test_a_store_that_lost_its_scripts_gets_the_write_script_again(redis):
    """Writes call the script by its SHA1; a Redis restarted (or a shard replaced) has none,
    answers NOSCRIPT, and the writer loads it again and writes."""
    import redis as redis_py

    async def run(url):
        pool = FakePool()
        store = make_store(url, pool)
        await store.start()
        session = make_session(steps=3, value=1.0)
        pool.stage(store, session, torch.zeros(1, 3), torch.zeros(1, 3))
        await store.flush()
        for port in getattr(redis, "ports", None) or [redis.port]:
            redis_py.Redis(port=port).script_flush()
        session.commit(3, np.ones((2, 2), np.float32))
        pool.stage(store, session, torch.ones(1, 3), torch.ones(1, 3))
        await store.flush()
        record = await store.load("s1", "alice")
        await store.stop()
        return record, session.durable_step

    record, durable_step = asyncio.run(run(redis.url))
    assert record.next_step == 5 == durable_step and float(record.h[0, 0]) == 1.0
