"""Rolling out model versions (DESIGN 1.8) against a real lstm-serve on a repository: a new
version serves new sessions while every live session finishes on the version it started on,
a broken version is skipped, and a drained version unloads and gives its memory back."""

import asyncio
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from lstm_model.checkpoint import load_model
from lstm_stream.client import AsyncStreamingClient, LstmStreamError, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from server.security import ANONYMOUS
from server.state_store import session_key
from tests.equality import assert_equals_offline
from tests.factories import (
    ServeProcess,
    free_port,
    make_model_dir,
    metric_value,
    offline,
    random_steps,
    wait_for,
)

SIZES = dict(input_size=3, hidden_size=8, num_layers=1, output_size=2)
STATE = {value: name for name, value in pb.ModelVersionState.items()}


def add_version(repo: Path, version: int, name: str = "m", **sizes) -> Path:
    """A version published the way the README says: written aside, then renamed into place."""
    aside = repo / f".{name}-{version}.tmp"
    make_model_dir(aside, **(SIZES | {"seed": version} | sizes))
    (repo / name).mkdir(exist_ok=True)
    return aside.rename(repo / name / str(version))


def make_repository(tmp_path: Path, versions: tuple[int, ...] = (1,), **sizes) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    for version in versions:
        add_version(repo, version, **sizes)
    return repo


def listed(target: str) -> dict[tuple[str, int], tuple[str, int, str]]:
    """ListModels as {(model, version): (state, live sessions, error)}."""
    with StreamingClient(target) as client:
        response = client.list_models()
    return {
        (m.name, v.version): (
            STATE[v.state].removeprefix("MODEL_VERSION_STATE_"),
            v.sessions,
            v.error,
        )
        for m in response.models
        for v in m.versions
    }


def states(target: str) -> dict[tuple[str, int], str]:
    return {key: state for key, (state, _, _) in listed(target).items()}


def reload(proc: ServeProcess) -> None:
    proc.process.send_signal(signal.SIGHUP)


def serve_repository(repo: Path, *flags: str, metrics_port: int = 0) -> ServeProcess:
    return ServeProcess(
        "--model-repository",
        str(repo),
        "--repository-poll-s",
        "0",
        "--metrics-port",
        str(metrics_port),
        *flags,
    )


def errors_counted(metrics_port: int) -> float:
    """Every request counted under a code other than OK."""
    every = metric_value(metrics_port, "lstm_requests_total")
    return every - metric_value(metrics_port, "lstm_requests_total", code="OK")


@pytest.mark.parametrize("v2_cell", ["lstm", "gru"])
def test_a_rollout_while_100_sessions_stream_keeps_each_on_its_version(tmp_path, v2_cell):
    """v2 arrives and v1 leaves the repository while 100 sessions stream on v1, a step a
    message: each old session finishes on v1 with v1's outputs, new sessions get v2 and v2's
    outputs, v1 unloads after its last session ends, and not one request fails. v2 may be a
    GRU replacing the LSTM under the same name: the LSTM's sessions finish on the LSTM."""
    sessions, before, after = 100, 6, 6
    repo = make_repository(tmp_path)
    v1, v2 = load_model(repo / "m" / "1").model, None
    sequences = [random_steps(before + after, 3, seed=i) for i in range(sessions)]
    metrics_port = free_port()

    async def stream_old(client, rolled: asyncio.Event, i: int):
        async with client.open_session() as session:
            placed = (session.model, session.model_version)
            outputs = [await session.step(x) for x in sequences[i][:before]]
            await rolled.wait()  # streaming goes on across the rollout
            outputs += [await session.step(x) for x in sequences[i][before:]]
        return placed, np.stack(outputs)

    async def stream_new(client, i: int):
        async with client.open_session() as session:
            placed = (session.model, session.model_version)
            return placed, await session.send(sequences[i])

    async def run(proc):
        async with AsyncStreamingClient(proc.target) as client:
            rolled = asyncio.Event()
            old = [asyncio.ensure_future(stream_old(client, rolled, i)) for i in range(sessions)]
            await asyncio.to_thread(
                wait_for,
                lambda: listed(proc.target)[("m", 1)][1] == sessions,
                timeout=120,
                what="100 live",
            )
            add_version(repo, 2, cell=v2_cell)
            (repo / "m" / "1").rename(tmp_path / "v1-retired")
            reload(proc)
            await asyncio.to_thread(
                wait_for,
                lambda: states(proc.target) == {("m", 1): "DRAINING", ("m", 2): "READY"},
                timeout=120,
                what="v2 ready and v1 draining",
            )
            new = await asyncio.gather(*(stream_new(client, i) for i in range(sessions)))
            during = listed(proc.target)
            rolled.set()
            return await asyncio.gather(*old), new, during

    with serve_repository(repo, metrics_port=metrics_port) as proc:
        old, new, during = asyncio.run(run(proc))
        v2 = load_model(repo / "m" / "2").model
        assert (v1.config.cell, v2.config.cell) == ("lstm", v2_cell)
        wait_for(lambda: ("m", 1) not in listed(proc.target), timeout=120, what="v1 to unload")
        unloads = metric_value(metrics_port, "lstm_model_unloads_total")
        errors = errors_counted(metrics_port)
        _, log = proc.finish()
    assert during[("m", 1)][:2] == ("DRAINING", sessions)  # the old ones, still live
    assert during[("m", 2)][0] == "READY"
    for i, (placed, outputs) in enumerate(old):
        assert placed == ("m", 1)
        assert_equals_offline(outputs, v1, sequences[i])
    for i, (placed, outputs) in enumerate(new):
        assert placed == ("m", 2)
        assert_equals_offline(outputs, v2, sequences[i])
    assert not np.allclose(offline(v1, sequences[0]), offline(v2, sequences[0]), atol=1e-3)
    assert (unloads, errors) == (1, 0)
    assert "model m v1 unloaded" in log


def test_a_broken_version_is_skipped_while_serving_goes_on_and_retried_when_fixed(tmp_path):
    repo = make_repository(tmp_path)
    steps = random_steps(8, 3, seed=1)
    metrics_port = free_port()
    with (
        serve_repository(repo, metrics_port=metrics_port) as proc,
        StreamingClient(proc.target) as client,
    ):
        session = client.open_session()
        first = session.send(steps[:4])
        broken = repo / "m" / "2"
        shutil.copytree(repo / "m" / "1", broken)
        (broken / "model.safetensors").write_bytes(b"not safetensors")
        reload(proc)
        wait_for(lambda: states(proc.target).get(("m", 2)) == "FAILED", what="v2 failed")
        state, _, error = listed(proc.target)[("m", 2)]
        rest = session.send(steps[4:])  # the live session never noticed
        again = client.open_session()  # new sessions still go to v1
        placed = (again.model, again.model_version)
        again.close()
        failed_loads = metric_value(metrics_port, "lstm_model_loads_total", result="failed")
        reads = metric_value(metrics_port, "lstm_model_repository_reads_total")
        reload(proc)  # the same files: not tried again
        wait_for(lambda: metric_value(metrics_port, "lstm_model_repository_reads_total") > reads)
        with pytest.raises(LstmStreamError) as refused:
            client.open_session(model="m", model_version=2)
        shutil.rmtree(broken)
        add_version(repo, 2)  # fixed: new files under the number
        reload(proc)
        wait_for(lambda: states(proc.target).get(("m", 2)) == "READY", what="v2 retried")
        newest = client.open_session()
        assert (newest.model, newest.model_version) == ("m", 2)
        newest.close()
        session.close()
        wait_for(lambda: metric_value(metrics_port, "lstm_model_loads_total", result="ok") == 2)
        assert metric_value(metrics_port, "lstm_model_loads_total", result="failed") == 1
    v1 = load_model(repo / "m" / "1").model
    assert_equals_offline(np.concatenate([first, rest]), v1, steps)
    assert state == "FAILED" and "model.safetensors" in error
    assert placed == ("m", 1) and failed_loads == 1
    assert (refused.value.code.name, refused.value.reason) == ("NOT_FOUND", "MODEL_NOT_FOUND")


def test_an_unloaded_version_gives_its_memory_back(tmp_path):
    """A version's state pool (here 2 x 100 MB) is allocated at load and freed at unload."""
    big = dict(hidden_size=128, num_layers=2)  # pool: 2 tensors x 2 layers x 100k x 128 x 4 B
    repo = make_repository(tmp_path)

    def rss_mib(proc: ServeProcess) -> float:
        status = Path(f"/proc/{proc.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if "VmRSS" in line)) / 1024

    with serve_repository(repo, "--max-sessions", "100000") as proc:
        start = rss_mib(proc)
        add_version(repo, 2, **big)
        reload(proc)
        wait_for(lambda: states(proc.target).get(("m", 2)) == "READY", what="v2 loaded")
        loaded = rss_mib(proc)
        shutil.rmtree(repo / "m" / "2")
        reload(proc)  # no session lives on v2: it drains and unloads at once
        wait_for(lambda: ("m", 2) not in listed(proc.target), what="v2 unloaded")
        wait_for(lambda: rss_mib(proc) < loaded - 150, timeout=30, what="memory given back")
        unloaded = rss_mib(proc)
    pool_mib = 2 * 2 * 100_000 * 128 * 4 / 2**20  # h and c, float32
    assert loaded - start > 0.75 * pool_mib, (start, loaded)
    assert unloaded < loaded - 0.75 * pool_mib, (loaded, unloaded)


def open_on_each_version(target: str, steps: np.ndarray) -> dict[int, tuple[str, np.ndarray]]:
    """A session on v1 and one on v2, each fed `steps`: {version: (session id, outputs)}."""
    opened = {}
    with StreamingClient(target) as client:
        for version in (1, 2):
            session = client.open_session(model="m", model_version=version)
            opened[version] = (session.session_id, session.send(steps))
            session.detach()  # the session lives on without its stream
    return opened


def continue_each(target: str, opened, steps: np.ndarray) -> dict[int, tuple[tuple, np.ndarray]]:
    """Attach to each session and feed it `steps`: {version: ((model, version), outputs)}."""
    continued = {}
    with StreamingClient(target) as client:
        for version, (session_id, _) in opened.items():
            with client.attach(session_id) as session:
                placed = client.get_session(session_id)
                continued[version] = ((placed.model, placed.model_version), session.send(steps))
    return continued


def assert_continued_on_their_versions(repo: Path, opened, continued, first, rest) -> None:
    for version in (1, 2):
        model = load_model(repo / "m" / str(version)).model
        placed, outputs = continued[version]
        assert placed == ("m", version)
        whole = np.concatenate([opened[version][1], outputs])
        assert_equals_offline(whole, model, np.concatenate([first, rest]))


def test_a_snapshot_restart_brings_back_sessions_of_two_versions(tmp_path):
    repo, snapshots = make_repository(tmp_path, versions=(1, 2)), tmp_path / "snapshots"
    first, rest = random_steps(5, 3, seed=1), random_steps(4, 3, seed=2)
    with serve_repository(repo, "--snapshot-dir", str(snapshots)) as proc:
        opened = open_on_each_version(proc.target, first)
        code, _ = proc.finish()
    assert code == 0
    with serve_repository(repo, "--snapshot-dir", str(snapshots)) as proc:
        continued = continue_each(proc.target, opened, rest)
        proc.finish()
    assert_continued_on_their_versions(repo, opened, continued, first, rest)


def test_a_restart_mid_rollout_restores_what_it_can_and_sets_the_rest_aside(tmp_path):
    """The server stops while v2's sessions live and v2 has left the repository: the next
    start restores the v1 session and writes the v2 one aside, whole, as a snapshot that a
    server holding v2 restores."""
    repo, snapshots = make_repository(tmp_path, versions=(1, 2)), tmp_path / "snapshots"
    first, rest = random_steps(5, 3, seed=7), random_steps(4, 3, seed=8)
    with serve_repository(repo, "--snapshot-dir", str(snapshots)) as proc:
        opened = open_on_each_version(proc.target, first)
        proc.finish()
    kept = tmp_path / "kept"
    (kept / "m").mkdir(parents=True)
    (repo / "m" / "2").rename(kept / "m" / "2")  # v2 retired while its session lived
    with serve_repository(repo, "--snapshot-dir", str(snapshots)) as proc:
        continued = continue_each(proc.target, {1: opened[1]}, rest)
        _, log = proc.finish()
    (aside,) = snapshots.glob("unrestored-*")
    assert f"written to {aside / 'sessions.snapshot'}" in log
    (kept / "m" / "1").symlink_to(repo / "m" / "1")
    with serve_repository(kept, "--snapshot-dir", str(aside)) as proc:
        continued |= continue_each(proc.target, {2: opened[2]}, rest)
        proc.finish()
    (repo / "m" / "2").symlink_to(kept / "m" / "2")  # for the offline check
    assert_continued_on_their_versions(repo, opened, continued, first, rest)


def test_a_shutdown_while_a_version_drains_snapshots_its_sessions_too(tmp_path):
    """v2 leaves the repository while its session lives (DRAINING) and the server stops: the
    snapshot holds both sessions, and a server whose repository has v2 back continues both."""
    repo, snapshots = make_repository(tmp_path, versions=(1, 2)), tmp_path / "snapshots"
    first, rest = random_steps(5, 3, seed=11), random_steps(4, 3, seed=12)
    retired = tmp_path / "retired-v2"
    with serve_repository(repo, "--snapshot-dir", str(snapshots)) as proc:
        opened = open_on_each_version(proc.target, first)
        (repo / "m" / "2").rename(retired)
        reload(proc)
        wait_for(lambda: states(proc.target).get(("m", 2)) == "DRAINING", what="v2 draining")
        code, log = proc.finish()
    assert code == 0, log
    assert "wrote 2 sessions" in log, log
    retired.rename(repo / "m" / "2")
    with serve_repository(repo, "--snapshot-dir", str(snapshots)) as proc:
        continued = continue_each(proc.target, opened, rest)
        proc.finish()
    assert_continued_on_their_versions(repo, opened, continued, first, rest)


def test_a_newer_stored_record_replaces_the_last_session_of_a_draining_version(tmp_path):
    """Replica A holds a stale copy of the only session left on v2, which has left A's
    repository (DRAINING); replica B stepped the session on meanwhile. When the session comes
    back to A, closing the stale copy must not unload v2 under the newer record that moves
    onto it: the session continues on v2 with every step applied once."""
    from tests.e2e.scale_parts import RedisServer

    repo_a = make_repository(tmp_path / "a", versions=(1, 2))
    repo_b = make_repository(tmp_path / "b", versions=(1, 2))
    steps = random_steps(12, 3, seed=21)
    with RedisServer() as redis:
        store = ("--state-store", redis.url, "--state-store-interval-ms", "0")
        with serve_repository(repo_a, *store) as a, serve_repository(repo_b, *store) as b:
            key = None

            def stored_step():
                return redis.client().hget(key, "step")

            with StreamingClient(a.target) as on_a:
                session = on_a.open_session(model="m", model_version=2)
                outputs = [session.send(steps[:4])]
                session_id = session.detach()
            key = session_key(ANONYMOUS, session_id)
            wait_for(lambda: stored_step() == b"4", what="A's write of step 4")
            with StreamingClient(b.target) as on_b, on_b.attach(session_id) as moved:
                outputs.append(moved.send(steps[4:8]))
                moved.detach()
            wait_for(lambda: stored_step() == b"8", what="B's write of step 8")
            shutil.rmtree(repo_a / "m" / "2")
            reload(a)
            wait_for(lambda: listed(a.target).get(("m", 2)) == ("DRAINING", 1, ""), what="drain")
            with StreamingClient(a.target) as on_a, on_a.attach(session_id) as back:
                outputs.append(back.send(steps[8:]))
                assert (back.model, back.model_version) == ("m", 2)
    v2 = load_model(repo_b / "m" / "2").model
    assert_equals_offline(np.concatenate(outputs), v2, steps)


def test_a_snapshot_of_only_versions_the_server_lacks_is_refused_loudly(tmp_path):
    repo, snapshots = make_repository(tmp_path, versions=(1, 2)), tmp_path / "snapshots"
    with serve_repository(repo, "--snapshot-dir", str(snapshots)) as proc:
        open_on_each_version(proc.target, random_steps(3, 3))
        proc.finish()
    other = make_repository(tmp_path / "other", seed=50)  # m v1 with other weights, no v2
    with pytest.raises(RuntimeError) as refused:
        serve_repository(other, "--snapshot-dir", str(snapshots))
    assert "restoring it would apply another model's state" in str(refused.value)
    assert (snapshots / "sessions.snapshot").exists()  # kept, for a server that has them


def test_a_replica_takes_over_sessions_of_two_versions_from_its_own_repository(tmp_path):
    """Replica B started before v2 was published: a v2 session from the store makes it load
    v2 from its repository. Replica C, whose repository never had v2, answers
    MODEL_NOT_FOUND for that session, never another version's outputs."""
    from tests.e2e.scale_parts import RedisServer

    repo = make_repository(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(repo / "m", other / "m")  # v1 only
    first, rest = random_steps(5, 3, seed=3), random_steps(4, 3, seed=4)
    with RedisServer() as redis:
        store = ("--state-store", redis.url, "--state-store-interval-ms", "0")
        with (
            serve_repository(repo, *store) as a,
            serve_repository(repo, *store) as b,
            serve_repository(other, *store) as c,
        ):
            add_version(repo, 2)
            reload(a)
            wait_for(lambda: states(a.target).get(("m", 2)) == "READY", what="v2 on replica A")
            opened = open_on_each_version(a.target, first)
            stored = [session_key(ANONYMOUS, session_id) for session_id, _ in opened.values()]
            wait_for(
                lambda: [redis.client().hget(key, "step") for key in stored] == [b"5", b"5"],
                what="both sessions stored at step 5",
            )
            a.process.kill()  # replica A dies
            with StreamingClient(c.target) as client, pytest.raises(LstmStreamError) as missing:
                client.attach(opened[2][0]).send(rest)
            assert states(b.target) == {("m", 1): "READY"}  # B has not seen v2 yet
            continued = continue_each(b.target, opened, rest)
    assert_continued_on_their_versions(repo, opened, continued, first, rest)
    assert (missing.value.code.name, missing.value.reason) == ("NOT_FOUND", "MODEL_NOT_FOUND")
    assert "m v2" in missing.value.details


def test_sessions_keep_their_version_through_export_import_and_batches(tmp_path):
    """With v1 and v2 both ready: an exported v1 session imports onto v1, not the newest; one
    StepBatch message feeds a v1 and a v2 session, each with its own version's outputs; a
    record naming v1 with other weights is MODEL_MISMATCH; a draining v1 refuses new sessions
    and Predict but still describes itself."""
    repo = make_repository(tmp_path, versions=(1, 2))
    first, rest = random_steps(4, 3, seed=5), random_steps(3, 3, seed=6)
    v1, v2 = (load_model(repo / "m" / str(v)).model for v in (1, 2))
    with serve_repository(repo) as proc, StreamingClient(proc.target) as client:
        old = client.open_session(model="m", model_version=1)
        new = client.open_session()  # v2, the newest
        head = {1: old.send(first), 2: new.send(first)}
        state = client.call("ExportSession", pb.ExportSessionRequest(session_id=old.session_id))
        imported = client.call(
            "ImportSession", pb.ImportSessionRequest(state=state.state, session_id="copy")
        ).session
        for session_id in (old.detach(), new.detach(), "copy"):
            client.batches.attach(session_id)  # go on from each one's next step
        batch = client.batches.step({old.session_id: rest, new.session_id: rest, "copy": rest})
        tail = {1: batch[old.session_id], 2: batch[new.session_id]}
        (repo / "m" / "1").rename(tmp_path / "v1-retired")
        reload(proc)
        wait_for(lambda: states(proc.target).get(("m", 1)) == "DRAINING", what="v1 draining")
        refusals = []
        for call in (
            lambda: client.open_session(model="m", model_version=1),
            lambda: client.predict(first, model="m", model_version=1),
        ):
            with pytest.raises(LstmStreamError) as err:
                call()
            refusals.append(
                (err.value.code.name, err.value.reason, "draining" in err.value.details)
            )
        described = client.info("m", 1)
    with (
        serve_repository(make_repository(tmp_path / "impostor", seed=99)) as proc,
        StreamingClient(proc.target) as client,
        pytest.raises(LstmStreamError) as mismatch,
    ):
        client.call("ImportSession", pb.ImportSessionRequest(state=state.state))
    assert (imported.model, imported.model_version, imported.next_step) == ("m", 1, 4)
    whole = np.concatenate([first, rest])
    for version, model in ((1, v1), (2, v2)):
        outputs = np.concatenate([head[version], tail[version]])
        assert_equals_offline(outputs, model, whole)
    assert_equals_offline(batch["copy"], v1, whole, first=4)
    assert refusals == [("NOT_FOUND", "MODEL_NOT_FOUND", True)] * 2
    assert (described.model_version, described.fingerprint) == (
        1,
        load_model(tmp_path / "v1-retired").fingerprint,
    )
    assert (mismatch.value.code.name, mismatch.value.reason) == (
        "FAILED_PRECONDITION",
        "MODEL_MISMATCH",
    )


def test_the_repository_is_polled_without_a_signal(tmp_path):
    repo = make_repository(tmp_path)
    with ServeProcess("--model-repository", str(repo), "--repository-poll-s", "0.2") as proc:
        add_version(repo, 2)
        wait_for(lambda: states(proc.target).get(("m", 2)) == "READY", what="v2 by polling")
        shutil.rmtree(repo / "m" / "1")
        wait_for(lambda: ("m", 1) not in states(proc.target), what="v1 drained and unloaded")
        with StreamingClient(proc.target) as client:
            info = client.info()
    assert (info.name, info.model_version) == ("m", 2)


def test_requests_naming_no_model_follow_the_default_out_and_an_empty_listing_drains_nothing(
    tmp_path,
):
    repo = make_repository(tmp_path)  # m v1, the default (first by name)
    add_version(repo, 1, name="z")
    metrics_port = free_port()
    with serve_repository(repo, metrics_port=metrics_port) as proc:
        with StreamingClient(proc.target) as client:
            before = client.info().name
        shutil.rmtree(repo / "m")
        reload(proc)
        wait_for(lambda: ("m", 1) not in states(proc.target), what="m to unload")
        with StreamingClient(proc.target) as client:
            after = client.open_session()
            placed = (after.model, after.model_version)
            shutil.rmtree(repo / "z")  # the listing is now empty: a volume gone, not a retirement
            reads = metric_value(metrics_port, "lstm_model_repository_reads_total")
            reload(proc)
            wait_for(
                lambda: metric_value(metrics_port, "lstm_model_repository_reads_total") > reads
            )
            still = states(proc.target)
            outputs = after.send(random_steps(2, 3))
        _, log = proc.finish()
    assert (before, placed) == ("m", ("z", 1))
    assert still == {("z", 1): "READY"} and outputs.shape == (2, 2)
    assert "lists no version: keeping what is loaded" in log
