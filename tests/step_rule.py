"""The one model of a StreamSteps message's fate (DESIGN 1.1, 1.2) that the tests hold the server
to: the fuzz tests and the stateful test both ask it what a message must get.

The step rule: a message at `start_step` (unset: the session's next step) with `num_steps`
timesteps. A start past the next step is a gap; a message that would replay a step the replay
buffer no longer holds is stale; both are refused STEP_OUT_OF_ORDER with `expected_step` the
next step. Otherwise the steps before the next step are answered from the replay buffer, the rest
are applied, and `reset` applies only when the message starts exactly at the next step (a resent
reset was applied when it first arrived). Before the step rule come the session ids (message and
`x-session-id` metadata must agree and be well formed) and the inputs (a whole number of
timesteps, at most `max_chunk_steps`, all finite): BAD_INPUT. A refused message changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tests.outcomes import BAD, CAPACITY, NOT_FOUND, OK, Outcome, out_of_order

SESSION_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")  # "1-128 characters from A-Z a-z 0-9 . _ ~ -"


@dataclass(frozen=True)
class Limits:
    """The server settings the rule depends on."""

    input_size: int
    max_chunk_steps: int
    replay_steps: int


@dataclass(frozen=True)
class Window:
    """What the rule knows of a session: its next step and the oldest step whose output its
    replay buffer still holds (replay_start == next_step: it holds none)."""

    next_step: int = 0
    replay_start: int = 0

    @classmethod
    def full(cls, next_step: int, replay_steps: int) -> Window:
        """A session fed from step 0: its buffer holds the last `replay_steps` steps."""
        return cls(next_step, max(0, next_step - replay_steps))

    def advanced(self, applied: int, replay_steps: int) -> Window:
        """After `applied` more steps: the buffer keeps the newest `replay_steps`."""
        next_step = self.next_step + applied
        held = min(self.next_step - self.replay_start + applied, replay_steps)
        return Window(next_step, next_step - held)


@dataclass(frozen=True)
class Verdict:
    """What a message gets and does. A refused one replays and applies nothing."""

    outcome: Outcome
    before: Window = field(default_factory=Window)
    replayed: range = range(0)  # steps answered from the replay buffer
    applied: range = range(0)  # steps applied now, after a reset when `reset`
    reset: bool = False
    after: Window = field(default_factory=Window)  # the session once the message is answered

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    @property
    def start_step(self) -> int:
        """The response's start_step: the step of its first output row."""
        return self.replayed.start if self.replayed else self.applied.start

    @property
    def num_steps(self) -> int:
        return len(self.replayed) + len(self.applied)


def refused(outcome: Outcome, window: Window = Window()) -> Verdict:
    return Verdict(outcome, window, after=window)


def step_rule(
    window: Window, start_step: int | None, num_steps: int, reset: bool, replay_steps: int
) -> Verdict:
    """The step rule alone, for a message whose ids and inputs are good."""
    next_step = window.next_step
    start = next_step if start_step is None else start_step
    if start > next_step:
        return refused(out_of_order(next_step), window)
    already = min(next_step - start, num_steps)
    if already and start < window.replay_start:
        return refused(out_of_order(next_step), window)
    applied = range(start + already, start + num_steps)
    return Verdict(
        OK,
        before=window,
        replayed=range(start, start + already),
        applied=applied,
        reset=reset and start == next_step,
        after=window.advanced(len(applied), replay_steps),
    )


def inputs_outcome(values: Sequence[float], limits: Limits) -> Outcome:
    """BAD unless `values` is a whole number of timesteps, not too many, all finite."""
    count = len(values)
    if count % limits.input_size or count // limits.input_size > limits.max_chunk_steps:
        return BAD
    return OK if np.isfinite(np.asarray(values, dtype=np.float32)).all() else BAD


def resolve_id(message_id: str, metadata_id: str | None) -> tuple[Outcome, str]:
    """The id a call names by message and/or `x-session-id` metadata; ('' when neither)."""
    if metadata_id and message_id and metadata_id != message_id:
        return BAD, ""
    session_id = message_id or metadata_id or ""
    if session_id and not SESSION_ID.fullmatch(session_id):
        return BAD, ""
    return OK, session_id


@dataclass(frozen=True)
class Message:
    """The fields of a StreamStepsRequest that decide its fate."""

    values: Sequence[float] = ()
    start_step: int | None = None
    reset: bool = False
    session_id: str = ""

    @classmethod
    def of(cls, request) -> Message:
        """From a lstm_stream.v1.StreamStepsRequest."""
        start = request.start_step if request.HasField("start_step") else None
        return cls(request.inputs, start, request.reset, request.session_id)


def first_message(
    message: Message,
    metadata_id: str | None,
    sessions: Mapping[str, Window],
    limits: Limits,
    room: bool = True,
) -> tuple[str, Verdict]:
    """The first message of a stream: attaches to the session it names, or creates one when it
    names none (`room`: the server has capacity for one more). (session id, verdict); the id
    is '' for a session the server is to create."""
    outcome, session_id = resolve_id(message.session_id, metadata_id)
    window = sessions.get(session_id, Window())
    if outcome == OK:
        outcome = inputs_outcome(message.values, limits)
    if outcome != OK:
        return session_id, refused(outcome, window)
    if session_id and session_id not in sessions:
        return session_id, refused(NOT_FOUND)
    verdict = step_rule(
        window, message.start_step, num_steps(message, limits), message.reset, limits.replay_steps
    )
    if not session_id and verdict.ok and not room:
        return session_id, refused(CAPACITY)  # a new session's numbering is checked first
    return session_id, verdict


def next_message(
    message: Message, stream_session_id: str, window: Window, limits: Limits
) -> Verdict:
    """A later message on a stream attached to `stream_session_id`."""
    if message.session_id and message.session_id != stream_session_id:
        return refused(BAD, window)
    outcome = inputs_outcome(message.values, limits)
    if outcome != OK:
        return refused(outcome, window)
    return step_rule(
        window, message.start_step, num_steps(message, limits), message.reset, limits.replay_steps
    )


def num_steps(message: Message, limits: Limits) -> int:
    return len(message.values) // limits.input_size
