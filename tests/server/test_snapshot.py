"""Restart without loss: SIGTERM writes every session to --snapshot-dir, the next start restores
them, and clients resume with start_step. A mismatched or corrupt snapshot is refused."""

import asyncio
import signal

import numpy as np
import pytest

from lstm_model.cli import main as lstm_model_main
from lstm_stream.client import AsyncStreamingClient, LstmStreamError, StreamingClient
from server.snapshot import SNAPSHOT_FILE
from tests.equality import assert_equals_offline
from tests.factories import RawStream, ServeProcess, random_steps

SESSIONS, STEPS, HALF = 100, 40, 20


async def stream_first_halves(target, inputs):
    async with AsyncStreamingClient(target) as client:

        async def one(steps):
            session = await client.open_session()
            outputs = await session.send(steps[:HALF])
            session.detach()
            return session.session_id, outputs

        return await asyncio.gather(*(one(steps) for steps in inputs))


async def resume_second_halves(target, ids, inputs):
    async with AsyncStreamingClient(target) as client:

        async def one(session_id, steps):
            session = await client.attach(session_id)
            assert session.next_step == HALF
            outputs = await session.send(steps[HALF:])
            await session.close()
            return outputs

        return await asyncio.gather(*(one(i, s) for i, s in zip(ids, inputs, strict=True)))


def test_sigterm_snapshot_then_restart_resumes_every_session(
    tmp_path, regression_dir, regression_model
):
    """A regression model: a restored state a step off would show in every later output."""
    inputs = [random_steps(STEPS, 6, seed=3000 + i) for i in range(SESSIONS)]
    snapshots = tmp_path / "snapshots"
    flags = ["--snapshot-dir", str(snapshots), "--model", str(regression_dir)]
    with ServeProcess(*flags) as first:
        firsts = asyncio.run(stream_first_halves(first.target, inputs))
        code, log = first.finish(signal.SIGTERM)
    assert code == 0, log
    assert f"wrote {SESSIONS} sessions" in log
    assert (snapshots / SNAPSHOT_FILE).exists()

    with ServeProcess(*flags) as second:
        assert any(f"restored {SESSIONS} sessions" in line for line in second.log)
        ids = [session_id for session_id, _ in firsts]
        with RawStream(second.target, ids[0]) as stream:  # the replay buffer came along too
            start, overlap = stream.send(inputs[0][HALF - 4 : HALF], start_step=HALF - 4)
        assert start == HALF - 4
        np.testing.assert_array_equal(overlap, firsts[0][1][-4:])
        seconds = asyncio.run(resume_second_halves(second.target, ids, inputs))
        assert second.finish()[0] == 0
    assert (snapshots / f"{SNAPSHOT_FILE}.restored").exists()  # set aside: never restored twice
    for steps, (_, head), tail in zip(inputs, firsts, seconds, strict=True):
        assert_equals_offline(np.concatenate([head, tail]), regression_model, steps)


def test_sigkill_loses_the_sessions_and_clients_are_told(tmp_path):
    snapshots = tmp_path / "snapshots"
    with ServeProcess("--snapshot-dir", str(snapshots)) as first:
        with StreamingClient(first.target) as client:
            session = client.open_session()
            session.send(random_steps(5, 6))
            session.detach()
        first.finish(signal.SIGKILL)
    with ServeProcess("--snapshot-dir", str(snapshots)) as second:
        with StreamingClient(second.target) as client, pytest.raises(LstmStreamError) as err:
            client.attach(session.session_id)
        assert err.value.reason == "SESSION_NOT_FOUND"  # lost, and said so: never silently wrong


def make_snapshot_of_another_model(tmp_path):
    lstm_model_main(
        [
            "init",
            "--input-size",
            "6",
            "--hidden-size",
            "8",
            "--num-layers",
            "1",
            "--output-size",
            "4",
            "--out",
            str(tmp_path / "other"),
        ]
    )
    snapshots = tmp_path / "snapshots"
    with ServeProcess("--snapshot-dir", str(snapshots), "--model", str(tmp_path / "other")) as p:
        with StreamingClient(p.target) as client:
            client.open_session().detach()
        assert p.finish()[0] == 0
    return snapshots


def test_a_snapshot_of_another_model_is_refused_loudly(tmp_path):
    snapshots = make_snapshot_of_another_model(tmp_path)
    with pytest.raises(RuntimeError) as err:
        ServeProcess("--snapshot-dir", str(snapshots))
    assert "restoring it would apply another model's state" in str(err.value)
    assert "lstm-serve: " in str(err.value)
    assert (snapshots / SNAPSHOT_FILE).exists()  # nothing was thrown away


def test_discard_flag_sets_a_bad_snapshot_aside_and_starts_empty(tmp_path):
    snapshots = make_snapshot_of_another_model(tmp_path)
    with ServeProcess("--snapshot-dir", str(snapshots), "--snapshot-discard-invalid") as proc:
        assert (snapshots / f"{SNAPSHOT_FILE}.rejected").exists()
        assert any("starting with no sessions" in line for line in proc.log)
        assert proc.finish()[0] == 0


def test_a_truncated_snapshot_is_refused(tmp_path):
    snapshots = make_snapshot_of_another_model(tmp_path)
    path = snapshots / SNAPSHOT_FILE
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(RuntimeError) as err:
        ServeProcess("--snapshot-dir", str(snapshots))
    assert "corrupt or truncated snapshot" in str(err.value)


def test_a_snapshot_dir_that_cannot_be_written_is_refused_at_start(tmp_path):
    """Found at start, not at shutdown with every session lost. (The Docker stage tries the
    real case: a root-owned mount over the directory of a server that is not root.)"""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RuntimeError) as err:
        ServeProcess("--snapshot-dir", str(blocker / "snapshots"))
    log = str(err.value).split("\n", 1)[1].strip().splitlines()
    assert len(log) == 1, log
    assert log[0].startswith(f"lstm-serve: --snapshot-dir {blocker / 'snapshots'}: not writable by")
    assert "(Not a directory)" in log[0] and "sessions could not be saved" in log[0]
