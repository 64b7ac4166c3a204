"""Scale-out with real parts on loopback: lstm-serve replicas behind nginx (the shipped config)
sharing a redis-server state store. Sessions stay on one replica; a replica killed mid-stream
loses nothing; Redis going away costs durability, not service."""

import asyncio
import signal
import time

import grpc
import numpy as np
import pytest
import torch

from lstm_stream.client import AsyncStreamingClient, ClientOptions, LstmStreamError, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from server import transfer
from tests.e2e.scale_parts import RedisServer, nginx
from tests.equality import assert_equals_offline
from tests.factories import (
    ServeProcess,
    free_port,
    metric_value,
    offline,
    random_chunks,
    random_steps,
    wait_for,
)

REPLICAS, SESSIONS, STEPS = 3, 200, 48
OPTIONS = dict(deadline_s=10.0, max_retries=50, backoff_initial_s=0.02, backoff_max_s=0.5)


def start_replica(store_url: str, *args: str) -> ServeProcess:
    metrics_port = free_port()
    replica = ServeProcess(
        "--state-store", store_url, "--metrics-port", str(metrics_port), "--max-sessions", "512",
        *args,
    )  # fmt: skip
    replica.metrics_port = metrics_port
    return replica


def counts(replicas, name: str) -> list[float]:
    return [metric_value(r.metrics_port, name) for r in replicas]


class Phases:
    """Sessions stream their chunks in three thirds; the test acts between them."""

    def __init__(self, sessions: int) -> None:
        self.sessions = sessions
        self.reached = [0, 0]
        self.events = [asyncio.Event(), asyncio.Event()]
        self.go = asyncio.Event()
        self.killed = asyncio.Event()

    async def arrive(self, phase: int, wait: bool) -> None:
        self.reached[phase] += 1
        if self.reached[phase] == self.sessions:
            self.events[phase].set()
        if wait:
            await self.go.wait()


def test_sessions_stay_on_one_replica_and_survive_a_killed_one(
    regression_dir, regression_model, tmp_path
):
    """A regression model: a resent step applied twice after the failover would show in every
    later output (a classifier's saturated softmax can hide it)."""
    inputs = [random_steps(STEPS, 6, seed=9000 + i) for i in range(SESSIONS)]
    plans = [random_chunks(STEPS, 4, seed=9000 + i) for i in range(SESSIONS)]
    with RedisServer() as store:
        model = ("--model", str(regression_dir))
        replicas = [start_replica(store.url, *model) for _ in range(REPLICAS)]
        try:
            with nginx(tmp_path / "nginx", [r.port for r in replicas]) as balancer:
                results, observed = asyncio.run(drive(balancer, inputs, plans, replicas, store))
            survivors = replicas[1:]
            assert sum(counts(survivors, "lstm_sessions_active")) == 0  # all ended
            for replica in survivors:  # a clean stop writes what is staged
                assert replica.finish()[0] == 0
        finally:
            for r in replicas:
                r.__exit__()
        redis = store.client()
        sessions = redis.scan_iter("lstm-stream:session:*")
        live = [key for key in sessions if redis.hexists(key, "state")]
        assert live == []  # ended sessions leave tombstones only, whatever landed late

    created, loads_before, victim_sessions, loads_after = observed
    assert sum(created) == SESSIONS  # each session created on exactly one replica
    assert all(c >= SESSIONS / REPLICAS / 3 for c in created), created  # spread over all
    assert loads_before == [0] * REPLICAS  # no session touched a second replica
    assert victim_sessions > 0
    # Each of the killed replica's sessions moved once, to one other replica; no other moved.
    assert sum(loads_after) == victim_sessions, (loads_after, victim_sessions)
    resent = 0
    for steps, (outputs, session_resent) in zip(inputs, results, strict=True):
        assert outputs.shape == (STEPS, 4)  # none lost, none repeated
        assert_equals_offline(outputs, regression_model, steps)
        resent += session_resent
    # Answered steps the killed replica had not stored were applied again on the new one.
    assert resent > 0
    print(
        f"created per replica {created}; killed replica held {victim_sessions:.0f} sessions; "
        f"loaded by the others {loads_after}; {resent} answered steps resent"
    )


async def drive(target, inputs, plans, replicas, store):
    phases = Phases(SESSIONS)

    async def one(i, client):
        session = await client.open_session()
        chunks = np.split(inputs[i], np.cumsum(plans[i])[:-1])
        thirds = np.array_split(np.arange(len(chunks)), 3)
        outputs = []
        for phase, part in enumerate(thirds):
            async for out in session.stream([chunks[j] for j in part], window=2):
                outputs.append(out)
            if phase < 2:
                # Between the first and second third every session waits; after the second,
                # each goes straight on, so the kill finds streams mid-flight.
                await phases.arrive(phase, wait=phase == 0)
        resent = session.resent_steps
        await phases.killed.wait()  # every session ends on a replica that lives
        await session.close()
        return np.concatenate(outputs), resent

    async def act():
        await phases.events[0].wait()  # every session created and a third streamed
        created = counts(replicas, "lstm_sessions_created_total")
        loads_before = counts(replicas, "lstm_state_store_loads_total")
        # Hold Redis's writes until the kill: the steps streamed from now on are answered but
        # not stored, however long the second third takes.
        store.client().execute_command("CLIENT", "PAUSE", "600000", "WRITE")
        phases.go.set()
        await wait_event(phases.events[1], 60)
        victim = replicas[0]
        victim_sessions = metric_value(victim.metrics_port, "lstm_sessions_active")
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(30)
        store.client().execute_command("CLIENT", "UNPAUSE")
        phases.killed.set()
        return created, loads_before, victim_sessions

    options = ClientOptions(target=target, **OPTIONS)
    async with AsyncStreamingClient(options=options) as client:
        acting = asyncio.create_task(act())
        results = await asyncio.gather(*(one(i, client) for i in range(SESSIONS)))
        created, loads_before, victim_sessions = await acting
    loads_after = counts(replicas[1:], "lstm_state_store_loads_total")
    return results, (created, loads_before, victim_sessions, loads_after)


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    await asyncio.wait_for(event.wait(), timeout)


def stored(store: RedisServer, session_id: str) -> transfer.SessionRecord | None:
    fields = store.client().hgetall(f"lstm-stream:session::{session_id}")
    return transfer.from_fields(fields) if b"state" in fields else None  # else none, or ended


def test_redis_down_keeps_serving_says_so_and_catches_up(bundled_model):
    steps = random_steps(40, 6, seed=31)
    idle_steps = random_steps(5, 6, seed=32)
    with RedisServer() as store, start_replica(store.url) as replica:
        store_up = f'lstm_state_store_up{{store="{store.url}"}}'
        with StreamingClient(replica.target) as client:
            busy, idle = client.open_session(), client.open_session()
            idle.send(idle_steps)
            outputs = [busy.send(steps[:10])]
            wait_for(lambda: (r := stored(store, busy.session_id)) and r.next_step == 10)

            store.stop()
            outputs.append(busy.send(steps[10:20]))  # answered from memory
            wait_for(lambda: metric_value(replica.metrics_port, store_up) == 0)
            assert metric_value(replica.metrics_port, "lstm_state_store_errors_total") >= 1
            outputs.append(busy.send(steps[20:30]))

            store.start()  # empty: what it held is gone
            wait_for(lambda: metric_value(replica.metrics_port, store_up) == 1)
            # Caught up: both sessions are stored anew, the idle one too, at their steps.
            busy_record = wait_for(lambda: stored(store, busy.session_id), what="busy stored")
            idle_record = wait_for(lambda: stored(store, idle.session_id), what="idle stored")
            assert busy_record.next_step == 30 and idle_record.next_step == 5
            request = pb.ExportSessionRequest(session_id=busy.session_id)
            exported = transfer.decode(client.call("ExportSession", request).state)
            np.testing.assert_array_equal(busy_record.h.numpy(), exported.h.numpy())
            # The record keeps the outputs the client may still ask for: the SDK said, with the
            # chunk at step 20, that it had every output before it (server/state_store.py).
            np.testing.assert_array_equal(busy_record.replay.numpy(), exported.replay[20:].numpy())
            outputs.append(busy.send(steps[30:]))
            assert busy.durable_step >= 30  # responses say how far the store holds it again

            store.client().flushall()  # answers, but has lost everything: noticed, rewritten
            idle_again = wait_for(lambda: stored(store, idle.session_id), 20, what="rewrite")
            assert idle_again.next_step == 5
            busy.close()
            idle.close()
        code, log = replica.finish()
    assert code == 0
    assert_equals_offline(np.concatenate(outputs), bundled_model, steps)
    assert "unreachable" in log and "serving from memory" in log
    assert "reachable again" in log


def test_a_replica_holding_a_stale_copy_takes_the_newer_state_from_the_store(bundled_model):
    steps = random_steps(30, 6, seed=33)
    expected = offline(bundled_model, steps)
    with RedisServer() as store, start_replica(store.url) as a, start_replica(store.url) as b:
        with StreamingClient(a.target) as on_a, StreamingClient(b.target) as on_b:
            first = on_a.open_session("moving-session")
            np.testing.assert_allclose(first.send(steps[:10]), expected[:10], atol=1e-5)
            wait_for(lambda: (r := stored(store, "moving-session")) and r.next_step == 10)
            with pytest.raises(LstmStreamError) as raised:  # another replica's session
                on_b.open_session("moving-session")
            assert raised.value.reason == "SESSION_EXISTS"
            assert on_b.attach("moving-session").next_step == 10  # B loads a copy
            np.testing.assert_allclose(first.send(steps[10:20]), expected[10:20], atol=1e-5)
            wait_for(lambda: stored(store, "moving-session").next_step == 20)
            # The session comes back to B, whose copy is 10 steps old: the store's wins.
            again = on_b.attach("moving-session")
            assert again.next_step == 20
            np.testing.assert_allclose(again.send(steps[20:]), expected[20:], atol=1e-5)
            again.close()
        superseded = 'lstm_sessions_closed_total{reason="superseded"}'
        assert metric_value(b.metrics_port, superseded) == 1
        assert metric_value(b.metrics_port, "lstm_state_store_loads_total") == 2


def test_a_stored_session_of_another_model_is_refused_by_name(bundled_model):
    record = transfer.SessionRecord(
        session_id="old-model-session",
        next_step=3,
        state={"h": torch.zeros(2, 48), "c": torch.zeros(2, 48)},
        replay=torch.zeros(3, 4),
        fingerprint="0" * 64,
        create_time=time.time(),
    )
    with RedisServer() as store, start_replica(store.url) as replica:
        key = "lstm-stream:session::old-model-session"
        store.client().hset(key, mapping=transfer.to_fields(record))
        with StreamingClient(replica.target) as client, pytest.raises(LstmStreamError) as raised:
            client.get_session("old-model-session")
    err = raised.value
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_MISMATCH")
    assert "stored state: from model 000000000000" in err.details


def test_an_ended_session_is_not_loaded_back_before_its_end_is_written(bundled_model):
    steps = random_steps(4, 6, seed=34)
    slow_writes = ("--state-store-interval-ms", "3000")
    with (
        RedisServer() as store,
        start_replica(store.url, *slow_writes) as replica,
        StreamingClient(replica.target) as client,
    ):
        session = client.open_session()
        session.send(steps)
        wait_for(lambda: (rec := stored(store, session.session_id)) and rec.next_step == 4)
        client.delete_session(session.session_id)  # its end waits for the next write
        assert stored(store, session.session_id) is not None  # still there, for now
        with pytest.raises(LstmStreamError) as raised:
            client.get_session(session.session_id)
        assert raised.value.reason == "SESSION_NOT_FOUND"
        wait_for(lambda: stored(store, session.session_id) is None, what="the tombstone")


def test_an_import_takes_a_free_id_only_and_is_stored_as_a_new_session(bundled_model):
    steps = random_steps(6, 6, seed=35)
    expected = offline(bundled_model, steps)
    with (
        RedisServer() as store,
        start_replica(store.url) as a,
        start_replica(store.url) as b,
        StreamingClient(a.target) as on_a,
        StreamingClient(b.target) as on_b,
    ):
        session = on_a.open_session("imported")
        session.send(steps[:3])
        wait_for(lambda: (rec := stored(store, "imported")) and rec.next_step == 3)
        request = pb.ExportSessionRequest(session_id="imported")
        state = on_a.call("ExportSession", request, "imported").state
        with pytest.raises(LstmStreamError) as raised:  # live on replica A
            on_b.call("ImportSession", pb.ImportSessionRequest(state=state))
        assert raised.value.reason == "SESSION_EXISTS"
        session.close()  # ended on A: its tombstone must not refuse the import's writes
        wait_for(lambda: stored(store, "imported") is None, what="the tombstone")
        on_b.call("ImportSession", pb.ImportSessionRequest(state=state))
        moved = on_b.attach("imported")
        np.testing.assert_allclose(moved.send(steps[3:]), expected[3:], atol=1e-5, rtol=0)
        wait_for(lambda: (rec := stored(store, "imported")) and rec.next_step == 6)


def test_batch_fed_sessions_stay_on_their_replica_and_survive_a_killed_one(
    regression_dir, regression_model, tmp_path
):
    """Routed by partition: batch calls keep each session on one replica while all live; a
    killed replica's sessions go on elsewhere, every output equal offline, none lost or
    repeated, the steps it had not stored sent again. A regression model, whose outputs show a
    step applied twice."""
    sessions, rounds = 120, 30
    ids = [f"gw-{i}" for i in range(sessions)]
    inputs = [random_steps(rounds * 2, 6, seed=4000 + i) for i in range(sessions)]

    def batch(round_: int) -> dict:
        return {sid: inputs[i][2 * round_ : 2 * round_ + 2] for i, sid in enumerate(ids)}

    outputs: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
    with RedisServer() as store:
        model = ("--model", str(regression_dir))
        replicas = [start_replica(store.url, *model) for _ in range(REPLICAS)]
        try:
            with nginx(tmp_path / "nginx", [r.port for r in replicas]) as balancer:
                options = ClientOptions(target=balancer, partitions=32, **OPTIONS)
                with StreamingClient(options=options) as client:
                    for round_ in range(10):
                        result = client.step_batch(batch(round_))
                        for sid in ids:
                            outputs[sid].append(result[sid])
                    created = counts(replicas, "lstm_sessions_created_total")
                    loads_before = counts(replicas, "lstm_state_store_loads_total")
                    store.client().execute_command("CLIENT", "PAUSE", "600000", "WRITE")
                    for result in client.stream_batches(map(batch, range(10, 15)), window=3):
                        for sid in ids:
                            outputs[sid].append(result[sid])
                    victim = replicas[0]
                    victim_sessions = metric_value(victim.metrics_port, "lstm_sessions_active")
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(30)
                    store.client().execute_command("CLIENT", "UNPAUSE")
                    for result in client.stream_batches(map(batch, range(15, rounds)), window=3):
                        for sid in ids:
                            outputs[sid].append(result[sid])
                    resent = sum(
                        ledger.resent_steps for ledger in client.batches.book.ledgers.values()
                    )
                    loads_after = counts(replicas[1:], "lstm_state_store_loads_total")
        finally:
            for r in replicas:
                r.__exit__()
    assert sum(created) == sessions and all(c > 0 for c in created), created
    assert loads_before == [0] * REPLICAS  # no session moved while every replica lived
    assert victim_sessions > 0
    assert sum(loads_after) == victim_sessions, (loads_after, victim_sessions)
    assert resent > 0  # answered, unstored steps of the killed replica were applied again
    for i, sid in enumerate(ids):
        got = np.concatenate(outputs[sid])
        assert got.shape == (rounds * 2, 4)  # none lost, none repeated
        assert_equals_offline(got, regression_model, inputs[i])
