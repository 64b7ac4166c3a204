"""The client's ledger with durable sessions: what it keeps, and what it resends after a lost
replica, checked chunk by chunk (the end-to-end run is tests/e2e/test_scale_out.py)."""

import grpc
import numpy as np
import pytest

from lstm_stream.client.errors import LstmStreamError
from lstm_stream.client.ledger import Ledger
from lstm_stream.v1 import inference_pb2 as pb

OUTPUT_SIZE = 2


def make_ledger(keep: bool = True, max_kept_steps: int = 100, chunks=(3, 2, 4)) -> Ledger:
    ledger = Ledger("s", OUTPUT_SIZE, keep_until_durable=keep, max_kept_steps=max_kept_steps)
    for i, n in enumerate(chunks):
        ledger.add(np.full((n, 1), i, np.float32))
    return ledger


def answer(ledger: Ledger, durable_step: int = 0):
    """The server's response to the ledger's next awaited chunk."""
    chunk = (ledger._resending or ledger.pending)[0]
    n = len(chunk.rows)
    return ledger.accept(
        pb.StreamStepsResponse(
            start_step=chunk.start,
            num_steps=n,
            outputs=[float(chunk.start)] * (n * OUTPUT_SIZE),
            durable_step=durable_step,
        )
    )


def gap(expected_step: int) -> LstmStreamError:
    return LstmStreamError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "gap",
        "STEP_OUT_OF_ORDER",
        {"expected_step": str(expected_step)},
    )


def spans(chunks) -> list[tuple[int, int]]:
    return [(c.start, c.end) for c in chunks]


def test_without_durable_sessions_answered_chunks_are_not_kept():
    ledger = make_ledger(keep=False)
    answer(ledger)
    assert not ledger.kept and spans(ledger.to_send()) == [(3, 5), (5, 9)]
    assert not ledger.rewind(gap(0))  # nothing to resend from: the server's error stands


def test_answered_chunks_are_kept_until_the_store_holds_them():
    ledger = make_ledger()
    answer(ledger, durable_step=0)
    answer(ledger, durable_step=0)
    assert spans(ledger.kept) == [(0, 3), (3, 5)]
    answer(ledger, durable_step=3)  # stored up to 3: the first chunk is safe
    assert spans(ledger.kept) == [(3, 5), (5, 9)]
    assert ledger.durable_step == 3


def test_a_rewind_resends_kept_chunks_from_the_servers_step_and_drops_their_answers():
    ledger = make_ledger(chunks=(3, 2, 4, 1))
    for _ in range(3):
        answer(ledger, durable_step=0)
    # The replica is lost; its successor loaded the session at step 4 (mid-chunk).
    assert ledger.rewind(gap(4))
    assert spans(ledger.to_send()) == [(4, 5), (5, 9), (9, 10)]
    assert ledger.to_send()[0].rows[:, 0].tolist() == [1.0]  # the tail of chunk (3, 5)
    assert answer(ledger) is None and answer(ledger) is None  # given to the caller already
    chunk, outputs = answer(ledger, durable_step=9)
    assert (chunk.start, chunk.end) == (9, 10) and outputs.shape == (1, OUTPUT_SIZE)
    assert ledger.resent_steps == 5
    assert spans(ledger.kept) == [(9, 10)]


def test_a_server_behind_what_the_client_keeps_is_data_loss_not_a_silent_gap():
    ledger = make_ledger(max_kept_steps=4)
    for _ in range(3):
        answer(ledger, durable_step=0)
    assert spans(ledger.kept) == [(5, 9)]  # the store is behind: the oldest were let go
    assert ledger.unkept_steps == 5
    ledger.add(np.zeros((1, 1), np.float32))
    with pytest.raises(LstmStreamError) as raised:
        ledger.rewind(gap(2))
    err = raised.value
    assert (err.code, err.reason) == (grpc.StatusCode.DATA_LOSS, "STATE_LOST")
    assert err.metadata == {"expected_step": 2, "kept_from": 5}
    assert "steps 2..4 were answered and not yet stored" in err.details


def test_a_gap_ahead_of_the_answered_steps_is_not_a_rewind():
    ledger = make_ledger()
    answer(ledger)
    assert not ledger.rewind(gap(3))  # the server holds all that was answered
    assert not ledger.rewind(gap(7))
    bad = gap(1)
    bad.metadata = {}
    assert not ledger.rewind(bad)


def test_a_reset_without_timesteps_is_kept_and_resent_on_every_new_stream():
    ledger = Ledger("s", OUTPUT_SIZE, keep_until_durable=True)
    ledger.add(np.zeros((2, 1), np.float32))
    ledger.add(np.zeros((0, 1), np.float32), reset=True)  # at step 2, no timesteps
    answer(ledger, durable_step=0)
    answer(ledger, durable_step=2)  # stored at 2: before or after the reset?
    assert spans(ledger.kept) == [(2, 2)] and ledger.kept[0].reset
    # A successor that lost the reset would be at step 2 too: no gap tells; resend it anyway.
    assert [(c.start, c.reset) for c in ledger.to_send()] == [(2, True)]
    assert answer(ledger) is None
    answer_next = ledger.add(np.zeros((1, 1), np.float32))
    assert spans(ledger.to_send()) == [(2, 2), (2, 3)] and answer_next.start == 2
    answer(ledger, durable_step=0)
    answer(ledger, durable_step=3)  # stored past the reset: nothing kept
    assert not ledger.kept and ledger.to_send() == []
