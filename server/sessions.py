"""Sessions: the table from id to slot, step index, replay buffer, owner and timestamps.

The step rule (exactly once): a chunk names the step index of its first timestep. Steps the
session has already applied are answered from its replay buffer and not applied again; a chunk
that starts past the session's next step is a gap and is refused.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from server import metrics
from server.errors import (
    ServiceError,
    SessionCapacity,
    SessionExists,
    SessionNotFound,
    SessionQuota,
    StepOutOfOrder,
)
from server.state_pool import SlotsExhausted, StatePool

if TYPE_CHECKING:
    from server.models import ModelVersion


class ReplayBuffer:
    """The outputs of a session's last `capacity` steps, in a ring: its row of a ReplayPool, or
    (standing alone) an array allocated at first use."""

    __slots__ = ("_ring", "_steps", "capacity")

    def __init__(self, capacity: int, ring: np.ndarray | None = None) -> None:
        self.capacity = capacity
        self._ring = ring  # (capacity, O): step s lives at row s % capacity
        self._steps = 0  # steps held, at most capacity

    def __len__(self) -> int:
        return self._steps

    def append(self, start: int, outputs: np.ndarray) -> None:
        """Record the outputs of steps start .. start + len(outputs) - 1, which follow on from
        what the buffer holds."""
        count = len(outputs)
        if not count:
            return
        if self._ring is None:
            self._ring = np.zeros((self.capacity, outputs.shape[1]), dtype=np.float32)
        if count > self.capacity:
            start, outputs = start + count - self.capacity, outputs[-self.capacity :]
            count = self.capacity
        first = start % self.capacity
        if first + count <= self.capacity:
            self._ring[first : first + count] = outputs
        else:
            split = self.capacity - first
            self._ring[first:] = outputs[:split]
            self._ring[: count - split] = outputs[split:]
        self.advance(count)

    def advance(self, count: int) -> None:
        """`count` more steps were written to the ring (by append, or by the pool for a whole
        batch at once)."""
        self._steps = min(self._steps + count, self.capacity)

    def first_step(self, next_step: int) -> int:
        return next_step - self._steps

    def read(self, start: int, end: int, output_size: int) -> np.ndarray:
        """Outputs of steps [start, end), which must all be held: (end - start, O)."""
        if end <= start or self._ring is None:
            return np.zeros((0, output_size), dtype=np.float32)
        first, stop = start % self.capacity, start % self.capacity + (end - start)
        if stop <= self.capacity:
            return self._ring[first:stop].copy()
        return np.concatenate((self._ring[first:], self._ring[: stop - self.capacity]))


class ReplayPool:
    """Every session's replay ring in one array, by slot, so a batch's outputs are recorded in
    one write rather than one per session. The array is allocated zeroed and untouched: the
    operating system commits a session's pages only when its outputs first land there."""

    def __init__(self, capacity: int, steps: int, output_size: int) -> None:
        self.steps = steps
        self._rings = np.zeros((capacity, steps, output_size), dtype=np.float32)  # (N, R, O)

    def free(self) -> None:
        """Give the rings' memory back (the model version is unloaded)."""
        self._rings = self._rings[:0].copy()

    def buffer(self, slot: int) -> ReplayBuffer:
        """The slot's ring, holding nothing yet (a reused slot's old rows are unreachable)."""
        return ReplayBuffer(self.steps, self._rings[slot])

    def write(self, slots: list[int], starts: list[int], outputs: np.ndarray) -> None:
        """Record a batch whose rows all ran T steps: row b's steps starts[b] .. + T - 1, from
        outputs (B, T, O). Each row's ReplayBuffer must then advance(T)."""
        kept = min(outputs.shape[1], self.steps)  # a chunk longer than the ring keeps its tail
        first = np.asarray(starts) + (outputs.shape[1] - kept)  # (B,)
        if kept == 1:
            self._rings[slots, first % self.steps] = outputs[:, -1]
            return
        columns = (first[:, None] + np.arange(kept)) % self.steps  # (B, kept)
        self._rings[np.asarray(slots)[:, None], columns] = outputs[:, -kept:]


class Placement(Protocol):
    """Where sessions' state lives: a model version's state pool and replay rings
    (server/models.py ModelVersion), with the count of sessions holding slots there."""

    pool: StatePool
    replay: ReplayPool | int  # a pool, or a ring size for sessions with rings of their own

    def count_sessions(self, delta: int) -> None: ...


class Attachment:
    """One stream feeding a session. A takeover, delete, expiry or shutdown interrupts it: at
    once when it is waiting for its next message, after its response when it is mid-message."""

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self.session: Session | None = None
        self.busy = False
        self.interruption: ServiceError | None = None

    def interrupt(self, error: ServiceError) -> None:
        if self.interruption is not None:
            return
        self.interruption = error
        if not self.busy and self._task is not None:
            self._task.cancel()


@dataclass(eq=False, slots=True)  # slots: 100,000 idle sessions must stay small
class Session:
    session_id: str
    slot: int
    replay: ReplayBuffer
    model: ModelVersion = None  # type: ignore[assignment]  # whose pool holds its slot, for life
    principal: str = ""  # who created it; only they can see it
    next_step: int = 0
    durable_step: int = 0  # the state store holds the session up to here (--state-store)
    answered_step: int = 0  # the client says it has every output before this step
    meta_stored: bool = False  # the state store holds this session's meta: write updates only
    store_key: str = ""  # its key in the state store, once staged
    create_time: float = field(default_factory=time.time)
    last_active_time: float = field(default_factory=time.time)
    last_active_monotonic: float = field(default_factory=time.monotonic)
    owner: Attachment | None = None  # the stream feeding it, if any
    closed: bool = False
    # A batch chunk with end_session is planned: done once the session is closed (or the chunk
    # failed). A later message naming the id waits for it, and then meets what follows the end.
    ending: asyncio.Future[None] | None = None
    # Held from the moment a chunk is planned until it is committed, both in server/steps.py:
    # one chunk of a session is in flight at a time, and a close or an export waits for it.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def touch(self) -> None:
        self.last_active_time = time.time()
        self.last_active_monotonic = time.monotonic()

    def note_answered(self, step: int) -> None:
        """The client has received every output before `step`: a stored record need not keep
        them (server/state_store.py)."""
        if step > self.answered_step:
            self.answered_step = step

    def commit(self, start: int, outputs: np.ndarray, recorded: bool = False) -> None:
        """Record a chunk the engine applied (called by the batcher when the batch completes);
        `recorded`: the ReplayPool already holds its outputs."""
        if recorded:
            self.replay.advance(len(outputs))
        else:
            self.replay.append(start, outputs)
        self.next_step = start + len(outputs)


NO_OUTPUTS = np.zeros((0, 0), dtype=np.float32)


@dataclass(slots=True)
class ChunkPlan:
    """What to do with a chunk: answer `replayed` from the buffer, apply `new` from `new_start`."""

    replayed: np.ndarray  # (R, O) outputs of steps already applied
    new: np.ndarray  # (N, I) inputs to apply now
    new_start: int
    reset: bool


def plan_chunk(
    session: Session, start_step: int | None, inputs: np.ndarray, reset: bool, output_size: int
) -> ChunkPlan:
    next_step = session.next_step
    if start_step is None or start_step == next_step:  # the usual: nothing to replay
        return ChunkPlan(NO_OUTPUTS, inputs, next_step, reset)
    start = start_step
    if start > next_step:
        raise StepOutOfOrder(
            f"start_step: expected at most the session's next step {next_step}, got {start} "
            f"(a gap of {start - next_step} timesteps)",
            expected_step=next_step,
        )
    already = min(next_step - start, len(inputs))
    oldest = session.replay.first_step(next_step)
    if already and start < oldest:
        raise StepOutOfOrder(
            f"start_step: expected at least {oldest} (the oldest step whose output this "
            f"server holds) or the next step {next_step}, got {start}",
            expected_step=next_step,
            oldest_step=oldest,
        )
    replayed = session.replay.read(start, start + already, output_size) if already else NO_OUTPUTS
    # A resent message's reset was applied when it first arrived.
    return ChunkPlan(replayed, inputs[already:], start + already, reset and start == next_step)


class SessionTable:
    """Live sessions of every model version, at most `capacity`, least recently active first.
    Sessions are keyed by (principal, id): another principal's session is indistinguishable
    from none, and an id is one session whichever version it lives on."""

    def __init__(self, capacity: int, per_principal: int = 0) -> None:
        self.capacity = capacity
        self._per_principal = per_principal
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self._counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def create(self, placement: Placement, session_id: str = "", principal: str = "") -> Session:
        session_id = session_id or secrets.token_urlsafe(16)  # 128 random bits
        if (principal, session_id) in self._sessions:
            raise SessionExists(session_id)
        if self._per_principal and self._counts[principal] >= self._per_principal:
            raise SessionQuota(self._per_principal)
        if len(self._sessions) >= self.capacity:
            raise SessionCapacity(self.capacity)
        try:
            slot = placement.pool.allocate()
        except SlotsExhausted:  # slots not yet released by sessions closing now
            raise SessionCapacity(self.capacity) from None
        rings = placement.replay
        replay = rings.buffer(slot) if isinstance(rings, ReplayPool) else ReplayBuffer(rings)
        session = Session(session_id, slot, replay, placement, principal)
        self._sessions[principal, session_id] = session
        self._counts[principal] += 1
        placement.count_sessions(1)
        metrics.SESSIONS_ACTIVE.set(len(self._sessions))
        return session

    def get(self, session_id: str, principal: str = "") -> Session:
        session = self._sessions.get((principal, session_id))
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def touch(self, session: Session) -> None:
        session.touch()
        self._sessions.move_to_end((session.principal, session.session_id))

    def remove(self, session: Session) -> int:
        """Remove a session from the table; its slot must be zeroed, then release_slot'ed."""
        session.closed = True
        del self._sessions[session.principal, session.session_id]
        self._counts[session.principal] -= 1
        metrics.SESSIONS_ACTIVE.set(len(self._sessions))
        return session.slot

    def release_slot(self, session: Session) -> None:
        """The closed session's slot is zeroed: give it back to its version's pool."""
        session.model.pool.release(session.slot)
        session.model.count_sessions(-1)

    def idle_since(self, deadline: float) -> list[Session]:
        """Sessions last active before `deadline` (monotonic), oldest first."""
        idle = []
        for session in self._sessions.values():
            if session.last_active_monotonic >= deadline:
                break
            idle.append(session)
        return idle
