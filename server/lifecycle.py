"""Sessions' lifecycle: create one, find one (held here, or loaded from the state store), feed
it from a stream (attach, takeover), close it (end, delete, expiry), and the sweeper that
expires idle ones. What a session's chunks do is server/steps.py's; moving a session's state
(export, import, snapshots, store loads) server/moves.py's.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from server import metrics
from server.config import ServerConfig
from server.errors import (
    BadInput,
    ModelNotFound,
    SessionExists,
    SessionNotFound,
    SessionTakenOver,
    ShuttingDown,
    StoreUnavailable,
)
from server.models import Models, ModelVersion, VersionKey
from server.moves import SessionMoves, group_by_model
from server.rollout import Rollout
from server.sessions import Attachment, Session, SessionTable
from server.state_store import StateStore

log = logging.getLogger(__name__)


def short_id(session_id: str) -> str:
    """Session ids are bearer secrets: logs show a prefix only."""
    return session_id[:6] + "…"


class SessionLifecycle:
    def __init__(
        self, config: ServerConfig, models: Models, rollout: Rollout, store: StateStore | None
    ) -> None:
        self.config = config
        self.models = models
        self.rollout = rollout
        self.store = store
        self.sessions = SessionTable(config.max_sessions, config.max_sessions_per_principal)
        self.moves = SessionMoves(self)
        self.draining = False  # shutting down: new work refused
        self._loading: dict[tuple[str, str], asyncio.Future[Session]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="sweeper")

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        # Loads from the store nobody waits for any more must not outlive the engine.
        await asyncio.gather(*self._loading.values(), return_exceptions=True)

    def drain(self) -> None:
        """Refuse new work; interrupt every stream (it ends with UNAVAILABLE)."""
        self.draining = True
        for session in self.sessions:
            if isinstance(session.owner, Attachment):
                session.owner.interrupt(ShuttingDown())

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ShuttingDown()

    def create_session(
        self, model: ModelVersion, session_id: str = "", principal: str = ""
    ) -> Session:
        self.refuse_if_draining()
        if not self.models.holds(model):  # unloaded while the caller awaited something
            raise ModelNotFound(f"model {model.key} was unloaded (it left the repository)")
        session = self.sessions.create(model, session_id, principal)
        log.info(
            "session %s created on %s (slot %d)",
            short_id(session.session_id),
            model.key,
            session.slot,
        )
        return session

    async def open_session(
        self,
        session_id: str = "",
        principal: str = "",
        model_name: str = "",
        model_version: int = 0,
    ) -> Session:
        """CreateSession: a new session on the named model version (default: the default
        model's newest), which (with a state store) no replica holds yet."""
        self.refuse_if_draining()
        # An unknown model is refused before the store's answer.
        self.models.resolve(model_name, model_version)
        if session_id and self.store is not None:
            await self.refuse_if_stored(session_id, principal)
        # Resolved after the await: a rollout may have moved the newest version meanwhile.
        session = self.create_session(
            self.models.resolve(model_name, model_version), session_id, principal
        )
        if self.store is not None:  # so another replica can continue it before its first step
            self.store.stage(session)
        return session

    async def refuse_if_stored(self, session_id: str, principal: str) -> None:
        assert self.store is not None
        try:
            stored = await self.store.holds(session_id, principal)
        except StoreUnavailable:
            stored = False  # serve from memory: a client-chosen id is random anyway
        if stored:
            raise SessionExists(session_id)

    async def get_session(self, session_id: str, principal: str = "") -> Session:
        """A session this replica holds or, with a state store, loads from there. A held one
        the store has newer state for (it was served by another replica meanwhile) is replaced."""
        try:
            held: Session | None = self.sessions.get(session_id, principal)
        except SessionNotFound:
            if self.store is None:
                raise
            held = None
        if self.store is None:
            assert held is not None
            return held
        key = (principal, session_id)
        loading = self._loading.get(key)
        if loading is None:  # one load per session at a time; later callers share it
            loading = asyncio.ensure_future(self._load(session_id, principal, held))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(loading)

    async def _load(self, session_id: str, principal: str, held: Session | None) -> Session:
        assert self.store is not None
        if held is None and self.store.ending(session_id, principal):
            raise SessionNotFound(session_id)  # ended here; the store has not heard yet
        try:
            newer_than = -1 if held is None else held.next_step
            record = await self.store.load(session_id, principal, newer_than)
        except StoreUnavailable:
            if held is None:
                raise
            return held  # serve from memory
        if record is None:
            if held is None:
                raise SessionNotFound(session_id)
            return held
        model = await self.moves.place_loading(record, "stored state")
        # Pinned: closing the held copy must not unload the version the session moves to.
        with self.rollout.pinned(model):
            if held is not None:
                await self.close_session(held, "superseded")
            (session,) = await self.moves.restore([record], session_id, principal)
        session.durable_step = record.next_step
        metrics.STATE_STORE_LOADS.inc()
        log.info(
            "session %s loaded from the state store at step %d",
            short_id(session_id),
            record.next_step,
        )
        return session

    async def read_states(self, sessions: list[Session]) -> list[tuple[np.ndarray, ...]]:
        """Each session's state tensors (its model's state_names: h and c, or h), (L, H) each,
        read on its version's engine thread after every batch already handed to it; the batcher
        has committed those batches by the time this await returns, so each session's next_step
        agrees with the state read. A closed session's is empty."""
        states: list[tuple[np.ndarray, ...]] = [()] * len(sessions)
        for model, indices in group_by_model(sessions).items():
            # Checked just before each read (no await in between): an earlier read's await
            # may have let sessions close and their drained version unload.
            live = [i for i in indices if not sessions[i].closed]
            if not live or not self.models.holds(model):
                continue
            state = await model.engine.call(model.pool.read, [sessions[i].slot for i in live])
            rows = [list(tensor.numpy()) for tensor in state]  # N views (L, H) of each tensor
            for i, session_state in zip(live, zip(*rows, strict=True), strict=True):
                states[i] = session_state
        return states

    async def close_session(self, session: Session, reason: str) -> None:
        """Remove a session once its in-flight chunk is committed; zero and free its slot."""
        async with session.lock:
            if session.closed:
                return
            slot = self.sessions.remove(session)
        if isinstance(session.owner, Attachment) and reason != "ended":
            session.owner.interrupt(SessionNotFound(session.session_id))
        if self.store is not None and reason in ("ended", "deleted"):
            # Not on expiry: a replica whose copy went stale must not delete the live record
            # (records expire in the store on their own, with the same idle timeout).
            self.store.forget(session)
        metrics.SESSIONS_CLOSED.labels(reason).inc()
        log.info("session %s closed: %s", short_id(session.session_id), reason)
        # Shielded: a caller cancelled now (a client hanging up) must not leak the slot.
        await asyncio.shield(self._free_slot(session, slot))

    async def _free_slot(self, session: Session, slot: int) -> None:
        model: ModelVersion = session.model
        await model.engine.call(model.pool.zero, [slot])
        self.sessions.release_slot(session)
        self.rollout.unload_if_drained(model)

    async def delete_session(self, session_id: str, principal: str = "") -> None:
        await self.close_session(await self.get_session(session_id, principal), "deleted")

    # Streams

    async def attach(
        self,
        attachment: Attachment,
        session_id: str,
        principal: str = "",
        model_name: str = "",
        model_version: int = 0,
        found: Session | None = None,
    ) -> Session:
        """Feed a new session (empty id) on the named model version, or take over an
        existing one (`found`, when the caller has already looked it up; a model named
        then must be the one it lives on)."""
        self.refuse_if_draining()
        if session_id:
            session = found or await self.get_session(session_id, principal)
            check_lives_on(session, model_name, model_version)
        else:
            session = await self.open_session("", principal, model_name, model_version)
        previous = session.owner
        session.owner = attachment
        attachment.session = session
        if isinstance(previous, Attachment) and previous is not attachment:
            previous.interrupt(SessionTakenOver(session.session_id))
            metrics.SESSIONS_CLOSED.labels("taken_over").inc()
            log.info("session %s taken over by a new stream", short_id(session.session_id))
        return session

    def end_stream(self, attachment: Attachment) -> None:
        """A stream feeding a session is over: the session lives on, fed by none."""
        session = attachment.session
        if session is not None and session.owner is attachment:
            session.owner = None

    # Expiry

    async def _sweep_idle(self) -> None:
        period = min(max(self.config.session_idle_timeout_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            await self.expire_idle(time.monotonic())

    async def expire_idle(self, now: float) -> list[Session]:
        """One pass of the sweeper: close the sessions idle for the timeout as of `now`
        (monotonic); those closed."""
        expired = []
        for session in self.sessions.idle_since(now - self.config.session_idle_timeout_s):
            if not session.lock.locked():  # a chunk in flight is activity
                await self.close_session(session, "expired")
                expired.append(session)
        return expired


def check_lives_on(session: Session, model_name: str, model_version: int) -> None:
    """A stream attaching may name a model, to be sure where the session lives."""
    key: VersionKey = session.model.key
    if (model_name and model_name != key.name) or (model_version and model_version != key.version):
        raise BadInput(
            f"model: session {short_id(session.session_id)} lives on {key}, the message names "
            f"{model_name or key.name} v{model_version or key.version} (a session stays on "
            "its version)"
        )
