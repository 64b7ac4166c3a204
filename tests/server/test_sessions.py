"""The step rule, the replay buffer and the batcher, without gRPC."""

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from server.batcher import Batcher, Row
from server.engine import StepOutputs, StepWork
from server.errors import SessionCapacity, SessionExists, StepOutOfOrder
from server.sessions import ReplayBuffer, ReplayPool, Session, SessionTable, plan_chunk
from server.state_pool import StatePool
from server.steps import Commit


def make_pool(capacity: int = 4) -> StatePool:
    return StatePool(1, 3, capacity, torch.device("cpu"), torch.float32)


def outputs(start: int, count: int) -> np.ndarray:
    return np.arange(start, start + count, dtype=np.float32).reshape(count, 1)  # (T, 1)


def make_session(next_step: int = 0, replay_steps: int = 8) -> Session:
    session = Session("s", 0, ReplayBuffer(replay_steps))
    if next_step:
        session.commit(0, outputs(0, next_step))
    return session


def test_replay_buffer_keeps_exactly_the_last_n_steps():
    buffer = ReplayBuffer(5)
    buffer.append(0, outputs(0, 3))
    buffer.append(3, outputs(3, 4))
    assert len(buffer) == 5
    assert buffer.first_step(7) == 2
    np.testing.assert_array_equal(buffer.read(2, 7, 1).ravel(), [2, 3, 4, 5, 6])
    buffer.append(7, outputs(7, 20))  # a chunk longer than the buffer
    np.testing.assert_array_equal(buffer.read(22, 27, 1).ravel(), [22, 23, 24, 25, 26])


@pytest.mark.parametrize(
    ("start_step", "count", "replayed", "new_start", "new_count"),
    [
        (None, 3, [], 6, 3),  # append
        (6, 3, [], 6, 3),  # exactly next
        (4, 2, [4, 5], 6, 0),  # all replayed
        (4, 5, [4, 5], 6, 3),  # overlap: 2 replayed, 3 new
    ],
)
def test_plan_chunk_applies_each_step_once(start_step, count, replayed, new_start, new_count):
    plan = plan_chunk(make_session(6), start_step, np.zeros((count, 2)), False, 1)
    assert plan.replayed.ravel().tolist() == replayed
    assert (plan.new_start, len(plan.new)) == (new_start, new_count)


def test_plan_chunk_refuses_gaps_and_steps_the_buffer_no_longer_holds():
    session = make_session(20, replay_steps=8)
    with pytest.raises(StepOutOfOrder) as gap:
        plan_chunk(session, 21, np.zeros((1, 2)), False, 1)
    assert gap.value.metadata == {"expected_step": "20"}
    with pytest.raises(StepOutOfOrder, match="expected at least 12"):
        plan_chunk(session, 11, np.zeros((2, 2)), False, 1)


def test_a_resent_reset_is_not_applied_again():
    session = make_session(6)
    assert plan_chunk(session, 6, np.zeros((1, 2)), True, 1).reset
    assert not plan_chunk(session, 5, np.zeros((2, 2)), True, 1).reset


@dataclass
class Placement:
    """A model version's place for sessions, as SessionTable sees it: a pool, own rings."""

    pool: StatePool = field(default_factory=make_pool)
    replay: int = 4
    sessions: int = 0

    def count_sessions(self, delta: int) -> None:
        self.sessions += delta


def test_table_capacity_and_duplicate_ids():
    async def run():
        table, place = SessionTable(capacity=2), Placement(make_pool(2))
        a = table.create(place, "a")
        table.create(place)
        with pytest.raises(SessionExists):
            table.create(place, "a")
        with pytest.raises(SessionCapacity):
            table.create(place)
        table.remove(a)
        table.release_slot(a)
        assert place.sessions == 1  # the closed one's slot is back in its own pool
        assert table.create(place, "c").slot == a.slot
        other = Placement(make_pool(2))  # another version: its own pool, the same capacity
        with pytest.raises(SessionCapacity):
            table.create(other)
        table.remove(a := table.get("c"))
        table.release_slot(a)
        assert table.create(other, "d").model is other and other.sessions == 1

    asyncio.run(run())


class FailingEngine:
    def __init__(self) -> None:
        self.batches = []

    async def call(self, fn, *args):
        return fn(*args)

    def step(self, batch):
        self.batches.append([w.slot for w in batch])
        raise RuntimeError("device lost")


class RecordingEngine(FailingEngine):
    def step(self, batch):
        self.batches.append([w.slot for w in batch])
        return StepOutputs([np.zeros((len(w.inputs), 1), dtype=np.float32) for w in batch])


def test_a_failed_batch_fails_every_future_and_moves_no_session():
    async def run():
        engine = FailingEngine()
        batcher = Batcher(engine, Commit(), max_batch_size=8, max_batch_delay_us=0)
        sessions = [Session(str(i), i, ReplayBuffer(4)) for i in range(3)]
        futures = []
        for s in sessions:
            await s.lock.acquire()
            futures.append(batcher.submit([Row(s, StepWork(s.slot, np.zeros((2, 1))), 0)]))
        batcher.start()
        results = [result for (result,) in await asyncio.gather(*futures)]
        await batcher.stop()
        assert all(isinstance(r, RuntimeError) for r in results)
        assert [s.next_step for s in sessions] == [0, 0, 0]
        assert not any(s.lock.locked() for s in sessions)
        assert engine.batches == [[0, 1, 2]]

    asyncio.run(run())


def test_batches_are_bounded_by_max_batch_size_oldest_first():
    async def run():
        engine = RecordingEngine()
        batcher = Batcher(engine, Commit(), max_batch_size=3, max_batch_delay_us=0)
        sessions = [Session(str(i), i, ReplayBuffer(4)) for i in range(5)]
        futures = []
        for s in sessions:
            await s.lock.acquire()  # as the plan does (server/steps.py); the commit releases it
            futures.append(batcher.submit([Row(s, StepWork(s.slot, np.zeros((1, 1))), 0)]))
        batcher.start()
        await asyncio.gather(*futures)
        await batcher.stop()
        assert engine.batches == [[0, 1, 2], [3, 4]]
        assert [s.next_step for s in sessions] == [1] * 5
        assert not any(s.lock.locked() for s in sessions)

    asyncio.run(run())


def test_an_entry_larger_than_a_batch_is_split_in_order_and_answered_once():
    """A batch message's rows share one entry: split across batches only past
    --max-batch-size, the next entry's rows fill the room left, one future for all."""

    async def run():
        engine = RecordingEngine()
        batcher = Batcher(engine, Commit(), max_batch_size=3, max_batch_delay_us=0)
        sessions = [Session(str(i), i, ReplayBuffer(4)) for i in range(6)]
        for s in sessions:
            await s.lock.acquire()
        rows = [Row(s, StepWork(s.slot, np.zeros((1, 1))), 0) for s in sessions[:5]]
        many = batcher.submit(rows)
        one = batcher.submit([Row(sessions[5], StepWork(5, np.zeros((2, 1))), 0)])
        batcher.start()
        results, (single,) = await asyncio.gather(many, one)
        await batcher.stop()
        assert engine.batches == [[0, 1, 2], [3, 4, 5]]
        assert [r.shape for r in results] == [(1, 1)] * 5 and single.shape == (2, 1)
        assert [s.next_step for s in sessions] == [1, 1, 1, 1, 1, 2]
        assert not any(s.lock.locked() for s in sessions)

    asyncio.run(run())


def test_idle_since_finds_every_idle_session_oldest_first(monkeypatch):
    """Sessions touched later move behind the idle ones, however they were created."""
    clock = [100.0]
    monkeypatch.setattr("server.sessions.time.monotonic", lambda: clock[0])
    table, place = SessionTable(capacity=6), Placement(make_pool(capacity=6))
    for name in "abcdef":  # created and stepped one second apart: a at 100 ... f at 105
        table.touch(table.create(place, name))
        clock[0] += 1
    for name in "ace":  # active again at 110, 111, 112
        clock[0] = 110 + "ace".index(name)
        table.touch(table.get(name))
    assert [s.session_id for s in table.idle_since(106.0)] == ["b", "d", "f"]
    assert [s.session_id for s in table.idle_since(111.5)] == ["b", "d", "f", "a", "c"]
    assert table.idle_since(100.0) == []


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_a_batch_written_to_the_replay_pool_reads_back_as_appended_one_by_one(steps):
    """The batch-wide write (one fancy index for every row) holds what per-session appends
    would: rows starting anywhere in the ring, chunks that wrap, and one longer than the ring."""
    ring, rng = 5, np.random.default_rng(steps)
    pool = ReplayPool(capacity=4, steps=ring, output_size=2)
    pooled = [pool.buffer(slot) for slot in range(4)]
    alone = [ReplayBuffer(ring) for _ in range(4)]
    next_steps = [0, 3, 4, 9]
    for b, start in enumerate(next_steps):  # give each some history first
        history = rng.standard_normal((start, 2), dtype=np.float32)
        pooled[b].append(0, history)
        alone[b].append(0, history)
    batch = rng.standard_normal((4, steps, 2), dtype=np.float32)  # (B, T, O)
    pool.write([0, 1, 2, 3], next_steps, batch)
    for b, start in enumerate(next_steps):
        pooled[b].advance(steps)
        alone[b].append(start, batch[b])
        end = start + steps
        first = alone[b].first_step(end)
        assert pooled[b].first_step(end) == first
        np.testing.assert_array_equal(pooled[b].read(first, end, 2), alone[b].read(first, end, 2))
