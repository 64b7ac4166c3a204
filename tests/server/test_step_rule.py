"""The tests' model of the step rule (tests/step_rule.py): a table of cases worked out by hand
from DESIGN 1.1 and 1.2, and the server's own plan_chunk held to it over random sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import StepOutOfOrder
from server.sessions import ReplayBuffer, Session, plan_chunk
from tests.outcomes import BAD, CAPACITY, NOT_FOUND, OK, Outcome, out_of_order
from tests.step_rule import Limits, Message, Window, first_message, next_message, step_rule

REPLAY = 8
LIMITS = Limits(input_size=2, max_chunk_steps=4, replay_steps=REPLAY)
AT_20 = Window.full(20, REPLAY)  # next step 20, the buffer holds steps 12-19


@pytest.mark.parametrize(
    ("start_step", "steps", "reset", "outcome", "replayed", "applied", "applies_reset"),
    [
        (None, 3, False, OK, (), (20, 21, 22), False),  # appended
        (20, 3, True, OK, (), (20, 21, 22), True),  # at the next step
        (17, 2, False, OK, (17, 18), (), False),  # all replayed
        (17, 5, True, OK, (17, 18, 19), (20, 21), False),  # overlap; the reset was applied before
        (12, 1, False, OK, (12,), (), False),  # the oldest step held
        (11, 3, False, out_of_order(20), (), (), False),  # stale: step 11 is gone
        (3, 0, True, OK, (), (), False),  # empty and old: nothing to replay, nothing refused
        (21, 1, False, out_of_order(20), (), (), False),  # a gap
        (2**64 - 1, 0, False, out_of_order(20), (), (), False),  # a gap, even when empty
    ],
)
def test_step_rule_table(start_step, steps, reset, outcome, replayed, applied, applies_reset):
    verdict = step_rule(AT_20, start_step, steps, reset, REPLAY)
    assert verdict.outcome == outcome
    assert (tuple(verdict.replayed), tuple(verdict.applied)) == (replayed, applied)
    assert verdict.reset == applies_reset
    assert verdict.after.next_step == 20 + len(applied)
    if outcome == OK:
        assert (verdict.start_step, verdict.num_steps) == ((start_step or 20), steps)


@pytest.mark.parametrize(
    ("window", "applied", "after"),
    [
        (Window(0, 0), 3, Window(3, 0)),
        (Window(6, 0), 5, Window(11, 3)),  # the buffer keeps the last 8
        (Window(20, 12), 30, Window(50, 42)),  # a chunk longer than the buffer
        (Window(20, 16), 2, Window(22, 16)),  # an imported session that held only 4 steps
    ],
)
def test_window_advances_keeping_the_last_replay_steps(window, applied, after):
    assert window.advanced(applied, REPLAY) == after


@pytest.mark.parametrize(
    ("values", "start_step", "message_id", "metadata_id", "outcome"),
    [
        ([0.0] * 4, None, "", None, OK),  # a new session
        ([0.0] * 4, 1, "", None, out_of_order(0)),  # a new session starts at step 0
        ([0.0] * 4, 20, "s", None, OK),
        ([0.0] * 4, 20, "", "s", OK),  # named by metadata
        ([0.0] * 4, None, "s", "t", BAD),  # ids disagree
        ([0.0] * 4, None, "bad id!", None, BAD),
        ([0.0] * 4, None, "x" * 129, None, BAD),
        ([0.0] * 4, None, "gone", None, NOT_FOUND),
        ([0.0] * 4, 21, "gone", None, NOT_FOUND),  # no session, so no numbering to check
        ([0.0] * 3, None, "s", None, BAD),  # not a whole timestep
        ([0.0] * 10, None, "s", None, BAD),  # 5 timesteps, past max_chunk_steps
        ([0.0, math.nan], None, "s", None, BAD),
        ([0.0, -math.inf], 21, "s", None, BAD),  # bad inputs before the numbering
    ],
)
def test_first_message_table(values, start_step, message_id, metadata_id, outcome):
    message = Message(values, start_step, session_id=message_id)
    _, verdict = first_message(message, metadata_id, {"s": AT_20}, LIMITS)
    assert verdict.outcome == outcome


def test_a_new_session_past_capacity_is_refused_after_its_numbering():
    full = {"s": AT_20}
    assert first_message(Message([0.0] * 2), None, full, LIMITS, room=False)[1].outcome == CAPACITY
    gap = first_message(Message([0.0] * 2, start_step=5), None, full, LIMITS, room=False)
    assert gap[1].outcome == out_of_order(0)


@pytest.mark.parametrize(
    ("message", "outcome"),
    [
        (Message([0.0] * 2, session_id="s"), OK),
        (Message([0.0] * 2, session_id="t"), BAD),  # another session on this stream
        (Message([0.0] * 2, session_id="bad id!"), BAD),
        (Message([0.0] * 2, start_step=12), OK),
        (Message([0.0] * 4, start_step=11), out_of_order(20)),
        (Message([0.0], start_step=11), BAD),
    ],
)
def test_next_message_table(message: Message, outcome: Outcome):
    assert next_message(message, "s", AT_20, LIMITS).outcome == outcome


def test_a_refused_message_changes_nothing():
    for verdict in (
        step_rule(AT_20, 25, 2, True, REPLAY),
        next_message(Message([0.0] * 3, reset=True), "s", AT_20, LIMITS),
    ):
        assert (verdict.replayed, verdict.applied, verdict.reset) == (range(0), range(0), False)
        assert verdict.after == AT_20


chunks = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(-12, 3)),  # start_step, relative to the next step
        st.integers(0, 12),  # timesteps
        st.booleans(),  # reset
    ),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(chunks=chunks, replay_steps=st.integers(1, 10))
def test_the_servers_plan_chunk_follows_the_model(chunks, replay_steps):
    """Output row s holds the value s, so a replayed row shows which step it came from."""
    session = Session("s", 0, ReplayBuffer(replay_steps))
    window = Window()
    for offset, steps, reset in chunks:
        start = None if offset is None else max(0, window.next_step + offset)
        verdict = step_rule(window, start, steps, reset, replay_steps)
        try:
            plan = plan_chunk(session, start, np.zeros((steps, 2)), reset, 1)
        except StepOutOfOrder as err:
            assert verdict.outcome == out_of_order(int(err.metadata["expected_step"]))
            continue
        assert verdict.ok, f"plan_chunk accepted start {start}, the model says {verdict.outcome}"
        assert plan.replayed.ravel().tolist() == list(verdict.replayed)
        assert (plan.new_start, len(plan.new), plan.reset) == (
            verdict.applied.start,
            len(verdict.applied),
            verdict.reset,
        )
        if len(plan.new) or plan.reset:  # as Runtime.step: else nothing goes to the engine
            applied = np.arange(plan.new_start, plan.new_start + len(plan.new), dtype=np.float32)
            session.commit(plan.new_start, applied.reshape(-1, 1))
        window = verdict.after
        assert (session.next_step, session.replay.first_step(session.next_step)) == (
            window.next_step,
            window.replay_start,
        )
