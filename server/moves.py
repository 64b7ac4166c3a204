"""Moving sessions: a session's whole state as a record (ExportSession, snapshots, the state
store's loads), and records placed back as sessions on the model version they were stepped
with, never on another."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from server import transfer
from server.errors import ModelMismatch, ModelNotFound, ServiceError, SessionNotFound
from server.models import ModelVersion, VersionKey
from server.sessions import Session

if TYPE_CHECKING:
    from server.lifecycle import SessionLifecycle


class SessionMoves:
    def __init__(self, lifecycle: SessionLifecycle) -> None:
        self._lifecycle = lifecycle

    async def export_session(self, session_id: str, principal: str = "") -> bytes:
        session = await self._lifecycle.get_session(session_id, principal)
        async with session.lock:
            if session.closed:
                raise SessionNotFound(session_id)
            model: ModelVersion = session.model
            state = await model.engine.call(model.pool.read, [session.slot])  # (1, L, H) each
            return transfer.encode(self.record(session, tuple(t[0] for t in state)))

    async def import_session(
        self, data: bytes, session_id: str = "", principal: str = ""
    ) -> Session:
        record = transfer.decode(data)
        await self.place_loading(record, "state")
        if self._lifecycle.store is not None:  # an id live on another replica is taken
            await self._lifecycle.refuse_if_stored(session_id or record.session_id, principal)
        (session,) = await self.restore([record], session_id, principal)
        if self._lifecycle.store is not None:
            # A new incarnation: the store orders writes by create time, and an export of
            # a session that then ended must not be refused as that session's late write.
            session.create_time = time.time()
            self._lifecycle.store.stage(session)
        return session

    async def place_loading(self, record: transfer.SessionRecord, what: str) -> ModelVersion:
        """The loaded version a record's session lives on (loading it from the repository if
        it is there but not loaded yet); checked against the record."""
        if self.place(record, what, missing_ok=True) is None:
            await self._lifecycle.rollout.reload()
        placed = self.place(record, what)
        assert placed is not None
        return placed

    def place(
        self, record: transfer.SessionRecord, what: str, missing_ok: bool = False
    ) -> ModelVersion | None:
        """The version a record names, or (a record from before versions) the one with its
        fingerprint: refused unless it runs the very model the session was stepped with."""
        models = self._lifecycle.models
        if record.model:
            model = models.get(VersionKey(record.model, record.model_version))
            named = f"model {record.model} v{record.model_version}"
        else:
            model = models.with_fingerprint(record.fingerprint)
            named = f"model {record.fingerprint[:12]}"
        if model is None and missing_ok:
            return None
        if model is None and not record.model:
            raise ModelMismatch(
                f"{what}: from model {record.fingerprint[:12]}, this server runs "
                f"{', '.join(f'{v.key} {v.fingerprint[:12]}' for v in models)}; a session moves "
                "only between equal models"
            )
        if model is None:
            raise ModelNotFound(
                f"{what}: the session lives on {named}, which this server does not hold "
                f"(it holds {', '.join(str(v.key) for v in models) or 'nothing'})"
            )
        if record.fingerprint != model.fingerprint:
            raise ModelMismatch(
                f"{what}: from {named} {record.fingerprint[:12]}, this server runs "
                f"{model.key} {model.fingerprint[:12]}; a session moves only between equal models"
            )
        config = model.config
        transfer.validate(
            record, config.num_layers, config.hidden_size, config.output_size, config.state_names
        )
        return model

    async def restore(
        self,
        records: list[transfer.SessionRecord],
        session_id: str = "",
        principal: str | None = None,
    ) -> list[Session]:
        """Sessions from records (an import: owned by `principal`; a snapshot: by their own),
        state written to their slots."""
        sessions: list[Session] = []
        try:
            for r in records:
                owner = r.principal if principal is None else principal
                model = self.place(r, "state")
                assert model is not None
                sessions.append(
                    self._lifecycle.create_session(model, session_id or r.session_id, owner)
                )
        except ServiceError:
            for session in sessions:  # all or nothing
                await self._lifecycle.close_session(session, "deleted")
            raise
        # The sessions are in the table already: from here to the state writes' hand-over
        # nothing awaits, so no one sees them half made (at step 0, a new create time), and any
        # work for them handed to an engine later (a step, a read) runs after their write.
        for session, record in zip(sessions, records, strict=True):
            replay = record.replay.numpy()
            session.commit(record.next_step - len(replay), replay)
            session.create_time = record.create_time
        writes = []
        for model, indices in group_by_model(sessions).items():
            state = tuple(
                torch.stack([records[i].state[name] for i in indices], dim=1)  # (L, N, H)
                for name in model.config.state_names
            )
            slots = [sessions[i].slot for i in indices]
            writes.append(model.engine.submit(model.pool.write, slots, state))
        await asyncio.gather(*writes)
        return sessions

    async def records(self) -> list[transfer.SessionRecord]:
        """Every session's whole state (for a snapshot); call when no chunk is in flight."""
        sessions = list(self._lifecycle.sessions)
        states = await self._lifecycle.read_states(sessions)
        return [
            self.record(s, tuple(torch.from_numpy(t) for t in state))
            for s, state in zip(sessions, states, strict=True)
        ]

    def record(self, session: Session, state: tuple[torch.Tensor, ...]) -> transfer.SessionRecord:
        """The session's record, `state` its state tensors (L, H) in the model's order."""
        model: ModelVersion = session.model
        replay_start = session.replay.first_step(session.next_step)
        replay = session.replay.read(replay_start, session.next_step, model.config.output_size)
        return transfer.SessionRecord(
            session_id=session.session_id,
            next_step=session.next_step,
            state=dict(zip(model.config.state_names, state, strict=True)),
            replay=torch.from_numpy(np.ascontiguousarray(replay)),
            fingerprint=model.fingerprint,
            create_time=session.create_time,
            principal=session.principal,
            model=model.key.name,
            model_version=model.key.version,
        )


def group_by_model(sessions: list[Session]) -> dict[ModelVersion, list[int]]:
    """Sessions' positions by the version they live on, in order."""
    groups: dict[ModelVersion, list[int]] = {}
    for i, session in enumerate(sessions):
        groups.setdefault(session.model, []).append(i)
    return groups
