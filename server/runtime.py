"""The service's core, as the frontends see it: the one object server/service.py, server/oip.py
and server/app.py hold, and the verbs they call. It wires the parts and delegates: sessions'
lifecycle to server/lifecycle.py, a chunk's path (plan, run, commit) to server/steps.py, moving
a session's state to server/moves.py, model versions to server/rollout.py and server/models.py,
durable sessions to server/state_store.py. docs/architecture.md draws the whole.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from server import metrics, steps
from server.config import ServerConfig
from server.errors import ServiceError, SessionNotFound
from server.lifecycle import SessionLifecycle
from server.models import Models, ModelVersion
from server.rollout import Rollout
from server.security import RateLimiter
from server.sessions import Session
from server.state_store import StateStore
from server.transfer import SessionRecord


class Runtime:
    def __init__(self, config: ServerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.rate_limiter = RateLimiter(config.rate_limit_steps_per_s)
        self.store = (
            StateStore(
                config.state_store,
                config.session_idle_timeout_s,
                config.replay_steps,
                lambda sessions: self.lifecycle.read_states(sessions),
                lambda: self.lifecycle.sessions,
                config.state_store_interval_ms / 1000,
            )
            if config.state_store
            else None
        )
        self.models = Models(default_name=config.default_model)
        self.rollout = Rollout(config, device, self.models, self.store)
        self.lifecycle = SessionLifecycle(config, self.models, self.rollout, self.store)
        self.sessions = self.lifecycle.sessions
        self.moves = self.lifecycle.moves
        # The session verbs are the lifecycle's own (server/lifecycle.py).
        self.open_session = self.lifecycle.open_session
        self.get_session = self.lifecycle.get_session
        self.close_session = self.lifecycle.close_session
        self.delete_session = self.lifecycle.delete_session
        self.attach = self.lifecycle.attach
        self.end_stream = self.lifecycle.end_stream
        self.expire_idle = self.lifecycle.expire_idle
        self.refuse_if_draining = self.lifecycle.refuse_if_draining

    # What the frontends (server/service.py, server/oip.py, server/app.py) call: they reach no
    # part of the core but through these and the session verbs below.

    @property
    def durable(self) -> bool:
        """Sessions are written to a state store (--state-store)."""
        return self.store is not None

    @property
    def default_model(self) -> str:
        return self.models.default_name

    def resolve(
        self, model_name: str = "", model_version: int = 0, new_work: bool = True
    ) -> ModelVersion:
        """The loaded version a request names (DESIGN 1.8); new_work: it must take new
        sessions (a draining one only feeds its own)."""
        return self.models.resolve(model_name, model_version, new_work=new_work)

    def catalog(self) -> Models:
        """Every version, loaded, loading or failed (ListModels, the OIP repository index)."""
        return self.models

    def held(self, session_id: str, principal: str = "") -> Session | None:
        """The session if this replica holds it (no store look-up)."""
        try:
            return self.sessions.get(session_id, principal)
        except SessionNotFound:
            return None

    async def export_session(self, session_id: str, principal: str = "") -> bytes:
        return await self.moves.export_session(session_id, principal)

    async def import_session(
        self, data: bytes, session_id: str = "", principal: str = ""
    ) -> Session:
        return await self.moves.import_session(data, session_id, principal)

    def check_placeable(self, record: SessionRecord) -> None:
        """Refuse a snapshot's session unless its version is loaded here, with its very model
        (ModelNotFound, ModelMismatch)."""
        self.moves.place(record, "snapshot")

    async def restore(self, records: list[SessionRecord]) -> list[Session]:
        """A snapshot's sessions, back with their state."""
        return await self.moves.restore(records)

    async def records(self) -> list[SessionRecord]:
        """Every session's whole state (a snapshot); call when no chunk is in flight."""
        return await self.moves.records()

    def reload_repository(self) -> None:
        """SIGHUP: read the model repository again."""
        self.rollout.request_reload()

    async def load_models(self) -> None:
        """Load the repository (or --model); refuses to start when nothing loads."""
        await self.rollout.load_initial()

    async def start(self) -> None:
        if self.store is not None:
            await self.store.start()
        self.rollout.start()
        self.lifecycle.start()

    async def drain(self) -> None:
        """Refuse new work, answer what is in flight, end every stream with UNAVAILABLE."""
        self.lifecycle.drain()
        for model in self.models:
            await model.batcher.wait_idle()

    async def stop(self) -> None:
        await self.lifecycle.stop()
        await self.rollout.stop()
        for model in self.models:
            await model.batcher.stop()
        if self.store is not None:
            await self.store.stop()
        metrics.SESSIONS_CLOSED.labels("shutdown").inc(len(self.sessions))
        for model in self.models:
            model.engine.close()

    @property
    def draining(self) -> bool:
        return self.lifecycle.draining

    # Chunks (server/steps.py)

    async def step(self, item: steps.ChunkRequest) -> steps.ChunkRequest:
        """Apply a stream's chunk (item.session, item.stream) exactly once; the item, answered:
        outputs (T, O) from step `first`."""
        return await steps.step_one(self, item)

    async def queue_step(self, item: steps.ChunkRequest) -> steps.QueuedChunk:
        """Plan and queue one chunk of a session the caller holds (item.session); awaiting
        what this returns gives the item, answered. A request stream plans its next message
        while this one runs."""
        return await steps.queue_one(self, item)

    async def step_batch(
        self,
        chunks: list[steps.ChunkRequest | ServiceError],
        principal: str = "",
        create_missing: bool = False,
        model: ModelVersion | None = None,
    ) -> list[steps.Outcome]:
        """Many sessions' chunks at once (StepBatch): each one's answer or refusal, in order.
        `model`: the version the inputs were decoded for and create_missing creates on."""
        return await asyncio.shield(
            await self.start_batch(chunks, principal, create_missing, model)
        )

    async def start_batch(
        self,
        chunks: list[steps.ChunkRequest | ServiceError],
        principal: str = "",
        create_missing: bool = False,
        model: ModelVersion | None = None,
    ) -> asyncio.Future[list[steps.Outcome]]:
        """Queue a batch message's chunks (StreamBatches); a future of their outcomes."""
        target = model or self.models.resolve()
        return await steps.start_batch(self, chunks, principal, create_missing, target)

    async def predict(self, inputs: np.ndarray, model: ModelVersion, principal: str) -> np.ndarray:
        """A stateless run of `inputs` (T, I) from zero state; no session."""
        return await steps.predict(self, inputs, model, principal)
