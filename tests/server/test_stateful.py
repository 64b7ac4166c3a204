"""Hypothesis stateful testing of sessions and streams against a real in-process server.

A small server (4 sessions, an 8-step replay buffer) is driven through random sequences of
creates (server-issued and client-chosen ids, by CreateSession and by a stream's first message),
chunks (appended, at the next step, resent over the replay buffer, stale, past a gap; with and
without reset and end_session), bad messages, takeovers, deletes, expiries and stream closes. A
plain model says what each call must return (for stream messages, the shared step rule of
tests/step_rule.py): every output is held to the offline model run over the session's inputs since
its last reset, every refusal to its code, ErrorInfo reason and `expected_step`, and after each
rule every live session's next step and replay window and the number of live sessions must match
the model.
"""

from __future__ import annotations

import queue
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from tests.equality import assert_equals_offline
from tests.factories import serve
from tests.outcomes import BAD, CAPACITY, EXISTS, NOT_FOUND, OK, TAKEN_OVER, Outcome, outcome_of
from tests.step_rule import Limits, Message, Verdict, Window, first_message, next_message

INPUT_SIZE, OUTPUT_SIZE = 6, 4  # the regression model (tests/conftest.py)
MAX_SESSIONS = 4
REPLAY_STEPS = 8
LIMITS = Limits(input_size=INPUT_SIZE, max_chunk_steps=512, replay_steps=REPLAY_STEPS)
CHOSEN_IDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]  # few: ids collide
TIMEOUT_S = 30.0


def steps_from(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((count, INPUT_SIZE)) * 3).astype(np.float32)  # (T, I)


class Stream:
    """One StreamSteps call: send a message, get its response or its error's outcome."""

    def __init__(self, stub, metadata_id: str | None = None) -> None:
        self.metadata_id = metadata_id
        self._requests: queue.Queue = queue.Queue()
        metadata = (("x-session-id", metadata_id),) if metadata_id else None
        self.call = stub.StreamSteps(
            iter(self._requests.get, None), metadata=metadata, timeout=TIMEOUT_S
        )
        self._responses = iter(self.call)

    def send(self, request: pb.StreamStepsRequest) -> tuple[Outcome, pb.StreamStepsResponse]:
        self._requests.put(request)
        try:
            return OK, next(self._responses)
        except grpc.RpcError as err:
            return outcome_of(err), None
        except StopIteration:
            return ("ENDED", "the stream ended without answering", None), None

    def finish(self) -> Outcome:
        """Half-close and wait for the status: what the server ended the stream with."""
        self._requests.put(None)
        try:
            extra = list(self._responses)
        except grpc.RpcError as err:
            return outcome_of(err)
        return OK if not extra else ("EXTRA", f"{len(extra)} unasked responses", None)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


@dataclass
class SessionModel:
    session_id: str
    window: Window = field(default_factory=Window)  # next step, oldest step the buffer holds
    history: list = field(default_factory=list)  # (I,) rows since the last reset
    inputs: dict = field(default_factory=dict)  # step -> (I,) row, every step applied
    outputs: dict = field(default_factory=dict)  # step -> (O,) row as the server answered it
    owner: Stream | None = None  # the stream feeding it, if any

    @property
    def next_step(self) -> int:
        return self.window.next_step

    @property
    def replay_start(self) -> int:
        return self.window.replay_start


class SessionsMachine(RuleBasedStateMachine):
    srv = None  # set by the test: one server for every example
    model = None
    seen: ClassVar[Counter] = Counter()  # outcomes checked, over all examples

    def __init__(self) -> None:
        super().__init__()
        self.channel = grpc.insecure_channel(self.srv.target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.live: dict[str, SessionModel] = {}
        self.dead: list[tuple[Stream, Outcome]] = []  # streams the server ended, and how
        self.streams: list[Stream] = []
        self.runtime = self.srv.server.runtime
        assert len(self.runtime.sessions) == 0, "the previous example left sessions behind"

    def teardown(self) -> None:
        for stream in self.streams:
            stream.close()
        for session in list(self.runtime.sessions):  # every one, leaked ones too
            self.srv.call(self.runtime.close_session(session, "deleted"))
        self.channel.close()

    # Helpers

    def open_stream(self, metadata_id: str | None = None) -> Stream:
        stream = Stream(self.stub, metadata_id)
        self.streams.append(stream)
        return stream

    def expect(self, expected: Outcome, got: Outcome, what: str) -> None:
        self.seen[expected[1] or expected[0]] += 1
        assert got == expected, f"{what}: expected {expected}, got {got}"

    def displace(self, session: SessionModel, by: Stream | None) -> None:
        """A new stream attached: the previous one ends ABORTED SESSION_TAKEN_OVER."""
        if session.owner is not None and session.owner is not by:
            self.dead.append((session.owner, TAKEN_OVER))
        session.owner = by

    def close_model(self, session_id: str) -> None:
        """The session is gone: a stream feeding it ends NOT_FOUND."""
        session = self.live.pop(session_id)
        if session.owner is not None:
            self.dead.append((session.owner, NOT_FOUND))

    def pick_live(self, data) -> SessionModel:
        # In creation order: server-issued ids are random, so sorting them would make the same
        # draws pick different sessions from one run to the next.
        return self.live[data.draw(st.sampled_from(list(self.live)), label="session")]

    def stream_to(self, session: SessionModel, data) -> tuple[Stream, dict, bool]:
        """The owner stream, or a new one naming the session by message or metadata;
        (stream, fields for the first message, whether it is new)."""
        if session.owner is not None and data.draw(st.booleans(), label="via owner"):
            return session.owner, {}, False
        how = data.draw(st.sampled_from(["message", "metadata", "both"]), label="name by")
        metadata_id = session.session_id if how != "message" else None
        first = {"session_id": session.session_id} if how != "metadata" else {}
        return self.open_stream(metadata_id), first, True

    def stream_verdict(
        self, stream: Stream, new_stream: bool, session: SessionModel, request
    ) -> Verdict:
        """What the step rule says of a message to `session` on `stream`."""
        message = Message.of(request)
        if not new_stream:
            return next_message(message, session.session_id, session.window, LIMITS)
        sessions = {s: model.window for s, model in self.live.items()}
        return first_message(message, stream.metadata_id, sessions, LIMITS)[1]

    def check_outputs(self, session, response, verdict: Verdict, inputs) -> None:
        """Check an accepted chunk's response against the model, then apply it to the model."""
        assert (response.session_id, response.start_step, response.num_steps) == (
            session.session_id,
            verdict.start_step,
            verdict.num_steps,
        ), f"response header {response.session_id, response.start_step, response.num_steps}"
        rows = np.asarray(response.outputs, dtype=np.float32).reshape(-1, OUTPUT_SIZE)
        already = len(verdict.replayed)
        if already:
            replayed = np.stack([session.outputs[s] for s in verdict.replayed])
            assert np.array_equal(rows[:already], replayed), "replayed outputs differ"
        if verdict.reset:
            session.history = []
        new = inputs[already:]
        if len(new):
            history = np.asarray([*session.history, *new])
            assert_equals_offline(rows[already:], self.model, history, first=len(session.history))
        for step, row_in, row_out in zip(verdict.applied, new, rows[already:], strict=True):
            session.inputs[step] = row_in
            session.outputs[step] = row_out
            session.history.append(row_in)
        session.window = verdict.after

    # Rules: creating

    @rule(data=st.data())
    def create_by_rpc(self, data) -> None:
        session_id = data.draw(st.sampled_from(["", *CHOSEN_IDS]), label="id")
        try:
            response = self.stub.CreateSession(
                pb.CreateSessionRequest(session_id=session_id), timeout=TIMEOUT_S
            )
            got = OK
        except grpc.RpcError as err:
            got, response = outcome_of(err), None
        if session_id in self.live:
            expected = EXISTS
        elif len(self.live) == MAX_SESSIONS:
            expected = CAPACITY
        else:
            expected = OK
        self.expect(expected, got, f"CreateSession({session_id!r})")
        if got == OK:
            assert response.session.next_step == 0
            created = response.session.session_id
            assert created == session_id or (not session_id and len(created) >= 22)
            self.live[created] = SessionModel(created)

    @rule(data=st.data())
    def create_by_stream(self, data) -> None:
        """A stream whose first message names no session creates one, unless it is refused."""
        count = data.draw(st.integers(0, 4), label="steps")
        inputs = steps_from(data.draw(st.integers(0, 2**32 - 1), label="seed"), count)
        request = pb.StreamStepsRequest(inputs=inputs.ravel().tolist())
        start = data.draw(st.sampled_from([None, 0, 1, 5, 2**63]), label="start_step")
        if start is not None:
            request.start_step = start
        stream = self.open_stream()
        got, response = stream.send(request)
        room = len(self.live) < MAX_SESSIONS
        _, verdict = first_message(Message.of(request), None, {}, LIMITS, room)
        self.expect(verdict.outcome, got, f"a new session's first message, start_step={start}")
        if got == OK:
            session = SessionModel(response.session_id, owner=stream)
            assert session.session_id not in self.live
            self.check_outputs(session, response, verdict, inputs)
            self.live[session.session_id] = session

    @rule(data=st.data())
    def stream_to_unknown(self, data) -> None:
        session_id = data.draw(st.sampled_from([*CHOSEN_IDS, "never-created"]), label="id")
        if session_id in self.live:
            return
        by_metadata = data.draw(st.booleans(), label="by metadata")
        stream = self.open_stream(session_id if by_metadata else None)
        request = pb.StreamStepsRequest(inputs=[0.5] * INPUT_SIZE)
        if not by_metadata:
            request.session_id = session_id
        got, _ = stream.send(request)
        sessions = {s: model.window for s, model in self.live.items()}
        _, verdict = first_message(Message.of(request), stream.metadata_id, sessions, LIMITS)
        assert verdict.outcome == NOT_FOUND, "the model must refuse an unknown id"
        self.expect(verdict.outcome, got, f"a stream to unknown session {session_id!r}")

    # Rules: feeding

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def chunk(self, data) -> None:
        session = self.pick_live(data)
        stream, first, new_stream = self.stream_to(session, data)
        next_step = session.next_step
        mode = data.draw(
            st.sampled_from(["append", "at next", "resend", "stale", "gap"]), label="mode"
        )
        if mode == "resend" and not next_step:
            mode = "at next"
        if mode == "stale" and not session.replay_start:
            mode = "gap"
        fresh = steps_from(
            data.draw(st.integers(0, 2**32 - 1), label="seed"),
            data.draw(st.integers(0, 5), label="steps"),
        )
        start: int | None = None
        inputs = fresh
        if mode == "at next":
            start = next_step
        elif mode == "resend":
            oldest = session.replay_start  # the edge of the window, often: off-by-ones live there
            start = data.draw(st.just(oldest) | st.integers(oldest, next_step - 1), label="from")
            old = np.asarray([session.inputs[s] for s in range(start, next_step)])
            inputs = np.concatenate([old, fresh])[: data.draw(st.integers(1, 13), label="keep")]
        elif mode == "stale":
            gone = session.replay_start - 1  # the newest step no longer held
            start = data.draw(st.just(gone) | st.integers(0, gone), label="from")
            inputs = np.concatenate([steps_from(start, 1), fresh])
        elif mode == "gap":
            start = next_step + data.draw(st.sampled_from([1, 2, 50, 2**63]), label="gap")
        reset = data.draw(st.booleans(), label="reset")
        end = data.draw(st.integers(0, 9), label="end") == 0
        request = pb.StreamStepsRequest(
            inputs=inputs.ravel().tolist(), reset=reset, end_session=end, **first
        )
        if start is not None:
            request.start_step = start
        verdict = self.stream_verdict(stream, new_stream, session, request)
        assert verdict.ok == (mode not in ("stale", "gap")), f"the model calls {mode} {verdict}"
        got, response = stream.send(request)
        if new_stream:  # it attached: the previous stream is displaced, refused or not
            self.displace(session, stream)
        what = f"{mode} chunk of {len(inputs)} steps at {start} (next {next_step})"
        self.expect(verdict.outcome, got, what)
        if not verdict.ok:
            session.owner = None  # the refused stream has ended
            return
        self.check_outputs(session, response, verdict, inputs)
        if end:  # deleted once answered; the stream then ends OK
            self.expect(OK, stream.finish(), "the stream after end_session")
            session.owner = None
            self.close_model(session.session_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def another_chunk(self, data) -> None:
        """Chunks are most of real traffic: a second rule doubles their share."""
        self.chunk(data)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def bad_message(self, data) -> None:
        """Refused, and it changes nothing: no state, no step, no takeover, no delete."""
        session = self.pick_live(data)
        stream, first, new_stream = self.stream_to(session, data)
        kind = data.draw(
            st.sampled_from(["width", "nan", "inf", "too long", "other id"]), label="kind"
        )
        values = [0.5] * INPUT_SIZE * data.draw(st.integers(1, 3), label="steps")
        if kind == "width":
            values.append(0.5)
        elif kind in ("nan", "inf"):
            values[data.draw(st.integers(0, len(values) - 1), label="at")] = float(kind)
        elif kind == "too long":
            values = [0.5] * INPUT_SIZE * 513
        request = pb.StreamStepsRequest(
            inputs=values,
            reset=data.draw(st.booleans(), label="reset"),
            end_session=data.draw(st.booleans(), label="end"),
            **first,
        )
        if kind == "other id":
            others = [s for s in [*CHOSEN_IDS, "someone-else"] if s != session.session_id]
            request.session_id = data.draw(st.sampled_from(others), label="other")
            if new_stream and "session_id" in first:  # else it would just name another session
                stream.close()
                stream = self.open_stream(session.session_id)
        if data.draw(st.booleans(), label="with start_step"):
            request.start_step = session.next_step
        verdict = self.stream_verdict(stream, new_stream, session, request)
        assert verdict.outcome == BAD, f"the model accepts a bad message ({kind}): {verdict}"
        got, _ = stream.send(request)
        self.expect(verdict.outcome, got, f"bad message ({kind})")
        if not new_stream:
            session.owner = None  # its own stream ended with the error

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def takeover(self, data) -> None:
        """A second stream on a session: it takes over, the first ends ABORTED."""
        session = self.pick_live(data)
        by_metadata = data.draw(st.booleans(), label="by metadata")
        stream = self.open_stream(session.session_id if by_metadata else None)
        request = pb.StreamStepsRequest(start_step=session.next_step)
        if not by_metadata:
            request.session_id = session.session_id
        verdict = self.stream_verdict(stream, True, session, request)
        got, response = stream.send(request)
        self.expect(verdict.outcome, got, "a takeover's first message")
        self.displace(session, stream)
        self.check_outputs(session, response, verdict, np.zeros((0, INPUT_SIZE)))

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def send_on_ended_stream(self, data) -> None:
        index = data.draw(st.integers(0, len(self.dead) - 1), label="stream")
        stream, expected = self.dead.pop(index)
        got, _ = stream.send(pb.StreamStepsRequest(inputs=[0.5] * INPUT_SIZE))
        self.expect(expected, got, "a message on a stream the server ended")
        stream.close()

    @precondition(lambda self: any(s.owner for s in self.live.values()))
    @rule(data=st.data())
    def close_stream(self, data) -> None:
        """The client hangs up; the session lives on."""
        owned = [s for s, session in self.live.items() if session.owner]
        session = self.live[data.draw(st.sampled_from(owned), label="session")]
        session.owner.close()
        session.owner = None

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def copy_by_export_and_import(self, data) -> None:
        """Export a session and import it under another id: the copy continues identically."""
        session = self.pick_live(data)
        new_id = data.draw(st.sampled_from(CHOSEN_IDS), label="new id")
        state = self.stub.ExportSession(
            pb.ExportSessionRequest(session_id=session.session_id), timeout=TIMEOUT_S
        ).state
        try:
            self.stub.ImportSession(
                pb.ImportSessionRequest(state=state, session_id=new_id), timeout=TIMEOUT_S
            )
            got = OK
        except grpc.RpcError as err:
            got = outcome_of(err)
        if new_id in self.live:
            expected = EXISTS
        elif len(self.live) == MAX_SESSIONS:
            expected = CAPACITY
        else:
            expected = OK
        self.expect(expected, got, f"import {session.session_id!r} as {new_id!r}")
        if got == OK:
            replay = range(session.replay_start, session.next_step)
            self.live[new_id] = SessionModel(
                new_id,
                window=session.window,
                history=list(session.history),
                inputs={s: session.inputs[s] for s in replay},
                outputs={s: session.outputs[s] for s in replay},
            )

    # Rules: ending

    @rule(data=st.data())
    def delete(self, data) -> None:
        choices = [*self.live, *(s for s in CHOSEN_IDS if s not in self.live)]
        session_id = data.draw(st.sampled_from(choices), label="id")
        try:
            self.stub.DeleteSession(
                pb.DeleteSessionRequest(session_id=session_id), timeout=TIMEOUT_S
            )
            got = OK
        except grpc.RpcError as err:
            got = outcome_of(err)
        self.expect(OK if session_id in self.live else NOT_FOUND, got, f"delete {session_id!r}")
        if session_id in self.live:
            self.close_model(session_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def expire(self, data) -> None:
        """The idle sweeper's own pass, at a clock just past one session's idle deadline: it
        must close that session and every session last active before it, and no other."""
        session = self.pick_live(data)
        chosen = self.runtime.sessions.get(session.session_id)
        deadline = chosen.last_active_monotonic + 1e-6
        idle = {s.session_id for s in self.runtime.sessions if s.last_active_monotonic < deadline}
        now = deadline + self.runtime.config.session_idle_timeout_s
        expired = self.srv.call(self.runtime.expire_idle(now))
        assert {s.session_id for s in expired} == idle
        for session_id in idle:
            self.close_model(session_id)

    # Invariants

    @invariant()
    def sessions_match_the_model(self) -> None:
        assert len(self.runtime.sessions) == len(self.live), (
            f"{len(self.runtime.sessions)} live sessions on the server, {len(self.live)} expected"
        )
        for session_id, session in self.live.items():
            got = self.stub.GetSession(
                pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT_S
            ).session
            assert (got.next_step, got.replay_start_step) == (
                session.next_step,
                session.replay_start,
            ), f"GetSession({session_id!r})"


@pytest.fixture(scope="module")
def small_server(regression_dir):
    """A regression model: a step applied twice or lost shows in the next outputs, where the
    bundled classifier's saturated softmax can hide it."""
    model = str(regression_dir)
    with serve(max_sessions=MAX_SESSIONS, replay_steps=REPLAY_STEPS, model=model) as srv:
        yield srv


@pytest.mark.timeout(180)
def test_sessions_and_streams_follow_the_model(small_server, regression_model):
    SessionsMachine.srv = small_server
    SessionsMachine.model = regression_model
    run_state_machine_as_test(
        SessionsMachine,
        settings=settings(
            max_examples=50,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    print("\noutcomes checked: " + ", ".join(f"{k} {n}" for k, n in SessionsMachine.seen.items()))
